"""The one macro network every space builds on: stem, a stack of cells, an optional auxiliary head,
then global pooling and a linear classifier (`CellNetwork`).

The supernet, the discretised network and the evaluation network are this skeleton with other
cells and norms: a supernet's cells mix candidate ops with op weights from its architecture
parameters (`arch`), a discrete network's cells hold one op per kept edge and no `arch`, and an
evaluation network's norms keep running statistics (`_norm`).

A cell is called `cell(s0, s1, weights, state, drop) -> (output, state)`: the outputs of the two
cells before it, its op weights (None without `arch`), the running-statistics state (None in a
search) and drop-path (`DropPath`, None outside training). Cells of single-input spaces read `s1`.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._conv import conv2d, pointwise_conv
from ._data import PixelNorm
from ._dtype import float_dtype
from ._norm import BatchNorm, Normalisation, RunningBatchNorm
from ._ops import Conv2d, Images, Output, _uniform

Logits = Float[Array, "batch classes"]
Norm = BatchNorm | RunningBatchNorm


def reduction_layers(layers: int) -> tuple[int, ...]:
    """Indices of the reduction cells: layers//3 and 2*layers//3, as the paper."""
    return tuple(sorted({layers // 3, 2 * layers // 3}))


class DropPath(NamedTuple):
    """Drop-path in training (Liu et al., 2019, App. A.2): each sample of a non-identity edge is
    zeroed with probability `prob` (the rest scaled by 1/keep); `key` draws the masks."""

    prob: Any
    key: PRNGKeyArray

    def __call__(self, x: Output, key: PRNGKeyArray) -> Output:
        keep = 1.0 - self.prob
        mask = jax.random.bernoulli(key, keep, (x.shape[0], 1, 1, 1))
        return jnp.where(mask, x / keep, 0.0)


class Stem(eqx.Module):
    """3x3 convolution, then an affine BN."""

    conv: Conv2d
    norm: Norm

    def __init__(self, in_channels: int, channels: int, norm: Normalisation, *, key: PRNGKeyArray):
        self.conv = Conv2d(in_channels, channels, 3, 1, 1, key=key)
        self.norm = norm(channels, affine=True)

    def __call__(self, x: Images, state: Any = None) -> tuple[Output, Any]:
        return self.norm(self.conv(x), state)


class Head(eqx.Module):
    """Optionally an affine BN and ReLU (NAS-Bench-201), then global average pooling and a linear
    classifier."""

    norm: Norm | None
    classifier: eqx.nn.Linear

    def __init__(self, channels: int, num_classes: int, norm: Normalisation | None = None, *, key: PRNGKeyArray):
        self.norm = None if norm is None else norm(channels, affine=True)
        # drawn in float32 like every other weight, so float64 starts from the same network
        linear = eqx.nn.Linear(channels, num_classes, dtype=jnp.float32, key=key)
        self.classifier = jax.tree.map(lambda w: w.astype(float_dtype()), linear)

    def __call__(self, x: Images, state: Any = None) -> tuple[Logits, Any]:
        if self.norm is not None:
            x, state = self.norm(x, state)
            x = jax.nn.relu(x)
        return jax.vmap(self.classifier)(jnp.mean(x, axis=(1, 2))), state


class AuxiliaryHead(eqx.Module):
    """The original's CIFAR auxiliary head on an 8x8 map: ReLU, 5x5 average pool (stride 3) to
    2x2, 1x1 conv to 128 + BN + ReLU, 2x2 conv to 768 + BN + ReLU, linear."""

    conv1: Float[Array, "cin 128"]
    norm1: Norm
    conv2: Float[Array, "2 2 128 768"]
    norm2: Norm
    weight: Float[Array, "768 classes"]
    bias: Float[Array, " classes"]

    def __init__(self, channels: int, num_classes: int, norm: Normalisation, *, key: PRNGKeyArray):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.conv1 = _uniform(k1, (channels, 128), channels)
        self.norm1 = norm(128, affine=True)
        self.conv2 = _uniform(k2, (2, 2, 128, 768), 128 * 4)
        self.norm2 = norm(768, affine=True)
        self.weight = _uniform(k3, (768, num_classes), 768)
        self.bias = _uniform(k4, (num_classes,), 768)

    def __call__(self, x: Images, state: Any = None) -> tuple[Logits, Any]:
        x = jax.nn.relu(x)
        x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 5, 5, 1), (1, 3, 3, 1), "VALID") / 25.0
        x, state = self.norm1(pointwise_conv(x, self.conv1), state)
        x, state = self.norm2(conv2d(jax.nn.relu(x), self.conv2, 1, 0), state)
        x = jax.nn.relu(x).reshape(x.shape[0], -1)
        return x @ self.weight + self.bias[None, :], state


class CellNetwork(eqx.Module):
    """stem -> cells -> (auxiliary head after cell `auxiliary_after`, in training) -> head.

    **Fields:**
    - `cells`: the cell stack (see the module docstring for a cell's call).
    - `arch`: the architecture parameters of a supernet, whose `weights()` gives each cell kind's
      op weights (`cell_kinds[i]` names cell i's; None for a cell without), or None.
    - `space`: the name of the search space it belongs to.
    - `genotype`: the architecture a discrete network implements (None for a supernet).
    - `pixel_norm`: how the images it learned from were normalised (a `darts_eqx.data.PixelNorm`),
      when known: the networks `search` and `train` return carry their data's.

    **Call:** `model(x)` gives the logits of a network without running statistics (a supernet, a
    discretised supernet). With running statistics, `model(x, state, train=..., drop_prob=...,
    key=...)` gives `(logits, aux_logits or None, state)`; `train=False` (the default) uses the
    running statistics; drop-path acts in training when a `key` is given. `model.predict(images)`
    (or `model.predict(images, state)`) takes images as a user has them, of any integer or float
    dtype, normalises them as its data was (`pixel_norm`) and gives inference logits.
    """

    stem: Stem
    cells: tuple[Any, ...]
    head: Head
    auxiliary: AuxiliaryHead | None
    arch: Any
    space: str = eqx.field(static=True)
    cell_kinds: tuple[str | None, ...] = eqx.field(static=True)
    auxiliary_after: int = eqx.field(static=True, default=-1)
    genotype: Any = eqx.field(static=True, default=None)
    pixel_norm: Any = eqx.field(static=True, default=None)

    def __check_init__(self):
        if len(self.cell_kinds) != len(self.cells):
            raise ValueError(f"{len(self.cells)} cells but {len(self.cell_kinds)} cell kinds")

    def __call__(self, x: Images, state=None, *, train: bool = False, drop_prob=None, key=None):
        if state is None:
            return self._forward(x, None, False, None)[0]
        model = eqx.nn.inference_mode(self, value=not train)
        drop = DropPath(drop_prob, key) if train and drop_prob is not None and key is not None else None
        logits, aux, state = model._forward(x, state, train, drop)
        return logits, aux, state

    def predict(self, images, state=None):
        """Inference logits for raw `images` (any integer or float dtype, `[n, h, w]` or
        `[n, h, w, c]`; pixels as they were given to `darts_eqx.data.from_arrays`, not an
        `ImageData`'s already normalised arrays), normalised with `pixel_norm` (as given, but as
        floats, without one). With `state`, running statistics; without (a supernet, a
        discretised network), batch statistics: each image's logits then depend on its batch."""
        norm = self.pixel_norm
        if norm is None:  # no statistics known: the pixels as floats
            channels = self.stem.conv.weight.shape[2]  # HWIO
            norm = PixelNorm((0.0,) * channels, (1.0,) * channels)
        x = norm(images)
        return self(x) if state is None else self(x, state)[0]

    def _forward(self, x: Images, state, train: bool, drop: DropPath | None):
        weights = {} if self.arch is None else self.arch.weights()
        s, state = self.stem(x, state)
        s0 = s1 = s
        aux = None
        drops = _split(drop, len(self.cells))
        for i, (cell, kind) in enumerate(zip(self.cells, self.cell_kinds)):
            out, state = cell(s0, s1, None if kind is None else weights[kind], state, drops[i])
            s0, s1 = s1, out
            if i == self.auxiliary_after and self.auxiliary is not None and train:
                if s1.shape[1] < 5 or s1.shape[2] < 5:
                    raise ValueError(
                        f"the auxiliary head needs a feature map of at least 5x5 after cell {i}, got "
                        f"{s1.shape[1]}x{s1.shape[2]}: use larger images or no auxiliary head"
                    )
                aux, state = self.auxiliary(s1, state)
        logits, state = self.head(s1, state)
        return logits, aux, state


def _split(drop: DropPath | None, n: int) -> Sequence[DropPath | None]:
    if drop is None:
        return [None] * n
    return [DropPath(drop.prob, k) for k in jax.random.split(drop.key, n)]


def has_running_norms(model) -> bool:
    leaves = jax.tree.leaves(model, is_leaf=lambda n: isinstance(n, RunningBatchNorm))
    return any(isinstance(n, RunningBatchNorm) for n in leaves)


def count_parameters(network: CellNetwork, *, auxiliary: bool = False) -> int:
    """Trainable parameters (as the original's `count_parameters_in_MB` x 1e6: convolutions,
    BN scale and shift, classifier weight and bias; running statistics and architecture
    parameters are not parameters); the auxiliary head only when `auxiliary`."""
    if not auxiliary and network.auxiliary is not None:
        network = eqx.tree_at(lambda n: n.auxiliary, network, None)
    network = eqx.tree_at(lambda n: n.arch, network, None, is_leaf=lambda x: x is None)
    leaves = jax.tree.leaves(network, is_leaf=lambda x: isinstance(x, eqx.nn.StateIndex))
    return sum(x.size for x in leaves if eqx.is_inexact_array(x))


def check_sizes(channels: int, layers: int, in_channels: int, num_classes: int):
    """A `ValueError` naming the first size that is not a large enough integer."""
    for name, value, low in (
        ("channels", channels, 1),
        ("layers", layers, 1),
        ("in_channels", in_channels, 1),
        ("num_classes", num_classes, 2),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` (={value!r}) must be an integer >= {low}")
