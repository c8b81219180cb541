"""The evaluation network: a discrete genotype trained from scratch (Liu et al., 2019, Sec. 3.2,
App. A.2), as the original `NetworkCIFAR`.

Stem 3x3 conv to 3C + BN; `layers` cells, reductions (stride 2, channels x2) at layers//3 and
2*layers//3; each edge its genotype op with affine BN; optional auxiliary head after the 2*layers//3
cell; global average pool and a linear classifier. Batch norm keeps running statistics for
inference in an `eqx.nn.State`, so a call is `model(x, state, train=..., drop_prob=..., key=...)
-> (logits, aux_logits, state)`: train/inference mode is an explicit argument, nothing is global.
Drop-path zeroes whole samples of a non-identity edge with probability `drop_prob` (scaled by
1/keep) in training mode.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._conv import conv2d, pointwise_conv, separable_conv2d
from ._genotype import Genotype
from ._network import reduction_layers
from ._ops import _uniform
from ._pool import avg_pool, max_pool

Images = Float[Array, "batch height width channels"]


class Norm(eqx.Module):
    """Affine batch norm with running statistics (PyTorch's momentum 0.1, unbiased running
    variance); training mode normalises with the batch's statistics and updates the running ones."""

    weight: Float[Array, " channels"]
    bias: Float[Array, " channels"]
    index: eqx.nn.StateIndex
    momentum: float = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5):
        self.weight = jnp.ones(channels)
        self.bias = jnp.zeros(channels)
        self.index = eqx.nn.StateIndex((jnp.zeros(channels), jnp.ones(channels)))
        self.momentum, self.eps = momentum, eps

    def __call__(self, x: Images, state: eqx.nn.State, train: bool):
        if train:
            mean = jnp.mean(x, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(x - mean[None, None, None, :]), axis=(0, 1, 2))
            count = x.shape[0] * x.shape[1] * x.shape[2]
            running_mean, running_var = state.get(self.index)
            m = self.momentum
            unbiased = jax.lax.stop_gradient(var) * count / max(count - 1, 1)
            state = state.set(
                self.index,
                ((1 - m) * running_mean + m * jax.lax.stop_gradient(mean), (1 - m) * running_var + m * unbiased),
            )
        else:
            mean, var = state.get(self.index)
        scale = self.weight * jax.lax.rsqrt(var + self.eps)
        return x * scale[None, None, None, :] + (self.bias - mean * scale)[None, None, None, :], state


class ConvBN(eqx.Module):
    """ReLU, k x k convolution without bias, BN (`ReLUConvBN`)."""

    weight: Float[Array, "k k cin cout"]
    norm: Norm
    stride: int = eqx.field(static=True)
    padding: int = eqx.field(static=True)

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int, *, key: PRNGKeyArray):
        self.weight = _uniform(key, (kernel, kernel, cin, cout), cin * kernel * kernel)
        self.norm = Norm(cout)
        self.stride, self.padding = stride, padding

    def __call__(self, x, state, train):
        return self.norm(conv2d(jax.nn.relu(x), self.weight, self.stride, self.padding), state, train)


class SeparableBN(eqx.Module):
    """ReLU, depthwise k x k (dilated) convolution, pointwise convolution, BN (`DilConv`)."""

    depthwise: Float[Array, "k k cin"]
    pointwise: Float[Array, "cin cout"]
    norm: Norm
    stride: int = eqx.field(static=True)
    padding: int = eqx.field(static=True)
    dilation: int = eqx.field(static=True)

    def __init__(self, cin, cout, kernel, stride, padding, dilation, *, key: PRNGKeyArray):
        kd, kp = jax.random.split(key)
        self.depthwise = _uniform(kd, (kernel, kernel, cin), kernel * kernel)
        self.pointwise = _uniform(kp, (cin, cout), cin)
        self.norm = Norm(cout)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def __call__(self, x, state, train):
        y = separable_conv2d(jax.nn.relu(x), self.depthwise, self.pointwise, self.stride, self.padding, self.dilation)
        return self.norm(y, state, train)


class SepConvBN(eqx.Module):
    """Two stacked `SeparableBN` with dilation 1; only the first strides (`SepConv`)."""

    first: SeparableBN
    second: SeparableBN

    def __init__(self, channels: int, kernel: int, stride: int, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.first = SeparableBN(channels, channels, kernel, stride, kernel // 2, 1, key=k1)
        self.second = SeparableBN(channels, channels, kernel, 1, kernel // 2, 1, key=k2)

    def __call__(self, x, state, train):
        x, state = self.first(x, state, train)
        return self.second(x, state, train)


class FactorizedReduceBN(eqx.Module):
    """ReLU, two stride-2 1x1 convolutions on offset grids, concatenated, BN."""

    weight_a: Float[Array, "cin half"]
    weight_b: Float[Array, "cin half"]
    norm: Norm

    def __init__(self, cin: int, cout: int, *, key: PRNGKeyArray):
        if cout % 2:
            raise ValueError(f"FactorizedReduce output channels (={cout}) must be even")
        ka, kb = jax.random.split(key)
        self.weight_a = _uniform(ka, (cin, cout // 2), cin)
        self.weight_b = _uniform(kb, (cin, cout // 2), cin)
        self.norm = Norm(cout)

    def __call__(self, x, state, train):
        if x.shape[1] % 2 or x.shape[2] % 2:
            raise ValueError(f"FactorizedReduce needs even height and width, got {x.shape[1]}x{x.shape[2]}")
        x = jax.nn.relu(x)
        y = jnp.concatenate(
            [pointwise_conv(x[:, ::2, ::2, :], self.weight_a), pointwise_conv(x[:, 1::2, 1::2, :], self.weight_b)], -1
        )
        return self.norm(y, state, train)


class PoolOp(eqx.Module):
    """3x3 max or average pool (average excludes padding); no BN in the evaluation network."""

    kind: str = eqx.field(static=True)
    stride: int = eqx.field(static=True)

    def __call__(self, x, state, train):
        return (max_pool(x, self.stride) if self.kind == "max" else avg_pool(x, self.stride)), state


class IdentityOp(eqx.Module):
    def __call__(self, x, state, train):
        return x, state


def eval_op(name: str, channels: int, stride: int, *, key: PRNGKeyArray) -> eqx.Module:
    """The trainable op `name` of the DARTS space (the original's `OPS`, affine BN)."""
    if name == "skip_connect":
        return IdentityOp() if stride == 1 else FactorizedReduceBN(channels, channels, key=key)
    if name in ("max_pool_3x3", "avg_pool_3x3"):
        return PoolOp(name[:3], stride)
    if name in ("sep_conv_3x3", "sep_conv_5x5"):
        return SepConvBN(channels, int(name[-1]), stride, key=key)
    if name in ("dil_conv_3x3", "dil_conv_5x5"):
        k = int(name[-1])
        return SeparableBN(channels, channels, k, stride, k - 1, 2, key=key)  # padding = dilation * (k - 1) / 2
    raise ValueError(f"op {name!r} cannot be trained in an evaluation network (DARTS space ops only)")


def _drop_path(x, drop_prob, key):
    keep = 1.0 - drop_prob
    mask = jax.random.bernoulli(key, keep, (x.shape[0], 1, 1, 1))
    return jnp.where(mask, x / keep, 0.0)


class EvalCell(eqx.Module):
    preprocess0: Callable[..., tuple[Array, eqx.nn.State]]
    preprocess1: ConvBN
    ops: tuple
    inputs: tuple[int, ...] = eqx.field(static=True)
    concat: tuple[int, ...] = eqx.field(static=True)
    reduction: bool = eqx.field(static=True)

    def __init__(self, genotype: Genotype, c_prev_prev, c_prev, channels, reduction, reduction_prev, *, key):
        k0, k1, kops = jax.random.split(key, 3)
        if reduction_prev:
            self.preprocess0 = FactorizedReduceBN(c_prev_prev, channels, key=k0)
        else:
            self.preprocess0 = ConvBN(c_prev_prev, channels, 1, 1, 0, key=k0)
        self.preprocess1 = ConvBN(c_prev, channels, 1, 1, 0, key=k1)
        pairs = genotype.reduce if reduction else genotype.normal
        self.concat = genotype.reduce_concat if reduction else genotype.normal_concat
        keys = jax.random.split(kops, len(pairs))
        self.ops = tuple(
            eval_op(op, channels, 2 if reduction and index < 2 else 1, key=k) for (op, index), k in zip(pairs, keys)
        )
        self.inputs = tuple(index for _, index in pairs)
        self.reduction = reduction

    def __call__(self, s0, s1, state, train: bool, drop_prob, key):
        s0, state = self.preprocess0(s0, state, train)
        s1, state = self.preprocess1(s1, state, train)
        nodes = [s0, s1]
        keys = jax.random.split(key, len(self.ops)) if key is not None else [None] * len(self.ops)
        for node in range(len(self.ops) // 2):
            total = None
            for j in (2 * node, 2 * node + 1):
                h, state = self.ops[j](nodes[self.inputs[j]], state, train)
                if train and key is not None and not isinstance(self.ops[j], IdentityOp):
                    h = _drop_path(h, drop_prob, keys[j])
                total = h if total is None else total + h
            nodes.append(total)
        return jnp.concatenate([nodes[i] for i in self.concat], axis=-1), state


class AuxiliaryHead(eqx.Module):
    """The original's CIFAR auxiliary head on an 8x8 map: ReLU, 5x5 average pool (stride 3) to
    2x2, 1x1 conv to 128 + BN + ReLU, 2x2 conv to 768 + BN + ReLU, linear."""

    conv1: Float[Array, "cin 128"]
    norm1: Norm
    conv2: Float[Array, "2 2 128 768"]
    norm2: Norm
    weight: Float[Array, "768 classes"]
    bias: Float[Array, " classes"]

    def __init__(self, channels: int, num_classes: int, *, key: PRNGKeyArray):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.conv1 = _uniform(k1, (channels, 128), channels)
        self.norm1 = Norm(128)
        self.conv2 = _uniform(k2, (2, 2, 128, 768), 128 * 4)
        self.norm2 = Norm(768)
        self.weight = _uniform(k3, (768, num_classes), 768)
        self.bias = _uniform(k4, (num_classes,), 768)

    def __call__(self, x, state, train):
        x = jax.nn.relu(x)
        x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 5, 5, 1), (1, 3, 3, 1), "VALID") / 25.0
        x, state = self.norm1(pointwise_conv(x, self.conv1), state, train)
        x, state = self.norm2(conv2d(jax.nn.relu(x), self.conv2, 1, 0), state, train)
        x = jax.nn.relu(x).reshape(x.shape[0], -1)
        return x @ self.weight + self.bias[None, :], state


class EvalNetwork(eqx.Module):
    """A genotype as a trainable network (see the module docstring). Build it with
    `make_eval_network`, which also returns the initial batch-norm state."""

    stem: Float[Array, "3 3 cin c3"]
    stem_norm: Norm
    cells: tuple[EvalCell, ...]
    auxiliary: AuxiliaryHead | None
    weight: Float[Array, "cprev classes"]
    bias: Float[Array, " classes"]
    genotype: Genotype = eqx.field(static=True)
    auxiliary_after: int = eqx.field(static=True)

    def __init__(
        self,
        genotype: Genotype,
        channels: int,
        layers: int,
        num_classes: int,
        in_channels: int = 3,
        auxiliary: bool = False,
        *,
        key: PRNGKeyArray,
    ):
        if genotype.space != "darts":
            raise ValueError(f"an evaluation network needs a darts-space genotype, got space {genotype.space!r}")
        if isinstance(layers, bool) or not isinstance(layers, int) or len(set(reduction_layers(layers))) < 2:
            raise ValueError(
                f"layers (={layers!r}) must be an integer >= 2: the two reduction cells sit at layers//3 "
                "and 2*layers//3, which must differ"
            )
        k_stem, k_cells, k_aux, k_w, k_b = jax.random.split(key, 5)
        c_curr = 3 * channels
        self.stem = _uniform(k_stem, (3, 3, in_channels, c_curr), in_channels * 9)
        self.stem_norm = Norm(c_curr)
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        reductions = reduction_layers(layers)
        cells, reduction_prev = [], False
        self.auxiliary, self.auxiliary_after = None, 2 * layers // 3
        for i, k in enumerate(jax.random.split(k_cells, layers)):
            reduction = i in reductions
            if reduction:
                c_curr *= 2
            cell = EvalCell(genotype, c_prev_prev, c_prev, c_curr, reduction, reduction_prev, key=k)
            cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, len(cell.concat) * c_curr
            if auxiliary and i == self.auxiliary_after:
                self.auxiliary = AuxiliaryHead(c_prev, num_classes, key=k_aux)
        self.cells = tuple(cells)
        self.weight = _uniform(k_w, (c_prev, num_classes), c_prev)
        self.bias = _uniform(k_b, (num_classes,), c_prev)
        self.genotype = genotype

    def __call__(self, x: Images, state: eqx.nn.State, *, train: bool = False, drop_prob=0.0, key=None):
        """`(logits, aux_logits or None, state)`; `key` is needed for drop-path in training."""
        s, state = self.stem_norm(conv2d(x, self.stem, 1, 1), state, train)
        s0 = s1 = s
        aux_logits = None
        keys = jax.random.split(key, len(self.cells)) if key is not None else [None] * len(self.cells)
        for i, (cell, k) in enumerate(zip(self.cells, keys)):
            out, state = cell(s0, s1, state, train, drop_prob, k)
            s0, s1 = s1, out
            if i == self.auxiliary_after and self.auxiliary is not None and train:
                if s1.shape[1] < 5 or s1.shape[2] < 5:
                    raise ValueError(
                        f"the auxiliary head needs a feature map of at least 5x5 after cell {i}, got "
                        f"{s1.shape[1]}x{s1.shape[2]}: use larger images or no auxiliary head"
                    )
                aux_logits, state = self.auxiliary(s1, state, train)
        pooled = jnp.mean(s1, axis=(1, 2))
        return pooled @ self.weight + self.bias[None, :], aux_logits, state


def make_eval_network(genotype, channels, layers, num_classes, in_channels=3, auxiliary=False, *, key):
    """`(network, state)`: an `EvalNetwork` and its initial batch-norm running statistics."""
    return eqx.nn.make_with_state(EvalNetwork)(genotype, channels, layers, num_classes, in_channels, auxiliary, key=key)


def count_parameters(network: EvalNetwork, *, auxiliary: bool = False) -> int:
    """Trainable parameters (as the original's `count_parameters_in_MB` x 1e6: convolutions,
    BN scale and shift, classifier weight and bias; running statistics are not parameters);
    the auxiliary head only when `auxiliary`."""
    if not auxiliary and network.auxiliary is not None:
        network = eqx.tree_at(lambda n: n.auxiliary, network, None)
    leaves = jax.tree.leaves(network, is_leaf=lambda x: isinstance(x, eqx.nn.StateIndex))
    return sum(x.size for x in leaves if eqx.is_inexact_array(x))
