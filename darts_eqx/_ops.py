"""Candidate operations of the DARTS CNN search space (Liu et al., ICLR 2019), in NHWC.

Unlike `equinox.nn` layers, these act on a whole batch `[batch, height, width, channels]`: batch
normalisation uses the statistics of the batch, as the original does, so the batch axis is part of
each op's meaning rather than something to `vmap` over. Each op is written once for the search and
the evaluation network: it takes a `Normalisation` (`_norm`) and is called `op(x, state) -> (y,
state)`, the state holding running batch-norm statistics in an evaluation network and passing
through (None) in a search.
"""

import math
from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._conv import conv2d, pointwise_conv, separable_conv2d
from ._dtype import float_dtype
from ._norm import BatchNorm, Normalisation, RunningBatchNorm
from ._pool import avg_pool, max_pool

Images = Float[Array, "batch height width channels"]
# The output of an op that may stride or change width: same batch, its own spatial size and width.
Output = Float[Array, "batch _out_height _out_width _out_channels"]
# A cell's first input, which may come from before a reduction: any spatial size and width.
Earlier = Float[Array, "batch _in_height _in_width _in_channels"]

_Model = TypeVar("_Model")
Norm = BatchNorm | RunningBatchNorm


def _uniform(key: PRNGKeyArray, shape: tuple[int, ...], fan_in: int) -> Array:
    """PyTorch's default conv/linear init (kaiming_uniform with a=sqrt(5)), U(-1/sqrt(fan_in),
    1/sqrt(fan_in)), drawn in float32: the values of `jax.random.uniform(key, shape, minval=-bound,
    maxval=bound)`, whether run eagerly or traced, so a key gives the same weights either way (and
    in float64, cast)."""
    bound = 1.0 / math.sqrt(fan_in)
    size = math.prod(shape)
    flat = jax.random.uniform(key, (_draw_length(key, size),), jnp.float32, minval=-bound, maxval=bound)
    return flat[:size].reshape(shape).astype(float_dtype())


def _draw_length(key: PRNGKeyArray, size: int) -> int:
    # `jax.random.uniform` draws each element from the key and its flat index, so a flat draw
    # reshaped is the draw of any shape of that size. Eagerly, each length drawn compiles its own
    # random program, kept for the life of the process. With threefry's partitionable counters
    # (JAX's default since 0.5) a longer draw starts with the same values, so lengths are rounded
    # up to a power of two: a C=8 search network's 47 weight shapes compile 7 programs (build
    # times in experiments/RESULTS.md).
    if jax.threefry_partitionable.value and str(jax.random.key_impl(key)) == "threefry2x32":
        return 1 << max(size - 1, 0).bit_length()
    return size


def jit_build(constructor: Callable[..., _Model], /, *args, key: PRNGKeyArray, **kwargs) -> _Model:
    """`constructor(*args, key=key, **kwargs)` (a model class, say) built as one compiled program.

    The same key gives the same weights, bit for bit, as the eager build `constructor(*args,
    key=key, **kwargs)`. Arrays among the arguments are traced, everything else is static
    (`eqx.filter_jit`).

    On XLA:CPU this is slower than building eagerly: every weight's random draw is a loop of its
    own in the program.
    """
    return eqx.filter_jit(constructor)(*args, key=key, **kwargs)


class Conv2d(eqx.Module):
    """Dense k x k convolution without bias; weights HWIO."""

    weight: Float[Array, "k k cin cout"]
    stride: int = eqx.field(static=True)
    padding: int = eqx.field(static=True)
    dilation: int = eqx.field(static=True)

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        *,
        key: PRNGKeyArray,
    ):
        self.weight = _uniform(key, (kernel, kernel, cin, cout), cin * kernel * kernel)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def __call__(self, x: Images) -> Output:
        return conv2d(x, self.weight, self.stride, self.padding, self.dilation)


class Zero(eqx.Module):
    """The `none` op: zeros at the output resolution."""

    stride: int = eqx.field(static=True)

    def __call__(self, x: Images, state: Any = None) -> tuple[Output, Any]:
        return jnp.zeros_like(x[:, :: self.stride, :: self.stride, :]), state


class Identity(eqx.Module):
    """`skip_connect` at stride 1."""

    def __call__(self, x: Images, state: Any = None) -> tuple[Images, Any]:
        return x, state


class Pool(eqx.Module):
    """3x3 max or average pool (padding 1, average excludes padding), optionally followed by a
    norm (the search's mixed ops normalise pool outputs, as the original)."""

    kind: str = eqx.field(static=True)
    stride: int = eqx.field(static=True)
    norm: Norm | None

    def __init__(self, kind: str, stride: int, norm: Norm | None = None):
        if kind not in ("max", "avg"):
            raise ValueError(f"pool kind (={kind!r}) must be 'max' or 'avg'")
        self.kind, self.stride, self.norm = kind, stride, norm

    def __call__(self, x: Images, state: Any = None) -> tuple[Output, Any]:
        y = max_pool(x, self.stride) if self.kind == "max" else avg_pool(x, self.stride)
        return (y, state) if self.norm is None else self.norm(y, state)


class FactorizedReduce(eqx.Module):
    """Halve the resolution with two stride-2 1x1 convs on offset grids, concatenated: ReLU, then
    conv(x) ++ conv(x[1:, 1:]), then BN. Used for `skip_connect` at stride 2 and to preprocess a
    cell input that comes from before a reduction."""

    weight_a: Float[Array, "cin half"]
    weight_b: Float[Array, "cin half"]
    norm: Norm

    def __init__(self, cin: int, cout: int, norm: Normalisation, *, key: PRNGKeyArray):
        if cout % 2:
            raise ValueError(f"FactorizedReduce output channels (={cout}) must be even")
        ka, kb = jax.random.split(key)
        self.weight_a = _uniform(ka, (cin, cout // 2), cin)
        self.weight_b = _uniform(kb, (cin, cout // 2), cin)
        self.norm = norm(cout)

    def __call__(self, x: Images, state: Any = None) -> tuple[Output, Any]:
        if x.shape[1] % 2 or x.shape[2] % 2:
            raise ValueError(f"FactorizedReduce needs even height and width, got {x.shape[1]}x{x.shape[2]}")
        x = jax.nn.relu(x)
        a = pointwise_conv(x[:, ::2, ::2, :], self.weight_a)
        b = pointwise_conv(x[:, 1::2, 1::2, :], self.weight_b)
        return self.norm(jnp.concatenate([a, b], axis=-1), state)


class ReLUConvBN(eqx.Module):
    """ReLU, k x k convolution, BN."""

    conv: Conv2d
    norm: Norm

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        padding: int,
        norm: Normalisation,
        *,
        key: PRNGKeyArray,
    ):
        self.conv = Conv2d(cin, cout, kernel, stride, padding, key=key)
        self.norm = norm(cout)

    def __call__(self, x: Images, state: Any = None) -> tuple[Output, Any]:
        return self.norm(self.conv(jax.nn.relu(x)), state)


class DilConv(eqx.Module):
    """ReLU, depthwise k x k (dilated) convolution, pointwise 1x1 convolution, BN."""

    depthwise: Float[Array, "k k cin"]
    pointwise: Float[Array, "cin cout"]
    norm: Norm
    stride: int = eqx.field(static=True)
    padding: int = eqx.field(static=True)
    dilation: int = eqx.field(static=True)

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        padding: int,
        dilation: int,
        norm: Normalisation,
        *,
        key: PRNGKeyArray,
    ):
        kd, kp = jax.random.split(key)
        self.depthwise = _uniform(kd, (kernel, kernel, cin), kernel * kernel)
        self.pointwise = _uniform(kp, (cin, cout), cin)
        self.norm = norm(cout)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def __call__(self, x: Images, state: Any = None) -> tuple[Output, Any]:
        y = separable_conv2d(jax.nn.relu(x), self.depthwise, self.pointwise, self.stride, self.padding, self.dilation)
        return self.norm(y, state)


class SepConv(eqx.Module):
    """Two stacked DilConv blocks with dilation 1; only the first one strides."""

    first: DilConv
    second: DilConv

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        padding: int,
        norm: Normalisation,
        *,
        key: PRNGKeyArray,
    ):
        k1, k2 = jax.random.split(key)
        self.first = DilConv(cin, cin, kernel, stride, padding, 1, norm, key=k1)
        self.second = DilConv(cin, cout, kernel, 1, padding, 1, norm, key=k2)

    def __call__(self, x: Images, state: Any = None) -> tuple[Output, Any]:
        return self.second(*self.first(x, state))


# Op constructors `(channels, stride, norm, key) -> op` of the built-in spaces (`SearchSpace`).


def zero(c: int, s: int, norm: Normalisation, key: PRNGKeyArray) -> Zero:
    return Zero(s)


def pool(kind: str, *, normalised_in_search: bool):
    """A 3x3 pool; with `normalised_in_search`, followed by a non-affine BN in the search's mixed
    ops (the DARTS original) and by nothing in an evaluation network."""

    def make(c: int, s: int, norm: Normalisation, key: PRNGKeyArray) -> Pool:
        return Pool(kind, s, norm(c) if normalised_in_search and not norm.running else None)

    return make


def skip(c: int, s: int, norm: Normalisation, key: PRNGKeyArray) -> Identity | FactorizedReduce:
    return Identity() if s == 1 else FactorizedReduce(c, c, norm, key=key)


def sep_conv(k: int):
    return lambda c, s, norm, key: SepConv(c, c, k, s, k // 2, norm, key=key)


def dil_conv(k: int):
    # padding = dilation * (k - 1) / 2 with dilation 2
    return lambda c, s, norm, key: DilConv(c, c, k, s, k - 1, 2, norm, key=key)


def relu_conv_bn(k: int):
    return lambda c, s, norm, key: ReLUConvBN(c, c, k, s, k // 2, norm, key=key)
