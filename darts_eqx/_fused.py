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

XLA:CPU runs dense convolutions near the machine's peak and grouped (depthwise) ones 5-10x slower
than that; the C++ kernel does the depthwise multiply-adds alone and is about twice as fast as the
composed dense kernels in the whole step (experiments/README.md has the figures). Accelerators get
the composed kernels (cheap at search widths there, though at c=64, k=5 they are ~18x the
multiply-adds of depthwise + pointwise). The cell is also ~7x smaller as a program than
per-edge mixed ops (XLA's compile time follows program size). It computes exactly what the
per-edge `SearchCell` computes: `FusedCell.reference()` builds that cell with the same weights, and
the tests compare the two (the reference traced with plain grouped convolutions).
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from ._cell import SearchCell, check_partial_channels, edge_index, preprocess
from ._conv import (
    avg_pool,
    conv2d,
    depthwise_conv2d_edges,
    max_pool,
    pointwise_conv,
    separable_conv2d,
    separable_kernel,
    uses_depthwise_kernel,
    weight_einsum,
)
from ._mixed import MixedOp, partial_channel_merge
from ._ops import (
    DilConv,
    Earlier,
    FactorizedReduce,
    Identity,
    Images,
    Output,
    Pool,
    SepConv,
    Zero,
    _uniform,
    batch_norm,
)
from ._spaces import DARTS_SPACE

_CONV_OPS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
_KERNEL = {"sep_conv_3x3": 3, "sep_conv_5x5": 5, "dil_conv_3x3": 3, "dil_conv_5x5": 5}
_DILATION = {"sep_conv_3x3": 1, "sep_conv_5x5": 1, "dil_conv_3x3": 2, "dil_conv_5x5": 2}


def _edge_batch_norm(x: Float[Array, "e b h w c"], eps: float = 1e-5) -> Float[Array, "e b h w c"]:
    """`batch_norm` per edge and channel of edges-first outputs (the same matrix-vector sums,
    batched over edges: `jax.vmap(batch_norm)` computes the same but ran the step 20% slower)."""
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    average = jnp.full((rows.shape[1],), 1.0 / rows.shape[1], x.dtype)
    centred = rows - jnp.einsum("n,enc->ec", average, rows)[:, None, :]
    var = jnp.einsum("n,enc->ec", average, jnp.square(centred))
    return (centred * lax.rsqrt(var + eps)[:, None, :]).reshape(x.shape)


def _edge_kernels(depthwise: Float[Array, "e k k c"], pointwise: Float[Array, "e c d"]) -> Float[Array, "k k c e*d"]:
    """One dense kernel applying every edge's depthwise-then-pointwise pair to a shared input,
    edges side by side on the output axis."""
    e, k, _, c = depthwise.shape
    return jnp.einsum("eijc,ecd->ijced", depthwise, pointwise).reshape(k, k, c, e * pointwise.shape[-1])


class SourceOps(eqx.Module):
    """All DARTS candidate ops on the `edges` edges that leave one state, with stacked weights.

    Weights are kept per op and edge in the reference ops' own layout, so `edge_op` slices out the
    module an edge would have had on its own.
    """

    sep3_dw1: Float[Array, "e 3 3 c"]
    sep3_pw1: Float[Array, "e c c"]
    sep3_dw2: Float[Array, "e 3 3 c"]
    sep3_pw2: Float[Array, "e c c"]
    sep5_dw1: Float[Array, "e 5 5 c"]
    sep5_pw1: Float[Array, "e c c"]
    sep5_dw2: Float[Array, "e 5 5 c"]
    sep5_pw2: Float[Array, "e c c"]
    dil3_dw: Float[Array, "e 3 3 c"]
    dil3_pw: Float[Array, "e c c"]
    dil5_dw: Float[Array, "e 5 5 c"]
    dil5_pw: Float[Array, "e c c"]
    skip_a: Float[Array, "e c half"] | None
    skip_b: Float[Array, "e c half"] | None
    edges: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    stride: int = eqx.field(static=True)

    def __init__(self, channels: int, edges: int, stride: int, *, key: PRNGKeyArray):
        if stride == 2 and channels % 2:
            raise ValueError(f"a reduction cell needs an even channel count, got {channels}")
        keys = iter(jax.random.split(key, 14))
        c, e = channels, edges

        def dw(k):
            return _uniform(next(keys), (e, k, k, c), k * k)

        def pw():
            return _uniform(next(keys), (e, c, c), c)

        self.sep3_dw1, self.sep3_pw1, self.sep3_dw2, self.sep3_pw2 = dw(3), pw(), dw(3), pw()
        self.sep5_dw1, self.sep5_pw1, self.sep5_dw2, self.sep5_pw2 = dw(5), pw(), dw(5), pw()
        self.dil3_dw, self.dil3_pw = dw(3), pw()
        self.dil5_dw, self.dil5_pw = dw(5), pw()
        if stride == 2:
            self.skip_a = _uniform(next(keys), (e, c, c // 2), c)
            self.skip_b = _uniform(next(keys), (e, c, c // 2), c)
        else:
            self.skip_a = self.skip_b = None
        self.edges, self.channels, self.stride = e, c, stride

    def __call__(self, x: Images, weights: Float[Array, "e 8"]) -> Float[Array, "e b ho wo c"]:
        """Mixed-op outputs of every edge leaving `x`, weighted by softmax(alpha) rows `weights`
        (columns in `DARTS_SPACE.op_names` order), edges first.

        Op outputs are kept apart and mixed per edge, never concatenated along the channel axis:
        on XLA:CPU every such concatenate (and every elementwise pass over [.., edges, channels]
        with a broadcast weight) is a strided copy with 8-float rows at C=8 (experiments/README.md)."""
        e, s, c = self.edges, self.stride, self.channels
        # Stage 1 of the four conv ops: per op, every edge's (depthwise o pointwise) output of
        # relu(x) at once (the C++ depthwise kernel, or one dense convolution with the edges'
        # composed kernels side by side on the output axis).
        r = jax.nn.relu(x)
        firsts = (
            (self.sep3_dw1, self.sep3_pw1),
            (self.sep5_dw1, self.sep5_pw1),
            (self.dil3_dw, self.dil3_pw),
            (self.dil5_dw, self.dil5_pw),
        )
        if uses_depthwise_kernel(x):
            # With the C++ depthwise kernel: every edge's depthwise convolution in one call, edges
            # first, then each edge's pointwise matrix as one batched matmul.
            per_edge = [
                _edge_batch_norm(
                    weight_einsum(
                        "ebhwc,ecd->ebhwd",
                        depthwise_conv2d_edges(r, dw, s, _DILATION[op] * (_KERNEL[op] // 2), _DILATION[op]),
                        pw,
                    )
                )
                for op, (dw, pw) in zip(_CONV_OPS, firsts)
            ]
        else:
            stage1 = [
                batch_norm(conv2d(r, _edge_kernels(dw, pw), s, _DILATION[op] * (_KERNEL[op] // 2), _DILATION[op]))
                for op, (dw, pw) in zip(_CONV_OPS, firsts)
            ]

            # Everything after stage 1 is per edge: one `lax.scan` over the edges keeps the program
            # (hence XLA's compile time) independent of the edge count. Its inputs are the stage-1
            # outputs edges first, so each step reads one contiguous block.
            b, ho, wo = stage1[0].shape[:3]
            per_edge = [jnp.moveaxis(y.reshape(b, ho, wo, e, c), 3, 0) for y in stage1]
        max_out, avg_out = batch_norm(max_pool(x, s)), batch_norm(avg_pool(x, s))
        if s == 2:
            r_even, r_odd = r[:, ::2, ::2], r[:, 1::2, 1::2]
            skip_weights = (self.skip_a, self.skip_b)
        else:
            skip_weights = None

        def second_stage(y, dw, pw, padding):
            # The C++ kernel then a matmul, else (also on accelerators) one composed dense conv.
            if uses_depthwise_kernel(y):
                return separable_conv2d(y, dw, pw, 1, padding)
            return conv2d(y, separable_kernel(dw, pw), 1, padding)

        def edge_out(_, inputs):
            (sep3, sep5, dil3, dil5), (dw3, pw3, dw5, pw5), skip_i, w = inputs
            # Stage 2 of the two sep convs.
            z3 = batch_norm(second_stage(jax.nn.relu(sep3), dw3, pw3, 1))
            z5 = batch_norm(second_stage(jax.nn.relu(sep5), dw5, pw5, 2))
            if skip_i is None:
                skip = x
            else:
                skip = batch_norm(
                    jnp.concatenate([pointwise_conv(r_even, skip_i[0]), pointwise_conv(r_odd, skip_i[1])], axis=-1)
                )
            out = w[1] * max_out + w[2] * avg_out + w[3] * skip + w[4] * z3 + w[5] * z5 + w[6] * dil3 + w[7] * dil5
            return None, out

        seconds = (self.sep3_dw2, self.sep3_pw2, self.sep5_dw2, self.sep5_pw2)
        # Recompute each edge in the backward pass from its inputs, as `FusedCell` does per source
        # (`_remat`): the scan then stacks nothing per edge but what it reads anyway.
        edge_body = _remat(edge_out)
        _, outs = lax.scan(edge_body, None, (tuple(per_edge), seconds, skip_weights, weights))
        return outs

    def edge_op(self, name: str, slot: int) -> eqx.Module:
        """The stand-alone op module of edge `slot` for candidate `name`, with these weights."""
        s, c = self.stride, self.channels
        key = jax.random.key(0)  # shape-only templates: every array is replaced below
        if name == "none":
            return Zero(s)
        if name in ("max_pool_3x3", "avg_pool_3x3"):
            return Pool(name[:3], c, s, with_norm=True)
        if name == "skip_connect":
            if s == 1:
                return Identity()
            fr = eqx.filter_eval_shape(FactorizedReduce, c, c, False, key=key)
            return eqx.tree_at(lambda m: (m.weight_a, m.weight_b), fr, (self.skip_a[slot], self.skip_b[slot]))
        if name.startswith("sep_conv"):
            k = _KERNEL[name]
            prefix = f"sep{k}"
            op = eqx.filter_eval_shape(SepConv, c, c, k, s, k // 2, False, key=key)
            return eqx.tree_at(
                lambda m: (m.first.depthwise, m.first.pointwise, m.second.depthwise, m.second.pointwise),
                op,
                tuple(getattr(self, f"{prefix}_{n}")[slot] for n in ("dw1", "pw1", "dw2", "pw2")),
            )
        if name.startswith("dil_conv"):
            k = _KERNEL[name]
            op = eqx.filter_eval_shape(DilConv, c, c, k, s, k - 1, 2, False, key=key)
            return eqx.tree_at(
                lambda m: (m.depthwise, m.pointwise),
                op,
                (getattr(self, f"dil{k}_dw")[slot], getattr(self, f"dil{k}_pw")[slot]),
            )
        raise ValueError(f"unknown DARTS op {name!r}; known: {DARTS_SPACE.op_names}")


def _with_edges(ops: SourceOps, edges: int, fn) -> SourceOps:
    """`ops` with `fn` applied to each weight array, as a `SourceOps` of `edges` edges."""
    static = ("edges", "channels", "stride")
    fields = {f.name: getattr(ops, f.name) for f in dataclasses.fields(ops) if f.name not in static}
    arrays = {k: None if v is None else fn(v) for k, v in fields.items()}
    return assemble(SourceOps, **arrays, edges=edges, channels=ops.channels, stride=ops.stride)


def _pad_edges(ops: SourceOps, width: int) -> SourceOps:
    """`ops` with zero weights appended for `width - ops.edges` extra edges."""
    return _with_edges(
        ops, width, lambda x: jnp.concatenate([x, jnp.zeros((width - x.shape[0],) + x.shape[1:], x.dtype)])
    )


# Each source's ops (and each edge's second stage) are recomputed whole in the backward pass,
# keeping only their inputs. Keeping the convolution and matmul outputs instead made the scans
# stack every one of them per source and edge, and copy each (JAX's reduce-precision on saved
# residuals): back to back at C=8, layers=5, batch 32, first order, XLA's temporaries 928 -> 167
# MB, 0.86-0.92 -> 0.90-0.97 steps/s (the process's peak is the compile's, nearly unchanged);
# second order (shared trace) 665 -> 147 MB, 0.264 -> 0.298 steps/s; C=16, layers=8, batch 64,
# first order: 6.07 -> 0.82 GB of temporaries, lower + compile 69.5 -> 63.4 s. PC-DARTS (K=4)
# runs about 7% slower this way. (Without remat: 4.7 GB at C=8.)
_REMAT = jax.checkpoint_policies.nothing_saveable


def _remat(fn):
    """`fn` recomputed in the backward pass (`_REMAT`), and its backward pass recomputed in the
    one after it. A single `jax.checkpoint` inside a scan keeps its promise for one derivative
    only: the exact second-order step differentiates the backward pass once more, and then the
    scan stacked every intermediate of each source's backward pass (8 of them at [3, 3, B*H*W, C]
    in the first cell). Checkpointing the checkpointed function keeps those residuals to its
    inputs. Exact second order: XLA's temporaries 943 -> 384 MB at C=8, layers=5, batch 32 and
    6.15 -> 2.16 GB at C=16, layers=8, batch 64, where the run's peak RSS halves (7.73 -> 3.78
    GiB); speed and compile time stay within noise. First order and finite differences ran as
    before (speed, compile and peak within noise)."""
    return jax.checkpoint(jax.checkpoint(fn, policy=_REMAT), policy=_REMAT)


def _stacked(sources: list[SourceOps]) -> SourceOps:
    """`sources` as one `SourceOps` with a leading source axis, padded to the widest edge count."""
    width = max(ops.edges for ops in sources)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[_pad_edges(ops, width) for ops in sources])


def _unstacked(group: SourceOps, row: int, edges: int) -> SourceOps:
    """Row `row` of a stacked `SourceOps`, its first `edges` edges."""
    return _with_edges(group, edges, lambda x: x[row, :edges])


def destinations(source: int, steps: int) -> tuple[int, ...]:
    """Intermediate nodes fed by state `source` (0, 1: cell inputs; k + 2: node k)."""
    return tuple(range(max(0, source - 1), steps))


class FusedCell(eqx.Module):
    """A DARTS search cell computed per source state (see the module docstring); same function
    and same weights as `SearchCell`, in a faster layout."""

    preprocess0: eqx.Module
    preprocess1: eqx.Module
    # The ops leaving each source, stored as the two scans over sources read them: the two cell
    # inputs' (4 edges each) stacked, and the intermediate nodes' stacked with their edges padded
    # with zero weights to the widest (None with a single node). Stacking them in every forward pass
    # instead cost 33 distinct kernels per step and their gradients' slices; stored stacked, the
    # C=8 chunk has 915 distinct kernels instead of 1,012 and XLA's compile peak is about 105 MiB
    # lower; the C=16, layers=8 compile 45 -> 34 s, second order 15% faster, first order within
    # the machine's spread (experiments/README.md). `source_ops(i)` is source i's own view.
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
        self.preprocess0 = preprocess(c_prev_prev, channels, reduction_prev, False, key=k0)
        self.preprocess1 = preprocess(c_prev, channels, False, False, key=k1)
        sources = [
            SourceOps(channels // partial_channels, len(destinations(i, steps)), 2 if reduction and i < 2 else 1, key=k)
            for i, k in enumerate(jax.random.split(ks, steps + 1))
        ]
        self.inputs = _stacked(sources[:2])
        self.nodes = _stacked(sources[2:]) if steps > 1 else None
        self.reduction, self.steps, self.multiplier = reduction, steps, multiplier
        self.partial_channels = partial_channels

    def __call__(
        self,
        s0: Earlier,
        s1: Images,
        weights: Float[Array, "edges ops"],
        edge_weights: Float[Array, " edges"] | None = None,
    ) -> Output:
        # Two `lax.scan`s over sources (the cell inputs, then the intermediate nodes), each over
        # sources padded to the same edge count, so XLA compiles each body once: compile time is
        # what bounds DARTS on XLA. Padded edges have zero mixing weights and land in spare rows.
        h0, h1 = self.preprocess0(s0), self.preprocess1(s1)
        b, h, w, c = h1.shape
        stride = self.inputs.stride
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        nodes = jnp.zeros((2 * self.steps, b, ho, wo, c), h1.dtype)

        k = self.partial_channels
        betas = jnp.ones(weights.shape[:1], weights.dtype) if edge_weights is None else edge_weights

        def mixing(sources, width):
            # Per source: its mixing rows (softmax(alpha), and the edge-normalisation weights with
            # partial channels; zero for padded edges) and the first node it feeds.
            mix = []
            for i in sources:
                dests = destinations(i, self.steps)
                index = np.array([edge_index(j, i) for j in dests])
                rows = jnp.concatenate([weights[index], betas[index, None]], axis=1)
                mix.append(jnp.zeros((width, rows.shape[1]), weights.dtype).at[: len(dests)].set(rows))
            base = jnp.array([destinations(i, self.steps)[0] for i in sources])
            return jnp.stack(mix), base

        def source_out(ops_i, x, mix_i):
            if k == 1:
                out = ops_i(x, mix_i[:, :-1])
            else:  # PC-DARTS: the ops see the first 1/k of the channels, the rest bypass them
                part = jnp.moveaxis(ops_i(x[..., : x.shape[-1] // k], mix_i[:, :-1]), 0, 3)
                out = jnp.moveaxis(partial_channel_merge(part, x, k, ops_i.stride), 3, 0)
            return out if edge_weights is None else out * mix_i[:, -1][:, None, None, None, None]

        def add(nodes, out, base):
            current = lax.dynamic_slice_in_dim(nodes, base, out.shape[0], axis=0)
            return lax.dynamic_update_slice_in_dim(nodes, current + out, base, axis=0)

        apply = _remat(source_out)
        mix, base = mixing((0, 1), self.inputs.edges)

        def input_step(nodes, xs):
            ops_i, x, mix_i, base_i = xs
            return add(nodes, apply(ops_i, x, mix_i), base_i), None

        nodes, _ = lax.scan(input_step, nodes, (self.inputs, jnp.stack([h0, h1]), mix, base))
        if self.nodes is not None:
            node_sources = range(2, self.steps + 1)
            mix, base = mixing(node_sources, self.nodes.edges)

            def node_step(nodes, xs):
                ops_i, source, mix_i, base_i = xs
                x = lax.dynamic_index_in_dim(nodes, source - 2, axis=0, keepdims=False)
                return add(nodes, apply(ops_i, x, mix_i), base_i), None

            nodes, _ = lax.scan(node_step, nodes, (self.nodes, jnp.array(list(node_sources)), mix, base))
        out = nodes[self.steps - self.multiplier : self.steps]
        return jnp.concatenate(list(out), axis=-1)

    def edge_op(self, node: int, source: int, name: str) -> eqx.Module:
        """The op module `name` on the edge `source -> node`, with its supernet weights."""
        return self.source_ops(source).edge_op(name, destinations(source, self.steps).index(node))

    def source_ops(self, source: int) -> SourceOps:
        """The ops on the edges leaving state `source` (0, 1: the cell inputs; k + 2: node k) as
        their own `SourceOps`: its row of the stored stack, without padded edges."""
        if not 0 <= source <= self.steps:
            raise ValueError(f"source (={source}) must be a state with outgoing edges, 0..{self.steps}")
        group, row = (self.inputs, source) if source < 2 else (self.nodes, source - 2)
        return _unstacked(group, row, len(destinations(source, self.steps)))

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


def assemble(cls, **fields):
    """A module of type `cls` from ready-made fields, bypassing its random-initialising
    `__init__` (model surgery; the fields must be exactly the class's)."""
    names = {f.name for f in dataclasses.fields(cls)}
    if set(fields) != names:
        raise TypeError(f"{cls.__name__} has fields {sorted(names)}, got {sorted(fields)}")
    module = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(module, name, value)
    return module


class _PerSourceCell(eqx.Module):
    """A `FusedCell`'s arrays in the order of its layout before the stacked one (checkpoint
    format 1): `preprocess0`, `preprocess1`, then each source's own `SourceOps`."""

    preprocess0: eqx.Module
    preprocess1: eqx.Module
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
            inputs=_stacked(list(x.sources[:2])),
            nodes=_stacked(list(x.sources[2:])) if len(x.sources) > 2 else None,
            reduction=x.reduction,
            steps=x.steps,
            multiplier=x.multiplier,
            partial_channels=x.partial_channels,
        )

    return jax.tree.map(cell, tree, is_leaf=_is_cell)
