"""Convolution primitives in NHWC, with a formulation chosen per backend.

XLA:CPU runs native convolutions inside loop bodies (our scan-fused search) 20-30x slower than
outside them (jax-ml/jax#12868), and its grouped-convolution backward pass is slow everywhere
(jax-ml/jax#13800). On CPU we therefore express every convolution as slices plus matmuls or
elementwise multiply-adds, which XLA:CPU runs at full speed inside loops; on GPU/TPU the native
convolutions are used. Both formulations compute the same function (tested against each other).
"""

import os

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

_IMPLS = ("native", "matmul")


def conv_impl() -> str:
    """The convolution formulation used when tracing: `DARTS_EQX_CONV` if set, else `native` on
    accelerators and `matmul` on CPU."""
    impl = os.environ.get("DARTS_EQX_CONV")
    if impl is None:
        return "matmul" if jax.default_backend() == "cpu" else "native"
    if impl not in _IMPLS:
        raise ValueError(f"DARTS_EQX_CONV (={impl!r}) must be one of {_IMPLS}")
    return impl


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


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


def conv2d(
    x: Float[Array, "b h w cin"],
    weight: Float[Array, "k k cin cout"],
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    impl: str | None = None,
) -> Float[Array, "b ho wo cout"]:
    """Dense 2D convolution (cross-correlation, as PyTorch), HWIO weights, no bias."""
    impl = impl or conv_impl()
    k = weight.shape[0]
    if impl == "native":
        return lax.conv_general_dilated(
            x,
            weight,
            window_strides=(stride, stride),
            padding=((padding, padding), (padding, padding)),
            rhs_dilation=(dilation, dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    if k == 1 and padding == 0:
        return pointwise_conv(x[:, ::stride, ::stride, :], weight[0, 0])
    # im2col: one matmul over the concatenated windows, (i, j, cin) order matching HWIO.
    cols = jnp.concatenate(shifted_windows(x, k, stride, padding, dilation), axis=-1)
    return jnp.einsum("bhwk,ko->bhwo", cols, weight.reshape(-1, weight.shape[-1]))


def depthwise_conv2d(
    x: Float[Array, "b h w c"],
    weight: Float[Array, "k k c"],
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    impl: str | None = None,
) -> Float[Array, "b ho wo c"]:
    """Depthwise 2D convolution (PyTorch `groups=channels`), weights [k, k, channels]."""
    impl = impl or conv_impl()
    k, _, c = weight.shape
    if impl == "native":
        return lax.conv_general_dilated(
            x,
            weight[:, :, None, :],
            window_strides=(stride, stride),
            padding=((padding, padding), (padding, padding)),
            rhs_dilation=(dilation, dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=c,
        )
    # k*k shifted multiply-adds: elementwise work, fast inside XLA:CPU loop bodies.
    views = shifted_windows(x, k, stride, padding, dilation)
    flat = weight.reshape(k * k, 1, 1, 1, c)
    out = views[0] * flat[0]
    for view, w in zip(views[1:], flat[1:]):
        out = out + view * w
    return out


def pointwise_conv(x: Float[Array, "b h w cin"], weight: Float[Array, "cin cout"]) -> Float[Array, "b h w cout"]:
    """1x1 convolution as a matmul over the channel axis."""
    return jnp.einsum("bhwc,cd->bhwd", x, weight)


def max_pool(x: Float[Array, "b h w c"], stride: int) -> Float[Array, "b ho wo c"]:
    """3x3 max pool, padding 1 (padding never wins the max)."""
    views = shifted_windows(x, 3, stride, 1, pad_value=-jnp.inf)
    out = views[0]
    for view in views[1:]:
        out = jnp.maximum(out, view)
    return out


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
