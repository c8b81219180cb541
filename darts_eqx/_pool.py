"""3x3 max and average pooling (padding 1) in NHWC, written as strided views of the padded input:
XLA:CPU runs the views' sums and their transposes as plain fused loops, and the max pool's backward
pass is a custom VJP that sends each gradient to the first maximum of its window."""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float


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


def max_pool(x: Float[Array, "b h w c"], stride: int) -> Float[Array, "b ho wo c"]:
    """3x3 max pool, padding 1 (padding never wins the max). The gradient goes to the first
    maximum of each window in row-major order, as `lax.reduce_window`'s and PyTorch's do."""
    return _max_pool(x, stride, x.shape)


# The input's shape is a static argument, not a residual: residuals must be arrays when the
# pool is differentiated inside a nested `jax.jit` (as `_step._loss_gradient` is).
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x, stride: int, shape):
    return _max_pool_fwd(x, stride, shape)[0]


def _max_pool_fwd(x, stride, shape):
    # The winner's window position is kept (int8) so the backward pass is 9 masked pads of the
    # cotangent. Differentiating the chain of `maximum`s instead made XLA:CPU recompute the chain
    # per tap inside one fusion (experiments/RESULTS.md).
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
