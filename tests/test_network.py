"""Supernet fidelity: the weight count of the original, alpha sharing, and the source-fused cell
against the plain per-edge cell it replaces."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import conv_impl, random_images, tree_allclose

import darts_eqx as dx
from darts_eqx import _native
from darts_eqx._conv import uses_depthwise_kernel
from darts_eqx._fused import per_source_view
from darts_eqx._source_ops import SourceOps


def test_weight_count_matches_original():
    # The original DARTS search model at C=16, layers=8, 10 classes reports 1,930,618 weights.
    # The fused cells store each source group's ops stacked, nodes padded with zero edges: the
    # count is of each source's own ops (`per_source_view`), and the padding holds only zeros.
    net = dx.darts_supernet(16, 8, 10, 3, key=jax.random.key(0))
    arch, weights, _ = dx.split_arch(net)
    assert sum(x.size for x in jax.tree.leaves(per_source_view(weights))) == 1_930_618
    stored = sum(x.size for x in jax.tree.leaves(weights))
    nonzero = sum(int(jnp.count_nonzero(x)) for x in jax.tree.leaves(weights))
    assert stored > 1_930_618 and nonzero == sum(
        int(jnp.count_nonzero(x)) for x in jax.tree.leaves(per_source_view(weights))
    )
    assert [x.shape for x in jax.tree.leaves(arch)] == [(14, 8), (14, 8)]
    # the per-edge supernet, as shapes only (building it eagerly takes as long as the rest)
    plain = eqx.filter_eval_shape(dx.darts_supernet, 16, 8, 10, 3, fused=False, key=jax.random.key(0))
    plain_weights = eqx.tree_at(lambda n: n.arch, plain, None)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(plain_weights)) == 1_930_618


def test_alpha_is_small_gaussian_and_split_is_by_type(getkey):
    net = dx.darts_supernet(4, 3, 10, 1, key=getkey())
    arch, weights, static = dx.split_arch(net)
    leaves = jax.tree.leaves(arch, is_leaf=dx.is_arch)
    assert all(isinstance(x, dx.ArchLogits) for x in leaves) and len(leaves) == 2
    assert float(jnp.abs(net.arch.alpha["normal"].logits).max()) < 1e-2
    assert not any(isinstance(x, dx.ArchLogits) for x in jax.tree.leaves(weights, is_leaf=dx.is_arch))
    back = dx.combine_arch(arch, weights, static)
    assert tree_allclose(eqx.filter(back, eqx.is_array), eqx.filter(net, eqx.is_array), rtol=0, atol=0)
    assert [c.reduction for c in net.cells] == [False, True, True]


def test_bad_sizes_are_clear_errors(getkey):
    with pytest.raises(ValueError, match=r"`channels` \(=0\)"):
        dx.darts_supernet(0, 3, 10, 1, key=getkey())
    with pytest.raises(ValueError, match=r"`num_classes` \(=1\)"):
        dx.darts_supernet(4, 3, 1, 1, key=getkey())


@pytest.fixture(scope="module")
def tiny_pair():
    """A fused supernet with non-trivial alpha and its per-edge reference (same weights)."""
    net = dx.darts_supernet(4, 3, 5, 1, key=jax.random.key(7))
    net = eqx.tree_at(
        lambda m: (m.arch.alpha["normal"].logits, m.arch.alpha["reduce"].logits),
        net,
        (jax.random.normal(jax.random.key(8), (14, 8)), jax.random.normal(jax.random.key(9), (14, 8))),
    )
    ref = eqx.tree_at(lambda m: m.cells, net, tuple(c.reference() for c in net.cells))
    return net, ref


def test_fused_cells_compute_the_per_edge_cells(tiny_pair):
    net, ref = tiny_pair
    assert all(isinstance(c, dx.SearchCell) for c in ref.cells)
    x = random_images(jax.random.key(3), n=16)
    forward = eqx.filter_jit(lambda m, x: m(x))
    got = forward(net, x)
    with conv_impl("native"):  # the plain formulation: grouped depthwise convs, JAX's own gradients
        want = forward(ref, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("depthwise", ["kernel", "composed"])
@pytest.mark.parametrize("stride,edges", [(2, 3), (1, 2)])
def test_fused_source_gradients_match_per_edge_mixed_ops(getkey, stride, edges, depthwise, monkeypatch):
    # All edges leaving one state: fused SourceOps vs one plain MixedOp per edge, same weights,
    # with the C++ depthwise kernel and with the composed dense kernels (its fallback).
    if depthwise == "kernel" and _native._compiler() is None:
        pytest.skip("no C++ compiler to build the depthwise kernel")
    monkeypatch.setenv("DARTS_EQX_DEPTHWISE", depthwise)
    assert uses_depthwise_kernel(jnp.zeros(1)) == (depthwise == "kernel")
    ops = SourceOps(4, edges, stride, key=getkey())
    mixed = [dx.MixedOp(dx.DARTS_SPACE, 4, stride, key=getkey()) for _ in range(edges)]
    mixed = [
        eqx.tree_at(lambda m: m.ops, m, tuple(ops.edge_op(name, e) for name in dx.DARTS_SPACE.op_names))
        for e, m in enumerate(mixed)
    ]
    x = random_images(getkey(), n=8, channels=4)
    w = jax.nn.softmax(jax.random.normal(getkey(), (edges, 8)), axis=-1)
    target = jax.random.normal(getkey(), (edges, 8, 8 // stride, 8 // stride, 4))

    def fused_loss(ops, x, w):
        return jnp.sum((ops(x, w) - target) ** 2)

    def plain_loss(mixed, x, w):
        out = jnp.stack([m(x, w[e]) for e, m in enumerate(mixed)])
        return jnp.sum((out - target) ** 2)

    g_fused = eqx.filter_jit(eqx.filter_grad(lambda a: fused_loss(*a)))((ops, x, w))
    with conv_impl("native"):
        g_plain = eqx.filter_jit(eqx.filter_grad(lambda a: plain_loss(*a)))((mixed, x, w))
    np.testing.assert_allclose(g_fused[1], g_plain[1], rtol=1e-3, atol=1e-4)  # input
    np.testing.assert_allclose(g_fused[2], g_plain[2], rtol=1e-3, atol=1e-4)  # mixing weights
    # weights: the fused layout sliced per edge equals each plain op's gradient
    for e in range(edges):
        for name in ("sep_conv_5x5", "dil_conv_3x3", "skip_connect"):
            got = g_fused[0].edge_op(name, e) if name != "skip_connect" or stride == 2 else None
            if got is None:
                continue
            want = g_plain[0][e].ops[dx.DARTS_SPACE.op_names.index(name)]
            assert tree_allclose(eqx.filter(got, eqx.is_array), eqx.filter(want, eqx.is_array), rtol=1e-3, atol=1e-4)


def test_single_node_cells_match_per_edge_cells(getkey):
    net = dx.darts_supernet(4, 2, 5, 1, steps=1, multiplier=1, key=getkey())
    ref = eqx.tree_at(lambda m: m.cells, net, tuple(c.reference() for c in net.cells))
    x = random_images(getkey(), n=8)
    forward = eqx.filter_jit(lambda m, x: m(x))
    got = forward(net, x)
    with conv_impl("native"):
        want = forward(ref, x)
    assert got.shape == (8, 5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
