"""The DARTS continuous relaxation: architecture logits as a typed leaf, and the mixed op."""

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from ._ops import Images, Output
from ._spaces import SearchSpace


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
        return ArchLogits(scale * jax.random.normal(key, (edges, ops)))


def is_arch(node) -> bool:
    """True for the architecture leaves (`ArchLogits`)."""
    return isinstance(node, ArchLogits)


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

    ops: tuple[eqx.Module, ...]
    op_names: tuple[str, ...] = eqx.field(static=True)

    def __init__(
        self,
        space: SearchSpace,
        channels: int,
        stride: int,
        *,
        key: PRNGKeyArray,
        affine: bool = False,
    ):
        keys = jax.random.split(key, len(space.op_names))
        self.ops = tuple(space.make_op(name, channels, stride, affine, key=k) for name, k in zip(space.op_names, keys))
        self.op_names = space.op_names

    def __call__(self, x: Images, weights: Float[Array, " ops"]) -> Output:
        out = None
        for w, name, op in zip(weights, self.op_names, self.ops):
            if name == "none":
                continue
            term = w * op(x)
            out = term if out is None else out + term
        if out is None:
            raise ValueError(f"mixed op over {self.op_names} has only `none`")
        return out
