"""The DARTS cell computed source by source instead of edge by edge (the fast path).

Every edge that leaves one state applies the same candidate ops to the same input, so the supernet
computes them together:
- parameter-free ops (max/avg pool + non-affine BN, identity) once per source, shared by its edges;
- the first stage (ReLU, depthwise, pointwise) of sep_conv_3x3/5x5 and dil_conv_3x3/5x5 on every
  edge: on CPU, per op one call of the C++ depthwise kernel with every edge's kernel (edges first)
  and one batched matmul with the edges' pointwise matrices; where that kernel is not built, and
  on accelerators, per op one dense convolution of the shared input whose kernel is each edge's
  depthwise kernel times its pointwise matrix, edges side by side on the output axis; one BN for
  all of them (statistics stay per edge and channel, so nothing changes);
- everything after that is per edge (the sep convs' second stage and the weighted sum of the
  eight ops) inside one `lax.scan` over the edges, so the program does not grow with the edge
  count; op outputs are never concatenated along the channel axis (XLA:CPU copies such
  concatenates with rows of C floats).

Each source's ops are a `SourceOps` (`_source_ops.py`). The cell is also a much smaller program
than per-edge mixed ops, and XLA's compile time follows program size (experiments/RESULTS.md).
It computes exactly what the per-edge `SearchCell` computes: `FusedCell.reference()` builds that
cell with the same weights, and the tests compare the two (the reference traced with plain grouped
convolutions).
"""

import functools
from typing import Any

import einops
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from . import _source_ops
from ._cell import OpModule, SearchCell, check_partial_channels, edge_index, preprocess
from ._darts import DARTS_SPACE
from ._mixed import MixedOp, OpWeights, SampledWeights, partial_channel_merge
from ._norm import SEARCH_NORM
from ._ops import Earlier, Images, Output
from ._skeleton import DropPath
from ._source_ops import SourceOps, stacked, unstacked
from ._surgery import assemble


def destinations(source: int, steps: int) -> tuple[int, ...]:
    """Intermediate nodes fed by state `source` (0, 1: cell inputs; k + 2: node k)."""
    return tuple(range(max(0, source - 1), steps))


class FusedCell(eqx.Module):
    """A DARTS search cell computed per source state (see the module docstring); same function
    and same weights as `SearchCell`, in a faster layout."""

    preprocess0: OpModule
    preprocess1: OpModule
    # The ops leaving each source, stored as the two scans over sources read them: the two cell
    # inputs' (4 edges each) stacked, and the intermediate nodes' stacked with their edges padded
    # with zero weights to the widest (None with a single node). Stacking them in every forward pass
    # instead cost distinct kernels per step and their gradients' slices: a larger program that
    # compiled slower (experiments/RESULTS.md). `source_ops(i)` is source i's own view.
    inputs: SourceOps
    nodes: SourceOps | None
    reduction: bool = eqx.field(static=True)
    steps: int = eqx.field(static=True)
    multiplier: int = eqx.field(static=True)
    partial_channels: int = eqx.field(static=True, default=1)

    def __init__(
        self,
        c_prev_prev: int,
        c_prev: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
        steps: int = 4,
        multiplier: int = 4,
        partial_channels: int = 1,
        *,
        key: PRNGKeyArray,
    ):
        check_partial_channels(channels, partial_channels)
        k0, k1, ks = jax.random.split(key, 3)
        self.preprocess0 = preprocess(c_prev_prev, channels, reduction_prev, SEARCH_NORM, key=k0)
        self.preprocess1 = preprocess(c_prev, channels, False, SEARCH_NORM, key=k1)
        sources = [
            SourceOps(channels // partial_channels, len(destinations(i, steps)), 2 if reduction and i < 2 else 1, key=k)
            for i, k in enumerate(jax.random.split(ks, steps + 1))
        ]
        self.inputs = stacked(sources[:2])
        self.nodes = stacked(sources[2:]) if steps > 1 else None
        self.reduction, self.steps, self.multiplier = reduction, steps, multiplier
        self.partial_channels = partial_channels

    def __call__(
        self,
        s0: Earlier,
        s1: Images,
        cell_weights: tuple[OpWeights, Float[Array, " edges"] | None],
        state: Any = None,
        drop: DropPath | None = None,
    ) -> tuple[Output, Any]:
        # Two `lax.scan`s over sources (the cell inputs, then the intermediate nodes), each over
        # sources padded to the same edge count, so XLA compiles each body once: compile time is
        # what bounds DARTS on XLA. Padded edges have zero mixing weights and land in spare rows.
        weights, edge_weights = cell_weights
        if isinstance(weights, SampledWeights):  # one op per edge: the per-edge cell skips the others
            return self.reference()(s0, s1, cell_weights, state, drop)
        h0, h1 = self.preprocess0(s0)[0], self.preprocess1(s1)[0]
        b, h, w, c = h1.shape
        stride = self.inputs.stride
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        nodes = jnp.zeros((2 * self.steps, b, ho, wo, c), h1.dtype)

        betas = jnp.ones(weights.shape[:1], weights.dtype) if edge_weights is None else edge_weights
        mixing = functools.partial(_mixing, weights, betas, self.steps)
        weighted = edge_weights is not None
        source_out = functools.partial(_source_out, partial_channels=self.partial_channels, edge_weighted=weighted)

        apply = _source_ops.remat(source_out)
        mix, base = mixing((0, 1), self.inputs.edges)

        def input_step(nodes, xs):
            ops_i, x, mix_i, base_i = xs
            return _add_at(nodes, apply(ops_i, x, mix_i), base_i), None

        nodes, _ = lax.scan(input_step, nodes, (self.inputs, jnp.stack([h0, h1]), mix, base))
        if self.nodes is not None:
            node_sources = range(2, self.steps + 1)
            mix, base = mixing(node_sources, self.nodes.edges)

            def node_step(nodes, xs):
                ops_i, source, mix_i, base_i = xs
                x = lax.dynamic_index_in_dim(nodes, source - 2, axis=0, keepdims=False)
                return _add_at(nodes, apply(ops_i, x, mix_i), base_i), None

            nodes, _ = lax.scan(node_step, nodes, (self.nodes, jnp.array(list(node_sources)), mix, base))
        out = nodes[self.steps - self.multiplier : self.steps]
        return jnp.concatenate(list(out), axis=-1), state

    def edge_op(self, node: int, source: int, name: str) -> eqx.Module:
        """The op module `name` on the edge `source -> node`, with its supernet weights."""
        return self.source_ops(source).edge_op(name, destinations(source, self.steps).index(node))

    def source_ops(self, source: int) -> SourceOps:
        """The ops on the edges leaving state `source` (0, 1: the cell inputs; k + 2: node k) as
        their own `SourceOps`: its row of the stored stack, without padded edges."""
        if not 0 <= source <= self.steps:
            raise ValueError(f"source (={source}) must be a state with outgoing edges, 0..{self.steps}")
        group, row = (self.inputs, source) if source < 2 else (self.nodes, source - 2)
        assert group is not None  # `nodes` is None only with a single node, whose sources are 0..1
        return unstacked(group, row, len(destinations(source, self.steps)))

    def reference(self) -> SearchCell:
        """The same cell as a per-edge `SearchCell` of `MixedOp`s, sharing these weights."""
        edges = tuple(
            assemble(
                MixedOp,
                ops=tuple(self.edge_op(node, source, n) for n in DARTS_SPACE.op_names),
                op_names=DARTS_SPACE.op_names,
            )
            for node in range(self.steps)
            for source in range(node + 2)
        )
        return assemble(
            SearchCell,
            preprocess0=self.preprocess0,
            preprocess1=self.preprocess1,
            edges=edges,
            reduction=self.reduction,
            steps=self.steps,
            multiplier=self.multiplier,
            partial_channels=self.partial_channels,
        )


def _mixing(weights, betas, steps: int, sources, width: int):
    """Per source in `sources`: its mixing rows (softmax(alpha), then the edge-normalisation weight
    with partial channels; zero rows for padded edges up to `width`) and the first node it feeds."""
    mix = []
    for i in sources:
        dests = destinations(i, steps)
        index = np.array([edge_index(j, i) for j in dests])
        rows = jnp.concatenate([weights[index], betas[index, None]], axis=1)
        mix.append(jnp.zeros((width, rows.shape[1]), weights.dtype).at[: len(dests)].set(rows))
    base = jnp.array([destinations(i, steps)[0] for i in sources])
    return jnp.stack(mix), base


def _add_at(nodes, out, base):
    """`nodes` with `out` (one row per edge) added to rows `base`, `base + 1`, ..."""
    current = lax.dynamic_slice_in_dim(nodes, base, out.shape[0], axis=0)
    return lax.dynamic_update_slice_in_dim(nodes, current + out, base, axis=0)


def _source_out(ops_i: SourceOps, x, mix_i, *, partial_channels: int, edge_weighted: bool):
    """The mixed outputs of the edges leaving `x`, edges first."""
    k = partial_channels
    if k == 1:
        out = ops_i(x, mix_i[:, :-1])
    else:  # PC-DARTS: the ops see the first 1/k of the channels, the rest bypass them
        part = einops.rearrange(ops_i(x[..., : x.shape[-1] // k], mix_i[:, :-1]), "e b h w c -> b h w e c")
        out = einops.rearrange(partial_channel_merge(part, x, k, ops_i.stride), "b h w e c -> e b h w c")
    return out * mix_i[:, -1][:, None, None, None, None] if edge_weighted else out


class _PerSourceCell(eqx.Module):
    """A `FusedCell`'s arrays in the order of its layout before the stacked one (checkpoint
    format 1): `preprocess0`, `preprocess1`, then each source's own `SourceOps`."""

    preprocess0: OpModule
    preprocess1: OpModule
    sources: tuple[SourceOps, ...]
    reduction: bool = eqx.field(static=True)
    steps: int = eqx.field(static=True)
    multiplier: int = eqx.field(static=True)
    partial_channels: int = eqx.field(static=True)


def _is_cell(x) -> bool:
    return isinstance(x, FusedCell | _PerSourceCell)


def per_source_view(tree):
    """`tree` (weights, or an optimiser state shaped like them) with each `FusedCell` as its
    per-source view, whose leaves come in the order a format-1 checkpoint stored them."""

    def view(x):
        if not isinstance(x, FusedCell):
            return x
        sources = tuple(x.source_ops(i) for i in range(x.steps + 1))
        return _PerSourceCell(
            x.preprocess0, x.preprocess1, sources, x.reduction, x.steps, x.multiplier, x.partial_channels
        )

    return jax.tree.map(view, tree, is_leaf=_is_cell)


def from_per_source_view(tree):
    """The inverse of `per_source_view`: each per-source view as a `FusedCell` again."""

    def cell(x):
        if not isinstance(x, _PerSourceCell):
            return x
        return assemble(
            FusedCell,
            preprocess0=x.preprocess0,
            preprocess1=x.preprocess1,
            inputs=stacked(list(x.sources[:2])),
            nodes=stacked(list(x.sources[2:])) if len(x.sources) > 2 else None,
            reduction=x.reduction,
            steps=x.steps,
            multiplier=x.multiplier,
            partial_channels=x.partial_channels,
        )

    return jax.tree.map(cell, tree, is_leaf=_is_cell)
