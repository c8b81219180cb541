"""Batch normalisation, the one thing the search and evaluation networks' ops do differently.

The search normalises with the batch's own statistics and no learnt scale (Liu et al., 2019,
App. A.1); the evaluation network uses affine batch norm that keeps running statistics for
inference (App. A.2). Ops take a `Normalisation` and build their norms from it, so each op is
written once. Every norm is called `norm(x, state) -> (y, state)`, as Equinox's stateful layers:
`state` is an `eqx.nn.State` for running statistics and passes through untouched (None in a
search) otherwise.
"""

from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

Images = Float[Array, "batch height width channels"]


def batch_norm(x: Float[Array, "batch h w *channels"], eps: float = 1e-5) -> Float[Array, "batch h w *channels"]:
    """Normalise with the statistics of the batch and spatial axes (biased variance), per channel
    (and per group, for the stacked edges of the fused cell)."""
    # The sums over pixels are matrix-vector products: XLA:CPU runs them (and their transposes in
    # the backward pass) faster than `jnp.mean`'s column reductions (experiments/RESULTS.md).
    shape = x.shape
    rows = x.reshape(shape[0] * shape[1] * shape[2], -1)
    average = jnp.full((rows.shape[0],), 1.0 / rows.shape[0], x.dtype)
    centred = rows - (average @ rows)[None, :]
    var = average @ jnp.square(centred)
    return (centred * jax.lax.rsqrt(var + eps)[None, :]).reshape(shape)


class BatchNorm(eqx.Module):
    """Batch normalisation over the batch and spatial axes with the batch's own statistics
    (biased variance, as PyTorch in training mode). `affine=False` has no parameters, as every
    BN inside the DARTS search ops; the stem BN is affine."""

    weight: Float[Array, " channels"] | None
    bias: Float[Array, " channels"] | None
    channels: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, channels: int, affine: bool, eps: float = 1e-5):
        self.weight = jnp.ones(channels) if affine else None
        self.bias = jnp.zeros(channels) if affine else None
        self.channels, self.eps = channels, eps

    def __call__(self, x: Images, state: Any = None) -> tuple[Images, Any]:
        y = batch_norm(x, self.eps)
        if self.weight is not None and self.bias is not None:
            y = y * self.weight[None, None, None, :] + self.bias[None, None, None, :]
        return y, state


class RunningBatchNorm(eqx.Module):
    """Affine batch norm with running statistics (PyTorch's momentum 0.1, unbiased running
    variance) in an `eqx.nn.State`. In training (`inference=False`) it normalises with the batch's
    statistics and updates the running ones; in inference it uses the running ones.
    `eqx.nn.inference_mode` switches it."""

    weight: Float[Array, " channels"]
    bias: Float[Array, " channels"]
    index: eqx.nn.StateIndex
    inference: bool
    channels: int = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5, inference: bool = False):
        self.weight = jnp.ones(channels)
        self.bias = jnp.zeros(channels)
        self.index = eqx.nn.StateIndex((jnp.zeros(channels), jnp.ones(channels)))
        self.inference = inference
        self.channels, self.momentum, self.eps = channels, momentum, eps

    def __call__(self, x: Images, state: Any) -> tuple[Images, Any]:
        if state is None:
            raise ValueError("a network with running batch-norm statistics is called as `model(x, state)`")
        if self.inference:
            mean, var = state.get(self.index)
        else:
            mean = jnp.mean(x, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(x - mean[None, None, None, :]), axis=(0, 1, 2))
            count = x.shape[0] * x.shape[1] * x.shape[2]
            running_mean, running_var = state.get(self.index)
            m = self.momentum
            unbiased = jax.lax.stop_gradient(var) * count / max(count - 1, 1)
            state = state.set(
                self.index,
                ((1 - m) * running_mean + m * jax.lax.stop_gradient(mean), (1 - m) * running_var + m * unbiased),
            )
        scale = self.weight * jax.lax.rsqrt(var + self.eps)
        return x * scale[None, None, None, :] + (self.bias - mean * scale)[None, None, None, :], state


@dataclass(frozen=True)
class Normalisation:
    """How a network's ops normalise: `running=False` is the search's (batch statistics; no
    learnt scale unless `affine`, or unless asked for per norm, as the stem's), `running=True` the
    evaluation network's (always affine, running statistics). `norm(channels, affine=...)` builds
    one."""

    running: bool
    affine: bool = False

    def __call__(self, channels: int, *, affine: bool = False) -> BatchNorm | RunningBatchNorm:
        return RunningBatchNorm(channels) if self.running else BatchNorm(channels, affine or self.affine)


SEARCH_NORM = Normalisation(running=False)
EVAL_NORM = Normalisation(running=True)


def with_running_norms(model):
    """`model` with every batch-statistics `BatchNorm` replaced by a `RunningBatchNorm` (affine,
    scale and shift kept where it had them), and its initial state: a discretised supernet made
    trainable and usable one image at a time. Returns `(model, state)`."""

    def swap(node):
        if not isinstance(node, BatchNorm):
            return node
        norm = RunningBatchNorm(node.channels, eps=node.eps)
        if node.weight is None or node.bias is None:
            return norm
        return eqx.tree_at(lambda n: (n.weight, n.bias), norm, (node.weight, node.bias))

    model = jax.tree.map(swap, model, is_leaf=lambda n: isinstance(n, BatchNorm))
    # as `eqx.nn.make_with_state`: the initial statistics move into the state, out of the model
    return eqx.nn.delete_init_state(model), eqx.nn.State(model)
