"""All DARTS candidate ops on the edges that leave one state of a cell, computed together
(`SourceOps`): the building block of the fused cell (`_fused.py`, whose docstring says why).

XLA:CPU runs dense convolutions near the machine's peak and grouped (depthwise) ones several times
slower; on CPU the C++ kernel does the depthwise multiply-adds alone, and elsewhere (and without the
kernel) each depthwise-then-pointwise pair is one dense convolution with the composed kernel, edges
side by side on the output axis (figures in experiments/RESULTS.md).
"""

import dataclasses

import einops
import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from ._conv import (
    conv2d,
    depthwise_conv2d_edges,
    pointwise_conv,
    separable_conv2d,
    separable_kernel,
    uses_depthwise_kernel,
    weight_einsum,
)
from ._darts import DARTS_SPACE
from ._norm import SEARCH_NORM, batch_norm
from ._ops import Images, _uniform
from ._pool import avg_pool, max_pool
from ._surgery import assemble

_CONV_OPS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
_KERNEL = {"sep_conv_3x3": 3, "sep_conv_5x5": 5, "dil_conv_3x3": 3, "dil_conv_5x5": 5}
_DILATION = {"sep_conv_3x3": 1, "sep_conv_5x5": 1, "dil_conv_3x3": 2, "dil_conv_5x5": 2}


def _edge_batch_norm(x: Float[Array, "e b h w c"], eps: float = 1e-5) -> Float[Array, "e b h w c"]:
    """`batch_norm` per edge and channel of edges-first outputs (the same matrix-vector sums,
    batched over edges: `jax.vmap(batch_norm)` computes the same but ran the step slower)."""
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    average = jnp.full((rows.shape[1],), 1.0 / rows.shape[1], x.dtype)
    centred = rows - jnp.einsum("n,enc->ec", average, rows)[:, None, :]
    var = jnp.einsum("n,enc->ec", average, jnp.square(centred))
    return (centred * lax.rsqrt(var + eps)[:, None, :]).reshape(x.shape)


def _edge_kernels(depthwise: Float[Array, "e k k c"], pointwise: Float[Array, "e c d"]) -> Float[Array, "k k c e*d"]:
    """One dense kernel applying every edge's depthwise-then-pointwise pair to a shared input,
    edges side by side on the output axis."""
    return einops.rearrange(jnp.einsum("eijc,ecd->ijced", depthwise, pointwise), "i j c e d -> i j c (e d)")


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
        with a broadcast weight) is a strided copy with rows of C floats (experiments/RESULTS.md)."""
        s = self.stride
        r = jax.nn.relu(x)
        per_edge = self._first_stages(r)
        max_out, avg_out = batch_norm(max_pool(x, s)), batch_norm(avg_pool(x, s))
        if s == 2:
            r_even, r_odd = r[:, ::2, ::2], r[:, 1::2, 1::2]
            skip_weights = (self.skip_a, self.skip_b)
        else:
            skip_weights = None

        def edge_out(_, inputs):
            (sep3, sep5, dil3, dil5), (dw3, pw3, dw5, pw5), skip_i, w = inputs
            # Stage 2 of the two sep convs.
            z3 = batch_norm(_second_stage(jax.nn.relu(sep3), dw3, pw3, 1))
            z5 = batch_norm(_second_stage(jax.nn.relu(sep5), dw5, pw5, 2))
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
        # (`remat`): the scan then stacks nothing per edge but what it reads anyway.
        edge_body = remat(edge_out)
        _, outs = lax.scan(edge_body, None, (tuple(per_edge), seconds, skip_weights, weights))
        return outs

    def _first_stages(self, r: Images) -> list[Float[Array, "e b ho wo c"]]:
        """Stage 1 of the four conv ops, edges first: per op, every edge's (depthwise o pointwise)
        output of `r` = relu(x) at once (the C++ depthwise kernel, or one dense convolution with
        the edges' composed kernels side by side on the output axis)."""
        s = self.stride
        firsts = (
            (self.sep3_dw1, self.sep3_pw1),
            (self.sep5_dw1, self.sep5_pw1),
            (self.dil3_dw, self.dil3_pw),
            (self.dil5_dw, self.dil5_pw),
        )
        if uses_depthwise_kernel(r):
            # With the C++ depthwise kernel: every edge's depthwise convolution in one call, edges
            # first, then each edge's pointwise matrix as one batched matmul.
            return [
                _edge_batch_norm(
                    weight_einsum(
                        "ebhwc,ecd->ebhwd",
                        depthwise_conv2d_edges(r, dw, s, _DILATION[op] * (_KERNEL[op] // 2), _DILATION[op]),
                        pw,
                    )
                )
                for op, (dw, pw) in zip(_CONV_OPS, firsts)
            ]
        stage1 = [
            batch_norm(conv2d(r, _edge_kernels(dw, pw), s, _DILATION[op] * (_KERNEL[op] // 2), _DILATION[op]))
            for op, (dw, pw) in zip(_CONV_OPS, firsts)
        ]
        # Everything after stage 1 is per edge: one `lax.scan` over the edges keeps the program
        # (hence XLA's compile time) independent of the edge count. Its inputs are the stage-1
        # outputs edges first, so each step reads one contiguous block.
        return [einops.rearrange(y, "b h w (e c) -> e b h w c", e=self.edges) for y in stage1]

    def edge_op(self, name: str, slot: int) -> eqx.Module:
        """The stand-alone op module of edge `slot` for candidate `name`, with these weights."""
        s, c = self.stride, self.channels
        # a shape-only template of the space's own op: every array is replaced below
        op = eqx.filter_eval_shape(DARTS_SPACE.make_op, name, c, s, SEARCH_NORM, key=jax.random.key(0))
        if name == "skip_connect" and s == 2:
            assert self.skip_a is not None and self.skip_b is not None  # stride 2 has them
            return eqx.tree_at(lambda m: (m.weight_a, m.weight_b), op, (self.skip_a[slot], self.skip_b[slot]))
        if name.startswith("sep_conv"):
            prefix = f"sep{_KERNEL[name]}"
            return eqx.tree_at(
                lambda m: (m.first.depthwise, m.first.pointwise, m.second.depthwise, m.second.pointwise),
                op,
                tuple(getattr(self, f"{prefix}_{n}")[slot] for n in ("dw1", "pw1", "dw2", "pw2")),
            )
        if name.startswith("dil_conv"):
            k = _KERNEL[name]
            return eqx.tree_at(
                lambda m: (m.depthwise, m.pointwise),
                op,
                (getattr(self, f"dil{k}_dw")[slot], getattr(self, f"dil{k}_pw")[slot]),
            )
        # no weights (none, pools with a non-affine norm, identity): the template is the op; its
        # non-array leaves (shape structs) are none
        return jax.tree.map(_no_shape_struct, op)


def _no_shape_struct(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        raise AssertionError("a parameter-free DARTS op has an array leaf")
    return leaf


def _second_stage(y, dw, pw, padding: int):
    """A sep conv's second depthwise-pointwise pair: the C++ kernel then a matmul, else (also on
    accelerators) one composed dense convolution."""
    if uses_depthwise_kernel(y):
        return separable_conv2d(y, dw, pw, 1, padding)
    return conv2d(y, separable_kernel(dw, pw), 1, padding)


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
# residuals), several times the temporaries at no gain in speed (experiments/RESULTS.md).
REMAT = jax.checkpoint_policies.nothing_saveable


def remat(fn):
    """`fn` recomputed in the backward pass (`REMAT`), and its backward pass recomputed in the
    one after it. A single `jax.checkpoint` inside a scan keeps its promise for one derivative
    only: the exact second-order step differentiates the backward pass once more, and then the
    scan stacked every intermediate of each source's backward pass (8 of them at [3, 3, B*H*W, C]
    in the first cell). Checkpointing the checkpointed function keeps those residuals to its
    inputs, which halves the exact second-order step's peak memory at the paper's scale at the
    same speed (experiments/RESULTS.md)."""
    return jax.checkpoint(jax.checkpoint(fn, policy=REMAT), policy=REMAT)


def stacked(sources: list[SourceOps]) -> SourceOps:
    """`sources` as one `SourceOps` with a leading source axis, padded to the widest edge count."""
    width = max(ops.edges for ops in sources)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[_pad_edges(ops, width) for ops in sources])


def unstacked(group: SourceOps, row: int, edges: int) -> SourceOps:
    """Row `row` of a stacked `SourceOps`, its first `edges` edges."""
    return _with_edges(group, edges, lambda x: x[row, :edges])
