"""Supernets: the DARTS CIFAR search network, and the one-mixed-op `seed` network."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._cell import SearchCell, num_edges
from ._fused import FusedCell
from ._mixed import ArchLogits, EdgeLogits, MixedOp
from ._ops import BatchNorm, Conv2d, Images, Output
from ._spaces import DARTS_SPACE, SEED_SPACE, SearchSpace

Logits = Float[Array, "batch classes"]


def reduction_layers(layers: int) -> tuple[int, ...]:
    """Indices of the reduction cells: layers//3 and 2*layers//3, as the paper."""
    return tuple(sorted({layers // 3, 2 * layers // 3}))


def classify(linear: eqx.nn.Linear, features: Float[Array, "batch h w c"]) -> Logits:
    """Global average pool, then the linear classifier."""
    return jax.vmap(linear)(jnp.mean(features, axis=(1, 2)))


class Stem(eqx.Module):
    """3x3 convolution to `stem_multiplier * C` channels, then an affine BN."""

    conv: Conv2d
    norm: BatchNorm

    def __init__(self, in_channels: int, channels: int, *, key: PRNGKeyArray):
        self.conv = Conv2d(in_channels, channels, 3, 1, 1, key=key)
        self.norm = BatchNorm(channels, affine=True)

    def __call__(self, x: Images) -> Output:
        return self.norm(self.conv(x))


def _check_sizes(channels: int, layers: int, in_channels: int, num_classes: int):
    for name, value, low in (
        ("channels", channels, 1),
        ("layers", layers, 1),
        ("in_channels", in_channels, 1),
        ("num_classes", num_classes, 2),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` (={value!r}) must be an integer >= {low}")


class SearchNetwork(eqx.Module):
    """The DARTS CIFAR search network (Liu et al., ICLR 2019, Sec. 3 and App. A.1).

    stem -> `layers` cells (reduction at layers//3 and 2*layers//3, doubling the channels) ->
    global average pool -> linear. Every normal cell shares `alpha_normal` [14, 8] and every
    reduction cell `alpha_reduce` [14, 8]. With C=16, layers=8, 10 classes and RGB input it has
    1,930,618 weights besides alpha, as the original implementation.

    `fused=True` (default) computes each cell source by source (`FusedCell`, fast to compile and
    run); `fused=False` builds the plain per-edge `SearchCell`s of `MixedOp`s. Both compute the
    same function.

    `partial_channels=k > 1` makes it a PC-DARTS supernet (Xu et al., ICLR 2020): each edge sends
    1/k of its channels through the mixed op (so ops are 1/k as wide: about k^2 times fewer
    convolution multiply-adds and k times less activation memory) and the rest around it, and
    every node weighs its incoming edges by softmax(beta), `beta_normal` / `beta_reduce`.
    """

    stem: Stem
    cells: tuple[FusedCell | SearchCell, ...]
    classifier: eqx.nn.Linear
    alpha_normal: ArchLogits
    alpha_reduce: ArchLogits
    beta_normal: EdgeLogits | None
    beta_reduce: EdgeLogits | None
    op_names: tuple[str, ...] = eqx.field(static=True)

    def __init__(
        self,
        channels: int = 16,
        layers: int = 8,
        num_classes: int = 10,
        in_channels: int = 3,
        steps: int = 4,
        multiplier: int = 4,
        stem_multiplier: int = 3,
        fused: bool = True,
        partial_channels: int = 1,
        *,
        key: PRNGKeyArray,
    ):
        _check_sizes(channels, layers, in_channels, num_classes)
        space = DARTS_SPACE
        k_stem, k_cells, k_cls, k_an, k_ar, k_bn, k_br = jax.random.split(key, 7)
        c_curr = stem_multiplier * channels
        self.stem = Stem(in_channels, c_curr, key=k_stem)
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        reductions = reduction_layers(layers)
        cells, reduction_prev = [], False
        for i, k in enumerate(jax.random.split(k_cells, layers)):
            reduction = i in reductions
            if reduction:
                c_curr *= 2
            if fused:
                cell = FusedCell(
                    c_prev_prev, c_prev, c_curr, reduction, reduction_prev, steps, multiplier, partial_channels, key=k
                )
            else:
                cell = SearchCell(
                    space,
                    c_prev_prev,
                    c_prev,
                    c_curr,
                    reduction,
                    reduction_prev,
                    steps,
                    multiplier,
                    partial_channels,
                    key=k,
                )
            cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, multiplier * c_curr
        self.cells = tuple(cells)
        self.classifier = eqx.nn.Linear(c_prev, num_classes, key=k_cls)
        edges = num_edges(steps)
        self.alpha_normal = ArchLogits.init(edges, len(space.op_names), key=k_an)
        self.alpha_reduce = ArchLogits.init(edges, len(space.op_names), key=k_ar)
        if partial_channels > 1:
            self.beta_normal = EdgeLogits.init(steps, key=k_bn)
            self.beta_reduce = EdgeLogits.init(steps, key=k_br)
        else:
            self.beta_normal = self.beta_reduce = None
        self.op_names = space.op_names

    def __call__(self, x: Images) -> Logits:
        s0 = s1 = self.stem(x)
        w_normal, w_reduce = self.alpha_normal.weights(), self.alpha_reduce.weights()
        b_normal = b_reduce = None
        if self.beta_normal is not None:
            assert self.beta_reduce is not None  # the two betas exist together (partial channels)
            b_normal, b_reduce = self.beta_normal.weights(), self.beta_reduce.weights()
        for cell in self.cells:
            if cell.reduction:
                s0, s1 = s1, cell(s0, s1, w_reduce, b_reduce)
            else:
                s0, s1 = s1, cell(s0, s1, w_normal, b_normal)
        return classify(self.classifier, s1)

    def edge_strengths(self) -> dict[str, np.ndarray]:
        """softmax(alpha) of each cell type, each edge's row scaled by its edge-normalisation
        weight when there is one (PC-DARTS): what the genotype is derived from."""
        out = {}
        for kind in ("normal", "reduce"):
            w = np.asarray(getattr(self, f"alpha_{kind}").weights())
            beta = getattr(self, f"beta_{kind}")
            out[kind] = w if beta is None else w * np.asarray(beta.weights())[:, None]
        return out


class SeedNetwork(eqx.Module):
    """The smallest composable example: stem, then `layers` mixed ops over a space (default the
    `seed` space: identity, ReLU-conv-BN 3x3 and 5x5, average and max pool; or any registered
    `SearchSpace` of stride-1, width-keeping ops) all sharing one alpha [1, ops], then global pool
    and linear."""

    stem: Stem
    mixed: tuple[MixedOp, ...]
    classifier: eqx.nn.Linear
    alpha: ArchLogits
    op_names: tuple[str, ...] = eqx.field(static=True)
    space_name: str = eqx.field(static=True)

    def __init__(
        self,
        channels: int = 16,
        layers: int = 2,
        num_classes: int = 10,
        in_channels: int = 3,
        *,
        key: PRNGKeyArray,
        space: SearchSpace = SEED_SPACE,
    ):
        _check_sizes(channels, layers, in_channels, num_classes)
        k_stem, k_mixed, k_cls, k_alpha = jax.random.split(key, 4)
        self.stem = Stem(in_channels, channels, key=k_stem)
        self.mixed = tuple(MixedOp(space, channels, 1, key=k) for k in jax.random.split(k_mixed, layers))
        self.classifier = eqx.nn.Linear(channels, num_classes, key=k_cls)
        self.alpha = ArchLogits.init(1, len(space.op_names), key=k_alpha)
        self.op_names = space.op_names
        self.space_name = space.name

    def __call__(self, x: Images) -> Logits:
        h = self.stem(x)
        w = self.alpha.weights()[0]
        for layer in self.mixed:
            h = layer(h, w)
        return classify(self.classifier, h)
