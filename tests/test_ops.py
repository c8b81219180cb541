"""Each fast formulation of a convolution or pool against the plain reference (XLA's own op and
JAX's own gradient)."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import darts_eqx as dx
from darts_eqx._conv import (
    conv2d,
    depthwise_conv2d,
    kernel_gradient_gate,
    pointwise_conv,
    separable_conv2d,
    weight_einsum,
)
from darts_eqx._norm import SEARCH_NORM, BatchNorm, batch_norm
from darts_eqx._ops import FactorizedReduce, _uniform, jit_build
from darts_eqx._pool import avg_pool, max_pool

CONV_CASES = [
    (1, 1, 0, 1),
    (1, 2, 0, 1),
    (3, 1, 1, 1),
    (3, 2, 1, 1),
    (5, 1, 2, 1),
    (5, 2, 2, 1),
    (3, 1, 2, 2),
    (5, 2, 4, 2),
]


def _value_and_grads(f, *args):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=tuple(range(len(args)))))(*args)


@pytest.mark.parametrize("k,stride,padding,dilation", CONV_CASES)
@pytest.mark.parametrize("size", [(8, 8), (7, 7), (8, 9)])
def test_canonical_conv_gradients_match_autodiff(getkey, k, stride, padding, dilation, size):
    # The hand-written canonical backward convolutions against JAX's own transpose rule.
    x = jax.random.normal(getkey(), (2, *size, 3))
    w = jax.random.normal(getkey(), (k, k, 3, 5))
    got = _value_and_grads(lambda x, w: conv2d(x, w, stride, padding, dilation, impl="canonical"), x, w)
    want = _value_and_grads(
        lambda x, w: lax.conv_general_dilated(
            x,
            w,
            (stride,) * 2,
            ((padding, padding),) * 2,
            rhs_dilation=(dilation,) * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        ),
        x,
        w,
    )
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, h in zip(got[1], want[1]):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k,stride,padding,dilation", [c for c in CONV_CASES if c[0] > 1])
def test_separable_conv_matches_depthwise_then_pointwise(getkey, k, stride, padding, dilation):
    # The canonical formulation (the C++ depthwise kernel, or the composed dense kernel where it is
    # not built) against XLA's grouped depthwise convolution followed by a matmul.
    x = jax.random.normal(getkey(), (2, 8, 8, 4))
    dw = jax.random.normal(getkey(), (k, k, 4))
    pw = jax.random.normal(getkey(), (4, 6))
    got = _value_and_grads(lambda *a: separable_conv2d(*a, stride, padding, dilation, impl="canonical"), x, dw, pw)
    want = _value_and_grads(
        lambda x, dw, pw: jnp.einsum("bhwc,cd->bhwd", depthwise_conv2d(x, dw, stride, padding, dilation), pw), x, dw, pw
    )
    native = _value_and_grads(lambda *a: separable_conv2d(*a, stride, padding, dilation, impl="native"), x, dw, pw)
    for result in (got, native):
        for g, h in zip(result[1], want[1]):
            np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-4)
    # Values compared per element: the summed sines above cancel to ~0.5 from terms of size ~1.
    want_value = jnp.einsum("bhwc,cd->bhwd", depthwise_conv2d(x, dw, stride, padding, dilation), pw)
    for impl in ("canonical", "native"):
        got_value = separable_conv2d(x, dw, pw, stride, padding, dilation, impl=impl)
        np.testing.assert_allclose(got_value, want_value, rtol=1e-5, atol=1e-5)


def test_unknown_conv_impl_is_an_error(getkey, monkeypatch):
    x, w = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2))
    with pytest.raises(ValueError, match="'matmul'"):
        conv2d(x, w, impl="matmul")
    monkeypatch.setenv("DARTS_EQX_CONV", "fast")
    with pytest.raises(ValueError, match="DARTS_EQX_CONV"):
        conv2d(x, w)


@pytest.mark.parametrize("stride", [1, 2])
def test_pools_match_reduce_window(getkey, stride):
    x = jax.random.normal(getkey(), (2, 8, 8, 3))
    window, strides = (1, 3, 3, 1), (1, stride, stride, 1)
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    want_max = lax.reduce_window(x, -jnp.inf, lax.max, window, strides, pads)
    total = lax.reduce_window(x, 0.0, lax.add, window, strides, pads)
    count = lax.reduce_window(jnp.ones_like(x), 0.0, lax.add, window, strides, pads)
    np.testing.assert_allclose(max_pool(x, stride), want_max, rtol=1e-6)
    np.testing.assert_allclose(avg_pool(x, stride), total / count, rtol=1e-6)
    # padding is not counted: a corner averages 4 pixels at stride 1
    if stride == 1:
        np.testing.assert_allclose(avg_pool(x, 1)[:, 0, 0], x[:, :2, :2].mean(axis=(1, 2)), rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_max_pool_gradient_matches_reduce_window_with_ties(getkey, stride):
    # Rounded inputs make ties: the gradient must go to the window's first maximum, as XLA's
    # select-and-scatter (and PyTorch) route it, not be split between the tied pixels.
    window, strides = (1, 3, 3, 1), (1, stride, stride, 1)
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))

    def want(x):
        return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, pads)

    for x in (jax.random.normal(getkey(), (2, 9, 8, 3)), jnp.round(2 * jax.random.normal(getkey(), (2, 9, 8, 3)))):
        got_value, (got_grad,) = _value_and_grads(lambda x: max_pool(x, stride), x)
        want_value, (want_grad,) = _value_and_grads(want, x)
        np.testing.assert_allclose(got_value, want_value, rtol=1e-6)
        np.testing.assert_array_equal(got_grad, want_grad)


@pytest.mark.parametrize("channels", [(5,), (3, 4)])
def test_batch_norm_matches_the_textbook_formula(getkey, channels):
    # The pixel sums are matrix-vector products: same values and gradients as mean/var reductions,
    # with stacked channel axes (the fused cell's edges x channels) normalised per channel.
    x = 3.0 + 2.0 * jax.random.normal(getkey(), (6, 5, 4, *channels))

    def textbook(x):
        mean = jnp.mean(x, axis=(0, 1, 2), keepdims=True)
        return (x - mean) / jnp.sqrt(jnp.var(x, axis=(0, 1, 2), keepdims=True) + 1e-5)

    np.testing.assert_allclose(batch_norm(x), textbook(x), rtol=1e-5, atol=1e-5)
    _, (got_grad,) = _value_and_grads(batch_norm, x)
    _, (want_grad,) = _value_and_grads(textbook, x)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-5)


def test_batchnorm_uses_batch_statistics(getkey):
    x = 3.0 + 2.0 * jax.random.normal(getkey(), (16, 4, 4, 5))
    y, _ = BatchNorm(5, affine=False)(x)
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1.0, rtol=1e-3)
    bn = BatchNorm(5, affine=True)
    assert bn.weight.shape == (5,) and BatchNorm(5, affine=False).weight is None


def test_factorized_reduce_rejects_odd_sizes(getkey):
    fr = FactorizedReduce(4, 4, SEARCH_NORM, key=getkey())
    assert fr(jnp.ones((2, 8, 8, 4)))[0].shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match="even height and width, got 7x7"):
        fr(jnp.ones((2, 7, 7, 4)))
    with pytest.raises(ValueError, match=r"output channels \(=5\) must be even"):
        FactorizedReduce(4, 5, SEARCH_NORM, key=getkey())


_GATED_OPS = {
    "canonical conv": ((2, 7, 7, 3), (3, 3, 3, 4), lambda x, w: conv2d(x, w, 2, 2, 2, impl="canonical")),
    "pointwise conv": ((2, 5, 5, 3), (3, 4), pointwise_conv),
    "edge matmuls": ((2, 3, 4, 4, 3), (2, 3, 5), lambda x, w: weight_einsum("ebhwc,ecd->ebhwd", x, w)),
}


@pytest.mark.parametrize("gate", [0.0, 1.0])
@pytest.mark.parametrize("op", sorted(_GATED_OPS))
def test_kernel_gradient_gate(getkey, gate, op):
    # Inside the gate the input gradient is the plain one; the kernel (weight) gradient is too when
    # the gate is on and exactly zero when it is off. The gate is a traced value (one compiled
    # program). Outside the gate the same functions are plain JAX.
    x_shape, w_shape, fn = _GATED_OPS[op]
    x, w = jax.random.normal(getkey(), x_shape), jax.random.normal(getkey(), w_shape)

    def loss(x, w):
        return jnp.sum(jnp.sin(fn(x, w)))

    @jax.jit
    def gated(x, w, g):
        with kernel_gradient_gate(g):
            return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

    value, (dx, dw) = gated(x, w, jnp.float32(gate))
    want_value, (want_dx, want_dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-6)
    if gate:
        np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(dw, np.zeros_like(dw))


@pytest.mark.parametrize("partitionable", [True, False])
@pytest.mark.parametrize("shape", [(5, 4), (3, 3, 8), (7,), (2, 5, 5, 8)])
def test_uniform_init_is_jax_random_uniform_eagerly_and_traced(shape, partitionable):
    # The values of `jax.random.uniform(key, shape)`, however drawn: eagerly, with a traced key and
    # with a concrete key the traced function captured (and with either threefry counter layout).
    key = jax.random.key(7)
    bound = 1 / math.sqrt(shape[-1])
    with jax.threefry_partitionable(partitionable):
        want = jax.random.uniform(key, shape, jnp.float32, minval=-bound, maxval=bound)
        eager = _uniform(key, shape, shape[-1])
        traced = jax.jit(lambda k: _uniform(k, shape, shape[-1]))(key)
        captured = jax.jit(lambda: _uniform(key, shape, shape[-1]))()
    for got in (eager, traced, captured):
        assert got.dtype == jnp.float32 and got.shape == shape
        np.testing.assert_array_equal(got, want)
    assert float(jnp.max(jnp.abs(eager))) <= bound and float(jnp.std(eager)) > 0.2 * bound


@pytest.mark.parametrize(
    "build",
    [
        lambda key: dx.darts_supernet(4, 3, 3, 1, steps=2, multiplier=2, partial_channels=2, key=key),
        lambda key: dx.nb201.supernet(4, 1, 3, 1, key=key),
        lambda key: dx.darts_network(dx.named_genotype("pdarts"), 4, 3, 3, 1, auxiliary=True, key=key),
    ],
    ids=["search", "nb201", "eval"],
)
def test_a_key_builds_the_same_weights_eagerly_and_under_jit(build):
    key = jax.random.key(0)
    eager = build(key)
    jitted = jit_build(build, key=key)
    assert jax.tree.structure(eager) == jax.tree.structure(jitted)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        if eqx.is_array(a):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        else:  # the evaluation network's norms' training flag
            assert a == b
