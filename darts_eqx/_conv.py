"""Convolution primitives in NHWC, with a gradient formulation chosen per backend.

XLA:CPU runs a convolution fast only in its canonical form (NHWC input, HWIO kernel, NHWC output).
Outside loops its layout passes rewrite the backward convolutions of `jax.grad` into that form;
inside a loop body (our scan-fused search) they do not, and those convolutions run many times
slower (jax-ml/jax#12868; measured in experiments/RESULTS.md). On CPU `conv2d` therefore carries a custom
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
import contextvars
import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float

from . import _native

_IMPLS = ("native", "canonical")
_DIMS = ("NHWC", "HWIO", "NHWC")


class _TraceOptions(NamedTuple):
    """What the ops traced now are traced with: the gate of `kernel_gradient_gate`, the
    depthwise and convolution formulations an `Execution` chose (None: the environment's), and
    the data-parallel mesh whose one axis splits the batch (None: one device)."""

    gate: Any = None
    depthwise: str | None = None
    conv: str | None = None
    mesh: Any = None


# Context-local (per thread and task), set only for the extent of a `with` block while tracing.
_TRACE = contextvars.ContextVar("darts_eqx_trace", default=_TraceOptions())


@contextlib.contextmanager
def _tracing_with(**changes):
    token = _TRACE.set(_TRACE.get()._replace(**changes))
    try:
        yield
    finally:
        _TRACE.reset(token)


def traced_with(depthwise: str | None = None, conv: str | None = None, mesh=None):
    """Trace the ops inside this context with depthwise formulation `depthwise` (`auto`, `kernel`,
    `composed`) and convolution gradient formulation `conv` (`canonical`, `native`); None keeps
    the enclosing choice (by default `$DARTS_EQX_DEPTHWISE` and `$DARTS_EQX_CONV`). With a
    one-axis `mesh`, activations are split over it along the batch: the C++ kernel, which XLA
    cannot partition, then runs on each device's part (`shard_map`)."""
    if depthwise is not None:
        _native.check_depthwise_mode(depthwise)
    if conv is not None and conv not in _IMPLS:
        raise ValueError(f"conv formulation (={conv!r}) must be one of {_IMPLS}")
    current = _TRACE.get()
    return _tracing_with(depthwise=depthwise or current.depthwise, conv=conv or current.conv, mesh=mesh or current.mesh)


def conv_impl() -> str:
    """The convolution gradient formulation used when tracing: the enclosing `traced_with`'s, else
    `DARTS_EQX_CONV` if set, else `canonical` (hand-written canonical backward convolutions) on CPU
    and `native` (JAX's own rule) on accelerators."""
    impl = _TRACE.get().conv or os.environ.get("DARTS_EQX_CONV")
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


def kernel_gradient_gate(gate):
    """While tracing inside this context, canonical convolutions, the depthwise kernel and the
    pointwise matmuls (`weight_einsum`) compute their weight gradient only when the traced scalar
    `gate` is nonzero (a `lax.cond`; zeros otherwise), their input gradient always.
    `search_step(shared_trace=True)` traces one gradient of (weights, alpha) for all the phases
    of a step and gates the weight gradients off in those that need alpha's gradient alone, so
    XLA compiles the supernet's backward pass once (experiments/RESULTS.md has the trade-off)."""
    return _tracing_with(gate=gate)


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
        gate = _TRACE.get().gate
        if gate is not None:
            return _gated_conv(x, weight, gate, stride, padding, dilation)
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


def without_depthwise_kernel():
    """Trace with the composed dense kernels instead of the C++ depthwise kernel inside this
    context."""
    return _tracing_with(depthwise="composed")


def uses_depthwise_kernel(x: Array) -> bool:
    """Whether depthwise convolutions of `x` traced now go through the C++ kernel: on CPU, with
    the canonical formulation, float32, unless `DARTS_EQX_DEPTHWISE=composed` or inside
    `without_depthwise_kernel`."""
    mode = _TRACE.get().depthwise
    if mode == "composed" or x.dtype != jnp.float32 or conv_impl() != "canonical":
        return False
    return _native.use_depthwise_kernel(mode)


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
    options = _TRACE.get()
    geometry = (stride, padding, dilation)
    if options.mesh is None:
        return _depthwise(x, kernels, options.gate, geometry)
    return _per_device(options.mesh, options.gate, geometry)(x, kernels)


def _per_device(mesh, gate, geometry):
    """`_depthwise` on each device's part of a batch split over `mesh`'s axis, the kernels (and
    gate) replicated. The FFI call has no partitioning rule: under plain `jit` XLA would gather
    the whole batch onto every device. The kernels' gradient is summed over the devices by
    `shard_map`'s transpose; its custom VJP's results carry no varying-axis types, hence
    `check_vma=False`."""
    batch, replicated = PartitionSpec(mesh.axis_names[0]), PartitionSpec()
    gates = () if gate is None else (gate,)

    def body(x, kernels, *gates):
        return _depthwise(x, kernels, gates[0] if gates else None, geometry)

    specs = (batch, replicated) + (replicated,) * len(gates)
    out = PartitionSpec(None, mesh.axis_names[0])  # edges first
    call = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out, check_vma=False)
    return lambda x, kernels: call(x, kernels, *gates)


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


def pointwise_conv(x: Float[Array, "b h w cin"], weight: Float[Array, "cin cout"]) -> Float[Array, "b h w cout"]:
    """1x1 convolution as a matmul over the channel axis."""
    return weight_einsum("bhwc,cd->bhwd", x, weight)


def weight_einsum(spec: str, x, weight) -> Array:
    """`jnp.einsum(spec, x, weight)`; inside `kernel_gradient_gate` its weight gradient is gated
    as the convolutions' kernel gradients are, so the shared trace's alpha-only phases do not
    compute them in vain."""
    gate = _TRACE.get().gate
    if gate is None:
        return jnp.einsum(spec, x, weight)
    return _gated_einsum(x, weight, gate, spec)


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
