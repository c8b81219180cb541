"""Convolution primitives in NHWC, with a gradient formulation chosen per backend.

XLA:CPU runs a convolution fast only in its canonical form (NHWC input, HWIO kernel, NHWC output).
Outside loops its layout passes rewrite the backward convolutions of `jax.grad` into that form;
inside a loop body (our scan-fused search) they do not, and those convolutions run 20-40x slower
(jax-ml/jax#12868; measured in experiments/README.md). On CPU `conv2d` therefore carries a custom
VJP whose two backward convolutions are written canonically by hand, so a convolution costs the
same inside `lax.scan` as outside. Elsewhere the plain autodiff rule is used. A custom VJP has no
forward-mode rule: `jax.jvp`/`jax.hessian` through these convolutions need `DARTS_EQX_CONV=native`
(set before tracing), which gives JAX's own rules at their in-loop cost. XLA:CPU's grouped
(depthwise) convolution is slow in both directions (jax-ml/jax#13800), so on CPU a depthwise
convolution runs as a small C++ kernel through the XLA FFI (`depthwise_conv2d_edges`, built by
`_native`) followed by a matmul; where that kernel is not built (or in a data-parallel search), a
depthwise convolution followed by a pointwise one is one dense convolution with the composed
kernel.
"""

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from . import _native

_IMPLS = ("native", "canonical")
_DIMS = ("NHWC", "HWIO", "NHWC")


def conv_impl() -> str:
    """The convolution gradient formulation used when tracing: `DARTS_EQX_CONV` if set, else
    `canonical` (hand-written canonical backward convolutions) on CPU and `native` (JAX's own
    rule) on accelerators."""
    impl = os.environ.get("DARTS_EQX_CONV")
    if impl is None:
        return "canonical" if jax.default_backend() == "cpu" else "native"
    if impl not in _IMPLS:
        raise ValueError(f"DARTS_EQX_CONV (={impl!r}) must be one of {_IMPLS}")
    return impl


def _conv(x, w, stride: int, padding, dilation: int):
    """Canonical NHWC x HWIO convolution; `padding` is an int or a (low, high) pair per axis."""
    if isinstance(padding, int):
        padding = [(padding, padding)] * 2
    return lax.conv_general_dilated(
        x, w, (stride, stride), padding, rhs_dilation=(dilation, dilation), dimension_numbers=_DIMS
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _canonical_conv(x, w, stride: int, padding: int, dilation: int):
    return _conv(x, w, stride, padding, dilation)


def _canonical_fwd(x, w, stride, padding, dilation):
    return _canonical_conv(x, w, stride, padding, dilation), (x, w)


def _input_gradient(stride, padding, dilation, x, w, g):
    # The stride-dilated cotangent (explicit zeros, not lhs_dilation, which is not canonical)
    # correlated with the flipped, in/out-swapped kernel.
    span = dilation * (w.shape[0] - 1)
    sizes, outs = x.shape[1:3], g.shape[1:3]
    if stride > 1:
        zero = jnp.zeros((), g.dtype)
        g = lax.pad(g, zero, ((0, 0, 0), (0, 0, stride - 1), (0, 0, stride - 1), (0, 0, 0)))
    w_flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    pads = [(span - padding, size - stride * (out - 1) - 1 + padding) for size, out in zip(sizes, outs)]
    return _conv(g, w_flipped, 1, pads, dilation)


def _kernel_gradient(stride, padding, dilation, x, w, g):
    # Batch and feature axes swapped so that it too is an NHWC x HWIO convolution: input
    # [cin, H, W, batch], kernel = cotangent [h, w, batch, cout], output [cin, k, k, cout].
    # (The window strides by the dilation and the "kernel" is dilated by the stride.)
    span = dilation * (w.shape[0] - 1)
    sizes, outs = x.shape[1:3], g.shape[1:3]
    pads = [(padding, span + stride * (out - 1) + 1 - size - padding) for size, out in zip(sizes, outs)]
    dw = _conv(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), dilation, pads, stride)
    return dw.transpose(1, 2, 0, 3)


def _canonical_bwd(stride, padding, dilation, residuals, g):
    x, w = residuals
    return _input_gradient(stride, padding, dilation, x, w, g), _kernel_gradient(stride, padding, dilation, x, w, g)


_canonical_conv.defvjp(_canonical_fwd, _canonical_bwd)

_GATES = []  # traced scalars set by `kernel_gradient_gate` while a step is being traced


@contextlib.contextmanager
def kernel_gradient_gate(gate):
    """While tracing inside this context, canonical convolutions, the depthwise kernel and the
    pointwise matmuls (`weight_einsum`) compute their weight gradient only when the traced scalar
    `gate` is nonzero (a `lax.cond`; zeros otherwise), their input gradient always.
    `search_step(shared_trace=True)` traces one gradient of (weights, alpha) for all the phases
    of a step and gates the weight gradients off in those that need alpha's gradient alone, so
    XLA compiles the supernet's backward pass once (experiments/README.md has the trade-off)."""
    _GATES.append(gate)
    try:
        yield
    finally:
        _GATES.pop()


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gated_conv(x, w, gate, stride: int, padding: int, dilation: int):
    return _conv(x, w, stride, padding, dilation)


def _gated_fwd(x, w, gate, stride, padding, dilation):
    return _conv(x, w, stride, padding, dilation), (x, w, gate)


def _gated_bwd(stride, padding, dilation, residuals, g):
    x, w, gate = residuals

    def both():
        return _canonical_bwd(stride, padding, dilation, (x, w), g)

    def input_only():
        return _input_gradient(stride, padding, dilation, x, w, g), jnp.zeros_like(w)

    dx, dw = lax.cond(gate != 0, both, input_only)
    return dx, dw, jnp.zeros_like(gate)


_gated_conv.defvjp(_gated_fwd, _gated_bwd)


def _gated_gradient(gate, weight_gradient, weight):
    """`weight_gradient()` where the traced `gate` is nonzero, zeros shaped as `weight` otherwise
    (a `lax.cond`, so the off branch costs nothing)."""
    return lax.cond(gate != 0, weight_gradient, lambda: jnp.zeros_like(weight))


def conv2d(
    x: Float[Array, "b h w cin"],
    weight: Float[Array, "k k cin cout"],
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    impl: str | None = None,
) -> Float[Array, "b ho wo cout"]:
    """Dense 2D convolution (cross-correlation, as PyTorch), HWIO weights, no bias; `impl` picks
    the gradient formulation (default `conv_impl()`), both compute the same function."""
    impl = impl or conv_impl()
    if impl == "canonical":
        if _GATES:
            return _gated_conv(x, weight, _GATES[-1], stride, padding, dilation)
        return _canonical_conv(x, weight, stride, padding, dilation)
    if impl != "native":
        raise ValueError(f"conv impl (={impl!r}) must be one of {_IMPLS}")
    return _conv(x, weight, stride, padding, dilation)


def depthwise_conv2d(
    x: Float[Array, "b h w c"],
    weight: Float[Array, "k k c"],
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> Float[Array, "b ho wo c"]:
    """Depthwise 2D convolution (PyTorch `groups=channels`), weights [k, k, channels]: XLA's
    grouped convolution, the reference formulation."""
    return lax.conv_general_dilated(
        x,
        weight[:, :, None, :],
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=_DIMS,
        feature_group_count=weight.shape[-1],
    )


_KERNEL_OFF = []  # pushed by `without_depthwise_kernel` while a step is being traced


@contextlib.contextmanager
def without_depthwise_kernel():
    """Trace with the composed dense kernels instead of the C++ depthwise kernel inside this
    context. The data-parallel search uses it: the FFI call has no partitioning rule, so XLA
    would gather the whole batch onto every device to run it."""
    _KERNEL_OFF.append(True)
    try:
        yield
    finally:
        _KERNEL_OFF.pop()


def uses_depthwise_kernel(x: Array) -> bool:
    """Whether depthwise convolutions of `x` traced now go through the C++ kernel: on CPU, with
    the canonical formulation, float32, unless `DARTS_EQX_DEPTHWISE=composed` or inside
    `without_depthwise_kernel`."""
    if _KERNEL_OFF or x.dtype != jnp.float32 or conv_impl() != "canonical":
        return False
    return _native.use_depthwise_kernel()


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise ValueError(
            f"input of size {size} is too small for a {kernel}x{kernel} window with dilation {dilation}, "
            f"stride {stride} and padding {padding}"
        )
    return out


def _kernel_call(name: str, shape, geometry, *args):
    stride, padding, dilation = (np.int64(v) for v in geometry)
    call = jax.ffi.ffi_call(
        _native.TARGETS[name][0], jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential"
    )
    return call(*args, stride=stride, padding=padding, dilation=dilation)


# The kernel's three functions are bilinear and each one's VJP is made of the other two, so the
# derivatives of every order that DARTS takes (the exact second-order step differentiates the
# weight gradient) stay on the kernel. `gate` is `kernel_gradient_gate`'s scalar, or None.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _depthwise(x, kernels, gate, geometry):
    (b, h, w, c), (e, k) = x.shape, kernels.shape[:2]
    shape = (e, b, _output_size(h, k, *geometry), _output_size(w, k, *geometry), c)
    return _kernel_call("forward", shape, geometry, x, kernels)


def _depthwise_fwd(x, kernels, gate, geometry):
    return _depthwise(x, kernels, gate, geometry), (x, kernels, gate)


def _depthwise_bwd(geometry, residuals, g):
    x, kernels, gate = residuals
    dx = _depthwise_gradient(kernels, g, x.shape, geometry, "input_gradient")

    def kernel_gradient():
        return _depthwise_gradient(x, g, kernels.shape, geometry, "kernel_gradient")

    if gate is None:
        return dx, kernel_gradient(), None
    return dx, _gated_gradient(gate, kernel_gradient, kernels), jnp.zeros_like(gate)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_gradient(operand, g, shape, geometry, wrt: str):
    """`_depthwise`'s VJP of cotangent `g` with respect to `wrt`: "input_gradient" (`operand` is
    the kernels) or "kernel_gradient" (`operand` is the input); `shape` is the result's."""
    return _kernel_call(wrt, shape, geometry, operand, g)


def _gradient_fwd(operand, g, shape, geometry, wrt):
    return _depthwise_gradient(operand, g, shape, geometry, wrt), (operand, g)


def _gradient_bwd(shape, geometry, wrt, residuals, u):
    operand, g = residuals
    if wrt == "input_gradient":  # u is an input cotangent, operand the kernels
        return _depthwise_gradient(u, g, operand.shape, geometry, "kernel_gradient"), _depthwise(
            u, operand, None, geometry
        )
    return _depthwise_gradient(u, g, operand.shape, geometry, "input_gradient"), _depthwise(operand, u, None, geometry)


_depthwise_gradient.defvjp(_gradient_fwd, _gradient_bwd)


def depthwise_conv2d_edges(
    x: Float[Array, "b h w c"],
    kernels: Float[Array, "e k k c"],
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> Float[Array, "e b ho wo c"]:
    """Depthwise convolutions of one float32 input by `e` kernels (one per DARTS edge), edges
    first, through the C++ kernel (CPU; `uses_depthwise_kernel` says whether it is built).
    Inside `kernel_gradient_gate` the kernel gradient is gated as the canonical convolutions' is."""
    if x.ndim != 4 or kernels.ndim != 4 or kernels.shape[1] != kernels.shape[2] or kernels.shape[3] != x.shape[3]:
        raise ValueError(
            f"depthwise_conv2d_edges needs x [b, h, w, c] and kernels [e, k, k, c], got {x.shape} and {kernels.shape}"
        )
    if x.dtype != jnp.float32 or kernels.dtype != jnp.float32:
        raise ValueError(f"the depthwise kernel is float32 only, got {x.dtype} and {kernels.dtype}")
    if stride < 1 or dilation < 1 or padding < 0:
        raise ValueError(f"stride (={stride}) and dilation (={dilation}) must be >= 1, padding (={padding}) >= 0")
    _native.require_depthwise_kernel()
    return _depthwise(x, kernels, _GATES[-1] if _GATES else None, (stride, padding, dilation))


def separable_kernel(
    depthwise: Float[Array, "k k cin"], pointwise: Float[Array, "cin cout"]
) -> Float[Array, "k k cin cout"]:
    """The dense kernel of a depthwise convolution followed by a pointwise one."""
    return depthwise[:, :, :, None] * pointwise[None, None]


def separable_conv2d(
    x: Float[Array, "b h w cin"],
    depthwise: Float[Array, "k k cin"],
    pointwise: Float[Array, "cin cout"],
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    impl: str | None = None,
) -> Float[Array, "b ho wo cout"]:
    """Depthwise k x k convolution then pointwise 1x1 convolution. On CPU the depthwise one is the
    C++ kernel where it is built; otherwise the pair is one dense convolution with the composed
    kernel (k*k*cin*cout multiply-adds per pixel instead of k*k*cin + cin*cout, but one fast XLA:CPU
    kernel instead of its slow grouped convolution). With `impl="native"` (accelerators) the two
    convolutions are XLA's own, applied in turn."""
    impl = impl or conv_impl()
    if impl == "native":
        return pointwise_conv(depthwise_conv2d(x, depthwise, stride, padding, dilation), pointwise)
    if impl == "canonical" and uses_depthwise_kernel(x):
        return pointwise_conv(depthwise_conv2d_edges(x, depthwise[None], stride, padding, dilation)[0], pointwise)
    return conv2d(x, separable_kernel(depthwise, pointwise), stride, padding, dilation, impl)


def shifted_views(
    x: Float[Array, "b h w c"],
    offsets,
    stride: int,
    padding: int,
    pad_value: float = 0.0,
) -> list[Float[Array, "b ho wo c"]]:
    """For each `(dy, dx)` in `offsets`, the view of `x` padded by `padding` that output pixel
    `(i, j)` reads at `(i * stride + dy, j * stride + dx)` (offsets relative to the window's
    top-left corner minus `padding`). Each is a plain strided slice, so gradients are cheap pads."""
    b, h, w, c = x.shape
    span_y = max(dy for dy, _ in offsets) - min(dy for dy, _ in offsets)
    span_x = max(dx for _, dx in offsets) - min(dx for _, dx in offsets)
    ho = (h + 2 * padding - span_y - 1) // stride + 1
    wo = (w + 2 * padding - span_x - 1) // stride + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"input of spatial size {h}x{w} is too small for a {span_y + 1}x{span_x + 1} window "
            f"with stride {stride} and padding {padding}"
        )
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=pad_value)
    return [
        lax.slice(
            x,
            (0, padding + dy, padding + dx, 0),
            (b, padding + dy + stride * (ho - 1) + 1, padding + dx + stride * (wo - 1) + 1, c),
            (1, stride, stride, 1),
        )
        for dy, dx in offsets
    ]


def shifted_windows(
    x: Float[Array, "b h w c"],
    kernel: int,
    stride: int,
    padding: int,
    dilation: int = 1,
    pad_value: float = 0.0,
) -> list[Float[Array, "b ho wo c"]]:
    """The kernel*kernel strided views of a padded input that a k x k (dilated) window visits,
    in row-major kernel order."""
    offsets = [(i * dilation - padding, j * dilation - padding) for i in range(kernel) for j in range(kernel)]
    return shifted_views(x, offsets, stride, padding, pad_value)


def pointwise_conv(x: Float[Array, "b h w cin"], weight: Float[Array, "cin cout"]) -> Float[Array, "b h w cout"]:
    """1x1 convolution as a matmul over the channel axis."""
    return weight_einsum("bhwc,cd->bhwd", x, weight)


def weight_einsum(spec: str, x, weight):
    """`jnp.einsum(spec, x, weight)`; inside `kernel_gradient_gate` its weight gradient is gated
    as the convolutions' kernel gradients are. (The pointwise matmuls' weight gradients were
    what the shared trace's alpha-only phases still computed in vain: gated, the shared
    second-order step ran 0.242-0.246 against 0.219-0.235 steps/s at C=8, layers=5, in three
    alternating pairs, compile 2-5 s longer.)"""
    if not _GATES:
        return jnp.einsum(spec, x, weight)
    return _gated_einsum(x, weight, _GATES[-1], spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gated_einsum(x, weight, gate, spec):
    return jnp.einsum(spec, x, weight)


def _gated_einsum_fwd(x, weight, gate, spec):
    return jnp.einsum(spec, x, weight), (x, weight, gate)


def _gated_einsum_bwd(spec, residuals, g):
    x, weight, gate = residuals
    (dx,) = jax.vjp(lambda x: jnp.einsum(spec, x, weight), x)[1](g)

    def weight_gradient():
        return jax.vjp(lambda w: jnp.einsum(spec, x, w), weight)[1](g)[0]

    return dx, _gated_gradient(gate, weight_gradient, weight), jnp.zeros_like(gate)


_gated_einsum.defvjp(_gated_einsum_fwd, _gated_einsum_bwd)


def max_pool(x: Float[Array, "b h w c"], stride: int) -> Float[Array, "b ho wo c"]:
    """3x3 max pool, padding 1 (padding never wins the max). The gradient goes to the first
    maximum of each window in row-major order, as `lax.reduce_window`'s and PyTorch's do."""
    return _max_pool(x, stride, x.shape)


# The input's shape is a static argument, not a residual: residuals must be arrays when the
# pool is differentiated inside a nested `jax.jit` (as `_search._loss_gradient` is).
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x, stride: int, shape):
    return _max_pool_fwd(x, stride, shape)[0]


def _max_pool_fwd(x, stride, shape):
    # The winner's window position is kept (int8) so the backward pass is 9 masked pads of the
    # cotangent. Differentiating the chain of `maximum`s instead made XLA:CPU recompute the chain
    # per tap inside one fusion: ~30 ms per pool at batch 32, 32x32x8 (experiments/README.md).
    views = shifted_windows(x, 3, stride, 1, pad_value=-jnp.inf)
    out, winner = views[0], jnp.zeros(views[0].shape, jnp.int8)
    for tap, view in enumerate(views[1:], start=1):
        wins = view > out
        out = jnp.where(wins, view, out)
        winner = jnp.where(wins, jnp.int8(tap), winner)
    return out, winner


def _max_pool_bwd(stride, shape, winner, g):
    x_spec = jax.ShapeDtypeStruct(shape, g.dtype)
    spread = jax.linear_transpose(lambda x: shifted_windows(x, 3, stride, 1), x_spec)
    zero = jnp.zeros((), g.dtype)
    return spread([jnp.where(winner == tap, g, zero) for tap in range(9)])


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def avg_pool(x: Float[Array, "b h w c"], stride: int) -> Float[Array, "b ho wo c"]:
    """3x3 average pool, padding 1, padding not counted (PyTorch `count_include_pad=False`)."""
    views = shifted_windows(x, 3, stride, 1)
    total = views[0]
    for view in views[1:]:
        total = total + view
    # The count of real pixels under each window depends only on the shape: a trace-time constant.
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = sum(shifted_windows(ones, 3, stride, 1))
    return total / count
