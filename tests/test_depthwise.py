"""The C++ depthwise-convolution kernel (XLA FFI, CPU) against XLA's grouped convolution, its
derivatives of first and second order, the kernel-gradient gate, and how it is chosen and built."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from darts_eqx import _native
from darts_eqx._conv import (
    depthwise_conv2d,
    depthwise_conv2d_edges,
    kernel_gradient_gate,
    separable_conv2d,
    uses_depthwise_kernel,
    without_depthwise_kernel,
)

# (kernel, stride, padding, dilation): every geometry of the DARTS ops, and a few that are not
# (no padding; more padding than the window, which takes the kernel's general stride-1 path)
GEOMETRIES = [
    (3, 1, 1, 1),
    (5, 1, 2, 1),
    (3, 2, 1, 1),
    (5, 2, 2, 1),
    (3, 1, 2, 2),
    (5, 2, 4, 2),
    (3, 1, 0, 1),
    (3, 1, 3, 1),
]


@pytest.fixture(autouse=True)
def _kernel(monkeypatch):
    # A machine without a C++ compiler runs the composed kernels (tested elsewhere); where there
    # is one, the kernel must build: DARTS_EQX_DEPTHWISE=kernel makes a failed build an error.
    if _native._compiler() is None:
        pytest.skip("no C++ compiler to build the depthwise kernel")
    monkeypatch.setenv("DARTS_EQX_DEPTHWISE", "kernel")
    assert uses_depthwise_kernel(jnp.zeros(1))


def _reference(x, kernels, stride, padding, dilation):
    return jnp.stack([depthwise_conv2d(x, k, stride, padding, dilation) for k in kernels])


@pytest.mark.parametrize("k,stride,padding,dilation", GEOMETRIES)
# Rows of 24, 9, 80 and 168 floats (the kernel sums blocks of 64 and a remainder); 19 images make
# blocks of several images in the kernel gradient
@pytest.mark.parametrize("shape,edges", [((2, 8, 8, 3), 2), ((3, 7, 9, 1), 1), ((19, 9, 10, 8), 3), ((2, 5, 21, 8), 2)])
def test_kernel_matches_grouped_convolution(getkey, k, stride, padding, dilation, shape, edges):
    x = jax.random.normal(getkey(), shape)
    kernels = jax.random.normal(getkey(), (edges, k, k, shape[-1]))
    got, got_vjp = jax.vjp(lambda x, w: depthwise_conv2d_edges(x, w, stride, padding, dilation), x, kernels)
    want, want_vjp = jax.vjp(lambda x, w: _reference(x, w, stride, padding, dilation), x, kernels)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    cotangent = jax.random.normal(getkey(), got.shape)
    for g, h in zip(got_vjp(cotangent), want_vjp(cotangent)):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 1, 1, 1), (5, 2, 4, 2)])
def test_second_derivatives_match_grouped_convolution(getkey, k, stride, padding, dilation):
    # The exact second-order step differentiates a gradient: the VJPs of the kernel's input and
    # kernel gradients (each made of the other two) against JAX's own rules.
    x = jax.random.normal(getkey(), (2, 8, 8, 3))
    kernels = jax.random.normal(getkey(), (2, k, k, 3))

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, stride, padding, dilation)))

    def gradient_norm(conv):
        return jax.jit(jax.grad(lambda x, w: sum(jnp.sum(g**2) for g in jax.grad(loss(conv), (0, 1))(x, w)), (0, 1)))

    for g, h in zip(gradient_norm(depthwise_conv2d_edges)(x, kernels), gradient_norm(_reference)(x, kernels)):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-3)


def test_gate_turns_off_the_kernel_gradient_only(getkey):
    x = jax.random.normal(getkey(), (2, 8, 8, 4))
    kernels = jax.random.normal(getkey(), (3, 5, 5, 4))

    def grads(gate):
        def loss(x, w):
            with kernel_gradient_gate(gate):
                return jnp.sum(jnp.sin(depthwise_conv2d_edges(x, w, 1, 2)))

        return jax.jit(jax.grad(loss, (0, 1)))(x, kernels)

    ungated = jax.grad(lambda x, w: jnp.sum(jnp.sin(depthwise_conv2d_edges(x, w, 1, 2))), (0, 1))(x, kernels)
    on, off = grads(jnp.float32(1)), grads(jnp.float32(0))
    np.testing.assert_array_equal(on[0], ungated[0])
    np.testing.assert_array_equal(on[1], ungated[1])
    np.testing.assert_array_equal(off[0], ungated[0])
    np.testing.assert_array_equal(off[1], np.zeros_like(kernels))
    assert np.abs(ungated[1]).max() > 0


def test_separable_conv_with_the_kernel_matches_composed_kernel(getkey, monkeypatch):
    x = jax.random.normal(getkey(), (2, 8, 8, 4))
    dw, pw = jax.random.normal(getkey(), (5, 5, 4)), jax.random.normal(getkey(), (4, 6))

    def run():  # traced afresh: the formulation is read when tracing
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(separable_conv2d(*a, 2, 4, 2))), (0, 1, 2)))(
            x, dw, pw
        )

    got = run()
    monkeypatch.setenv("DARTS_EQX_DEPTHWISE", "composed")
    assert not uses_depthwise_kernel(x)
    want = run()
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-4)


def test_kernel_results_are_reproducible(getkey):
    # Summation order is fixed whatever the threads do: bit-for-bit resume depends on it.
    x = jax.random.normal(getkey(), (16, 8, 8, 8))
    kernels = jax.random.normal(getkey(), (4, 3, 3, 8))
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(depthwise_conv2d_edges(x, w, 1, 1))), (0, 1)))
    first = grad(x, kernels)
    for _ in range(5):
        for a, b in zip(first, grad(x, kernels)):
            np.testing.assert_array_equal(a, b)


def test_bad_inputs_are_clear_errors():
    # The function's own checks, for callers without jaxtyping's runtime checks (which this test
    # suite turns on, and which would stop bad shapes first).
    conv = getattr(depthwise_conv2d_edges, "__wrapped__", depthwise_conv2d_edges)
    with pytest.raises(ValueError, match="input of size 3 is too small for a 5x5 window with dilation 2"):
        depthwise_conv2d_edges(jnp.zeros((1, 3, 3, 2)), jnp.zeros((1, 5, 5, 2)), 1, 0, 2)
    x = jnp.zeros((1, 8, 8, 4))
    for kernels in (jnp.zeros((2, 3, 3, 2)), jnp.zeros((2, 3, 5, 4)), jnp.zeros((3, 3, 4))):
        with pytest.raises(ValueError, match=re.escape(f"kernels [e, k, k, c], got (1, 8, 8, 4) and {kernels.shape}")):
            conv(x, kernels)
    with pytest.raises(ValueError, match="padding \\(=-1\\) >= 0"):
        conv(x, jnp.zeros((1, 3, 3, 4)), 1, -1)
    with pytest.raises(ValueError, match="stride \\(=0\\)"):
        conv(x, jnp.zeros((1, 3, 3, 4)), 0, 1)
    with pytest.raises(ValueError, match="float32 only, got float16"):
        conv(x.astype(jnp.float16), jnp.zeros((1, 3, 3, 4), jnp.float16))


def test_without_depthwise_kernel_turns_it_off_while_tracing():
    x = jnp.zeros((1, 8, 8, 4))
    with without_depthwise_kernel():
        assert not uses_depthwise_kernel(x)
    assert uses_depthwise_kernel(x)


def test_bad_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("DARTS_EQX_DEPTHWISE", "fast")
    with pytest.raises(ValueError, match="DARTS_EQX_DEPTHWISE \\(='fast'\\) must be one of"):
        uses_depthwise_kernel(jnp.zeros(1))


def test_failed_build_falls_back_or_fails_as_asked(monkeypatch, tmp_path, caplog):
    # A machine without a working compiler: `auto` logs why and uses the composed kernels,
    # `kernel` stops with the compiler's error.
    broken = tmp_path / "cxx"
    broken.write_text("#!/bin/sh\necho 'no compiler here' >&2\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _native._load.cache_clear()
    _native._warned.clear()
    try:
        monkeypatch.setenv("DARTS_EQX_DEPTHWISE", "kernel")
        with pytest.raises(RuntimeError, match="(?s)could not be built.*exit 3.*no compiler here"):
            uses_depthwise_kernel(jnp.zeros(1))
        _native._load.cache_clear()
        monkeypatch.setenv("DARTS_EQX_DEPTHWISE", "auto")
        with caplog.at_level(logging.WARNING, logger="darts_eqx"):
            assert not uses_depthwise_kernel(jnp.zeros(1))
        assert "composed kernels instead" in caplog.text and "no compiler here" in caplog.text
        assert not [f for f in (tmp_path / "cache").rglob("*") if f.is_file()]  # no half-built library left
    finally:
        _native._load.cache_clear()


def test_composed_mode_and_other_dtypes_do_not_use_the_kernel(monkeypatch):
    assert not uses_depthwise_kernel(jnp.zeros(1, jnp.bfloat16))
    monkeypatch.setenv("DARTS_EQX_CONV", "native")
    assert not uses_depthwise_kernel(jnp.zeros(1))
    monkeypatch.setenv("DARTS_EQX_CONV", "canonical")
    monkeypatch.setenv("DARTS_EQX_DEPTHWISE", "composed")
    assert not uses_depthwise_kernel(jnp.zeros(1))
