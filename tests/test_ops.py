"""Each CPU formulation of a convolution or pool against XLA's native op (the plain reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from darts_eqx._conv import avg_pool, conv2d, depthwise_conv2d, max_pool
from darts_eqx._ops import BatchNorm, FactorizedReduce


@pytest.mark.parametrize(
    "k,stride,padding,dilation", [(1, 1, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1), (3, 1, 2, 2), (5, 2, 4, 2)]
)
def test_conv2d_matmul_matches_native(getkey, k, stride, padding, dilation):
    x = jax.random.normal(getkey(), (2, 8, 8, 3))
    w = jax.random.normal(getkey(), (k, k, 3, 5))
    got = conv2d(x, w, stride, padding, dilation, impl="matmul")
    want = conv2d(x, w, stride, padding, dilation, impl="native")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "k,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1), (3, 2, 2, 2), (5, 1, 4, 2)]
)
def test_depthwise_matmul_matches_native(getkey, k, stride, padding, dilation):
    x = jax.random.normal(getkey(), (2, 8, 8, 4))
    w = jax.random.normal(getkey(), (k, k, 4))
    got = depthwise_conv2d(x, w, stride, padding, dilation, impl="matmul")
    want = depthwise_conv2d(x, w, stride, padding, dilation, impl="native")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


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


def test_batchnorm_uses_batch_statistics(getkey):
    x = 3.0 + 2.0 * jax.random.normal(getkey(), (16, 4, 4, 5))
    y = BatchNorm(5, affine=False)(x)
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1.0, rtol=1e-3)
    bn = BatchNorm(5, affine=True)
    assert bn.weight.shape == (5,) and BatchNorm(5, affine=False).weight is None


def test_factorized_reduce_rejects_odd_sizes(getkey):
    fr = FactorizedReduce(4, 4, False, key=getkey())
    assert fr(jnp.ones((2, 8, 8, 4))).shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match="even height and width, got 7x7"):
        fr(jnp.ones((2, 7, 7, 4)))
    with pytest.raises(ValueError, match=r"output channels \(=5\) must be even"):
        FactorizedReduce(4, 5, False, key=getkey())
