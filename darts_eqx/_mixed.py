"""The DARTS continuous relaxation: architecture logits as a typed leaf, and the mixed op."""

from collections.abc import Callable

import einops
import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._dtype import float_dtype
from ._norm import SEARCH_NORM
from ._ops import Images, Output
from ._spaces import SearchSpace


def _scaled_normal(key: PRNGKeyArray, shape: tuple[int, ...], scale: float) -> Float[Array, "..."]:
    """scale * N(0, 1), the same values eagerly and under `jit`: the barrier keeps XLA from
    folding `scale` into the draw's own last multiply (by sqrt(2)), which rounds once instead of
    twice and changed alpha's last bit under `jit`."""
    return (scale * lax.optimization_barrier(jax.random.normal(key, shape, jnp.float32))).astype(float_dtype())


class ArchLogits(eqx.Module):
    """Architecture logits alpha, one row per edge and one column per candidate op.

    Its own type so that `eqx.partition(model, is_arch, is_leaf=is_arch)` separates the
    architecture from the weights: the two are trained by different optimisers on different data.
    """

    logits: Float[Array, "edges ops"]

    def weights(self) -> Float[Array, "edges ops"]:
        """softmax(alpha) over the ops of each edge."""
        return jax.nn.softmax(self.logits, axis=-1)

    @staticmethod
    def init(edges: int, ops: int, *, key: PRNGKeyArray, scale: float = 1e-3) -> "ArchLogits":
        """alpha = scale * N(0, 1), as the paper (scale 1e-3)."""
        return ArchLogits(_scaled_normal(key, (edges, ops), scale))


class EdgeLogits(eqx.Module):
    """PC-DARTS edge-normalisation logits beta, one per edge of a cell: node j weighs its incoming
    edges by softmax(beta) over those edges (Xu et al., ICLR 2020, Sec. 3.3)."""

    logits: Float[Array, " edges"]
    steps: int = eqx.field(static=True)

    def weights(self) -> Float[Array, " edges"]:
        """softmax(beta) within each node's incoming edges (2, 3, 4, ... of them)."""
        parts, start = [], 0
        for node in range(self.steps):
            parts.append(jax.nn.softmax(self.logits[start : start + node + 2]))
            start += node + 2
        return jnp.concatenate(parts)

    @staticmethod
    def init(steps: int, *, key: PRNGKeyArray, scale: float = 1e-3) -> "EdgeLogits":
        """beta = scale * N(0, 1), as PC-DARTS (scale 1e-3)."""
        return EdgeLogits(_scaled_normal(key, (sum(2 + j for j in range(steps)),), scale), steps)


class SampledWeights(eqx.Module):
    """Op weights whose value is one-hot, `weights[e, index[e]]` on each edge e and exactly zero
    elsewhere (a relaxation that samples one op per edge, GDAS' straight-through Gumbel weights,
    returns them). Each edge then evaluates its sampled op alone: `MixedOp` computes
    `weights[index] * op_index(x) + (sum(weights) - weights[index])`, whose value is that op's
    output times its weight and whose gradient reaches every op's weight (the unsampled ones' as
    the sum of the output's gradient, as GDAS' own code does)."""

    weights: Float[Array, "*edges ops"]
    index: Int[Array, "*edges"]

    def __getitem__(self, edge) -> "SampledWeights":
        return SampledWeights(self.weights[edge], self.index[edge])


# Op weights as a cell's edges take them: an array, or one sampled op per edge.
OpWeights = Float[Array, "edges ops"] | SampledWeights
EdgeWeights = Float[Array, " ops"] | SampledWeights  # one edge's


class RelaxedLogits(eqx.Module):
    """alpha as a method's relaxation shows it to one forward pass: `relax(logits, step, key)`
    instead of softmax(alpha) (see `darts_eqx.Method`). Built inside a step from `ArchLogits` for
    that pass alone, with that pass's own key, and never trained or saved: the key is not reused."""

    logits: Float[Array, "edges ops"]
    step: Int[Array, ""]
    key: PRNGKeyArray
    relax: Callable = eqx.field(static=True)

    def weights(self) -> OpWeights:
        return self.relax(self.logits, self.step, self.key)


class FixedWeights(eqx.Module):
    """Op weights given as values, for one forward pass (a weight step's perturbed weights)."""

    values: Float[Array, "edges ops"]

    def weights(self) -> Float[Array, "edges ops"]:
        return self.values


def is_arch(node) -> bool:
    """True for the architecture leaves (`ArchLogits`, `EdgeLogits` with partial channels, and
    alpha as a method shows it to one forward pass: `RelaxedLogits`, `FixedWeights`)."""
    return isinstance(node, (ArchLogits, EdgeLogits, RelaxedLogits, FixedWeights))


def split_arch(model):
    """Split a model into `(arch, weights, static)` trees; `combine_arch` puts them back."""
    arch, rest = eqx.partition(model, is_arch, is_leaf=is_arch)
    weights, static = eqx.partition(rest, eqx.is_inexact_array)
    return arch, weights, static


def combine_arch(arch, weights, static):
    """Inverse of `split_arch`."""
    return eqx.combine(arch, weights, static, is_leaf=is_arch)


class MixedOp(eqx.Module):
    """sum_o softmax(alpha)_o * o(x) over the candidate ops of one edge.

    `none` is skipped: it adds exactly zero to the output and to every gradient.
    """

    ops: tuple[Callable[..., tuple[Output, None]], ...]
    op_names: tuple[str, ...] = eqx.field(static=True)

    def __init__(
        self,
        space: SearchSpace,
        channels: int,
        stride: int,
        *,
        key: PRNGKeyArray,
    ):
        keys = jax.random.split(key, len(space.op_names))
        self.ops = tuple(
            space.make_op(name, channels, stride, SEARCH_NORM, key=k) for name, k in zip(space.op_names, keys)
        )
        self.op_names = space.op_names

    def __call__(self, x: Images, weights: EdgeWeights) -> Output:
        if isinstance(weights, SampledWeights):
            return self._sampled(x, weights)
        out = None
        for w, name, op in zip(weights, self.op_names, self.ops):
            if name == "none":
                continue
            term = w * op(x)[0]
            out = term if out is None else out + term
        if out is None:
            raise ValueError(f"mixed op over {self.op_names} has only `none`")
        return out

    def _sampled(self, x: Images, sampled: SampledWeights) -> Output:
        """The sampled op alone (`lax.switch` runs one branch), weighted as `SampledWeights` says."""
        branches = [lambda x, op=op: op(x)[0] for op in self.ops]
        w = sampled.weights[sampled.index]
        return w * lax.switch(sampled.index, branches, x) + (jnp.sum(sampled.weights) - w)


def channel_shuffle(x: Float[Array, "*batch c"], groups: int) -> Float[Array, "*batch c"]:
    """ShuffleNet's channel shuffle on the last axis: `groups` blocks of channels interleaved."""
    return einops.rearrange(x, "... (group c) -> ... (c group)", group=groups)


def partial_channel_bypass(x: Images, part: int, stride: int) -> Output:
    """The channels a PC-DARTS edge does not send through its mixed op, at the output resolution
    (2x2 max pool at stride 2, as PC-DARTS)."""
    rest = x[..., part:]
    if stride == 1:
        return rest
    # Not `einops.reduce(rest, "b (h 2) (w 2) c -> b h w c", "max")`: einops moves the window axes
    # last with a transpose, which stays in the compiled fused cell (4 more transposes and copies
    # in a PC-DARTS reduction cell's forward and backward pass).
    b, h, w, c = rest.shape
    return rest.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def partial_channel_merge(mixed_out: Float[Array, "b ho wo *edges part"], x: Images, k: int, stride: int):
    """Join the mixed-op output of a PC-DARTS edge (or of several edges stacked before the channel
    axis) with the channels of `x` that bypass it, then shuffle the channels with k groups."""
    rest = partial_channel_bypass(x, x.shape[-1] // k, stride)
    rest = rest.reshape(rest.shape[:3] + (1,) * (mixed_out.ndim - 4) + rest.shape[3:])
    rest = jnp.broadcast_to(rest, mixed_out.shape[:-1] + rest.shape[-1:])
    return channel_shuffle(jnp.concatenate([mixed_out, rest], axis=-1), k)


def partial_channel_edge(mixed: "MixedOp", x: Images, weights: EdgeWeights, k: int, stride: int) -> Output:
    """A PC-DARTS edge: the mixed op on the first 1/k of the channels, the rest bypassing it, then a
    channel shuffle with k groups (Xu et al., ICLR 2020, Sec. 3.2). k=1 is the plain mixed op."""
    if k == 1:
        return mixed(x, weights)
    return partial_channel_merge(mixed(x[..., : x.shape[-1] // k], weights), x, k, stride)
