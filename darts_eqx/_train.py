"""Train a genotype from scratch (Liu et al., 2019, App. A.2): SGD momentum 0.9, weight decay
3e-4, cosine lr 0.025 -> 0 stepped per epoch, gradient clip 5, auxiliary loss weight 0.4,
drop-path ramped linearly from 0 to 0.2 over training, random crop (4-pixel padding), horizontal
flip and cutout (16 px on 32x32) done in JAX inside the jitted step, with the augmentation key
threaded through the `lax.scan` carry; test accuracy each epoch with the running BN statistics.
"""

import dataclasses
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jaxtyping import PRNGKeyArray

from ._augment import augment_images
from ._checks import non_negative, positive, positive_ints, replace_known
from ._data import load
from ._dtype import float_dtype
from ._execution import Execution, as_execution
from ._metrics import MetricsLog, ProgressReport
from ._norm import with_running_norms
from ._optim import clipped_sgd, cosine_lr
from ._skeleton import CellNetwork, count_parameters, has_running_norms
from ._spaces import check_image_size, get_space

TEST_FRACTION = 0.1  # of the training images, held out when a data set has no test split
_SHOWN = ("train_loss", "train_acc", "test_acc")  # of each epoch's record, in the progress report


@dataclass(frozen=True)
class TrainConfig:
    """Training options; the defaults are the paper's CIFAR-10 evaluation (App. A.2).

    `cutout_length` and `crop_padding` are for 32x32 images and scale with the image size (16 and
    4 on CIFAR, 4 and 1 on 8x8 digits). `drop_path_prob` is reached at the last epoch, growing
    linearly from 0."""

    channels: int = 36
    layers: int = 20
    epochs: int = 600
    batch_size: int = 96
    lr: float = 0.025
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    auxiliary: bool = True
    auxiliary_weight: float = 0.4
    drop_path_prob: float = 0.2
    cutout: bool = True
    cutout_length: int = 16
    crop_padding: int = 4
    flip: bool = True

    def __post_init__(self):
        positive_ints(self, "channels", "layers", "epochs", "batch_size")
        positive(self, "lr")
        non_negative(self, "lr_min", "momentum", "weight_decay", "grad_clip", "auxiliary_weight", "cutout_length")
        if not 0 <= self.drop_path_prob < 1:
            raise ValueError(f"`drop_path_prob` (={self.drop_path_prob!r}) must lie in [0, 1)")

    def replace(self, **changes) -> "TrainConfig":
        """A copy with `changes`; unknown option names are an error naming them."""
        return replace_known(self, "training", changes)


@dataclass(frozen=True)
class TrainResult:
    """The trained `model` and its batch-norm `state`, the per-epoch `history` (`epoch`,
    `train_loss`, `train_acc`, `test_acc`, `lr`, `drop_prob`), the parameter count (without the
    auxiliary head), the config, wall-clock seconds per epoch, and whether the model was built
    from a genotype (False: a discretised supernet, fine-tuned)."""

    model: CellNetwork
    state: Any
    history: list[dict]
    parameters: int
    config: TrainConfig
    epoch_seconds: list[float]
    from_genotype: bool = True


def augment(key: PRNGKeyArray, x, config: TrainConfig):
    """Random crop from a zero-padded image, horizontal flip, cutout; sizes scale with the image."""
    cutout = config.cutout_length if config.cutout else 0
    return augment_images(key, x, crop_padding=config.crop_padding, flip=config.flip, cutout_length=cutout)


def epoch_lr(config: TrainConfig, epoch):
    return cosine_lr(config.lr, config.lr_min, config.epochs, epoch)


def train_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    return clipped_sgd(
        lambda epoch: epoch_lr(config, epoch), steps_per_epoch, config.momentum, config.weight_decay, config.grad_clip
    )


def _loss(params, static, bn_state, x, y, config: TrainConfig, drop_prob, key):
    model = eqx.combine(params, static)
    logits, aux_logits, bn_state = model(x, bn_state, train=True, drop_prob=drop_prob, key=key)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    total = loss
    if aux_logits is not None:
        total = loss + config.auxiliary_weight * optax.softmax_cross_entropy_with_integer_labels(aux_logits, y).mean()
    return total, (loss, jnp.mean(jnp.argmax(logits, -1) == y), bn_state)


def make_train_chunk(static, optimizer, config: TrainConfig, execution: Execution | None = None):
    """Jitted `chunk((images, labels, idx[steps, batch], drop_prob), carry) -> (carry, metrics)`
    with `carry = (params, opt_state, bn_state, key)`; the carry is donated."""
    execution = as_execution(execution)

    @execution.jit
    def chunk(inputs, carry):
        images, labels, idx, drop_prob = inputs

        def step(carry, batch_idx):
            params, opt_state, bn_state, key = carry
            key, k_aug, k_drop = jax.random.split(key, 3)
            x = augment(k_aug, images[batch_idx], config)
            grads, (loss, acc, bn_state) = jax.grad(_loss, has_aux=True)(
                params, static, bn_state, x, labels[batch_idx], config, drop_prob, k_drop
            )
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = eqx.apply_updates(params, updates)
            return (params, opt_state, bn_state, key), (loss, acc)

        with execution.tracing():
            return lax.scan(step, carry, idx)

    return chunk


def make_evaluate(static):
    """Jitted `evaluate(params, bn_state, images, labels, valid) -> correct count`, inference mode,
    over batches `[n_batches, batch, ...]` with a mask for the padding of the last batch."""

    @eqx.filter_jit
    def evaluate(params, bn_state, images, labels, valid):
        model = eqx.combine(params, static)

        def body(total, batch):
            x, y, ok = batch
            logits, _, _ = model(x, bn_state, train=False)
            return total + jnp.sum((jnp.argmax(logits, -1) == y) & ok, dtype=total.dtype), None

        return lax.scan(body, jnp.zeros((), jnp.int32), (images, labels, valid))[0]

    return evaluate


def _batched(x, y, batch_size: int):
    n = len(x)
    padded = -(-n // batch_size) * batch_size
    pad = padded - n
    valid = np.arange(padded) < n
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros(pad, y.dtype)])
    shape = (padded // batch_size, batch_size)
    return x.reshape(*shape, *x.shape[1:]), y.reshape(shape), valid.reshape(shape)


def train(
    key: PRNGKeyArray,
    architecture,
    data=None,
    config: TrainConfig | None = None,
    *,
    execution: Execution | None = None,
    progress: bool | None = None,
    callback=None,
    metrics_dir: str | os.PathLike | None = None,
    tensorboard: bool = False,
    on_metrics=None,
    **options,
) -> TrainResult:
    """Train on `data`'s training split, with test accuracy on its test split after each epoch
    (data without one: on 10% of its training images, held out with a warning). Images smaller
    than 20x20 train without the auxiliary head (with a warning).

    `architecture` is a genotype (of any registered space; trained from scratch as its space's
    evaluation network of `config.channels` and `config.layers`), or what `discretize` returns (a
    discretised supernet, fine-tuned from its supernet weights with its batch norms given running
    statistics; `channels`, `layers` and `auxiliary` then come from the network).
    `callback(history, model, state)` is called after each epoch; `execution` says how the training
    runs (its `steps_per_chunk`, formulations, XLA preset). `progress` is as for `search`: None (the
    default) shows a bar on a terminal, else one plain line per epoch on stderr.

    `metrics_dir` is a run folder to write `metrics.jsonl` into, a fresh one each call: one JSON
    record per chunk of steps (default an epoch), flushed as it goes, with `step` (steps done),
    `epoch` (from 1), the chunk's mean `train_loss` and `train_acc`, the epoch's `lr` and
    `drop_prob`, and in an epoch's last record its `test_acc`. `tensorboard=True` also writes them
    as TensorBoard event files under `metrics_dir/tensorboard/` (the `tensorboard` extra);
    `on_metrics(record)` is called with each record as it is written."""
    config = (config or TrainConfig()).replace(**options)
    execution = as_execution(execution)
    log = MetricsLog(metrics_dir, tensorboard, on_metrics)
    execution.use_compile_cache()
    data = _checked(load(data), config)
    assert data.x_test is not None  # `_checked` holds one out if there is none
    config = _fitted(config, architecture, data.image_shape)
    steps_per_epoch = len(data.x_train) // config.batch_size
    chunk_len, chunks = execution.chunking(steps_per_epoch, None)
    steps_per_epoch = chunks * chunk_len

    key_model, key_order, key_train = jax.random.split(key, 3)
    model, bn_state = _trainable(architecture, config, data.num_classes, data.image_shape, key=key_model)
    model = dataclasses.replace(model, pixel_norm=data.pixel_norm)  # for `predict` on new images
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optimizer = train_optimizer(config, steps_per_epoch)
    carry = (params, optimizer.init(params), bn_state, key_train)
    chunk = make_train_chunk(static, optimizer, config, execution)
    evaluate = make_evaluate(static)
    images, labels = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    test = tuple(jnp.asarray(a) for a in _batched(data.x_test, data.y_test, config.batch_size))
    sizes = (len(data.x_test), steps_per_epoch, chunk_len)

    history, seconds = [], []
    report = ProgressReport(config.epochs * steps_per_epoch, 0, config.epochs, progress, _SHOWN)
    epochs = _Epochs(chunk, evaluate, config, (images, labels), test, key_order, *sizes, report, log)
    log.open(0)
    try:
        for epoch in range(config.epochs):
            start = time.perf_counter()
            carry, record = epochs.run(carry, epoch)
            history.append(record)
            seconds.append(time.perf_counter() - start)
            report.epoch(record, seconds[-1])
            if callback is not None:
                callback(list(history), eqx.combine(carry[0], static), carry[2])
    finally:
        report.close()
        log.close()
    trained = eqx.combine(carry[0], static)
    from_genotype = not isinstance(architecture, CellNetwork)
    return TrainResult(trained, carry[2], history, count_parameters(model), config, seconds, from_genotype)


@dataclass
class _Epochs:
    """One training epoch after another: the compiled chunk and evaluation, the data (training
    images and labels; the test set in batches with its padding mask), the key of the images'
    order, the test set's size, the epoch's steps and chunk length, and where it reports."""

    chunk: Callable
    evaluate: Callable
    config: TrainConfig
    data: tuple
    test: tuple
    key_order: PRNGKeyArray
    test_size: int
    steps_per_epoch: int
    chunk_len: int
    report: ProgressReport
    metrics: MetricsLog

    def run(self, carry, epoch: int) -> tuple[Any, dict]:
        """`(carry, record)` after `epoch` (from 0): each chunk's metrics record is written as it
        comes, the last one with the epoch's test accuracy."""
        config, images = self.config, self.data[0]
        drop_prob = jnp.asarray(config.drop_path_prob * epoch / config.epochs, float_dtype())
        order = jax.random.permutation(jax.random.fold_in(self.key_order, epoch), len(images))
        idx = order[: self.steps_per_epoch * config.batch_size].reshape(-1, self.chunk_len, config.batch_size)
        rates = {"lr": float(epoch_lr(config, epoch)), "drop_prob": float(drop_prob)}
        records = []

        def on_chunk(c: int, loss, acc):
            first = epoch * self.steps_per_epoch + c * self.chunk_len  # the global index of loss[0]
            _check_finite(loss, first, epoch)
            self.report.update(len(loss))
            mean = {"train_loss": float(loss.mean()), "train_acc": float(acc.mean())}
            records.append({"step": first + len(loss), "epoch": epoch + 1, **mean, **rates})
            if c < len(idx) - 1:
                self.metrics.write(records[-1])

        carry, loss, acc = _run_epoch(self.chunk, carry, self.data, idx, drop_prob, on_chunk)
        test_acc = int(self.evaluate(carry[0], carry[2], *self.test)) / self.test_size
        self.metrics.write({**records[-1], "test_acc": test_acc})
        record = {"epoch": epoch + 1, "train_loss": float(loss.mean()), "train_acc": float(acc.mean())}
        return carry, {**record, "test_acc": test_acc, **rates}


def _run_epoch(chunk, carry, data, idx, drop_prob, on_chunk):
    """`(carry, loss, acc)`: `carry` after one epoch's chunks of step indices `idx[chunk, step,
    batch]`, and each step's loss and accuracy, which `on_chunk(c, loss, acc)` gets after chunk `c`."""
    metrics = []
    for c, chunk_idx in enumerate(idx):
        carry, m = chunk((*data, chunk_idx, drop_prob), carry)
        metrics.append(tuple(np.asarray(v) for v in m))
        on_chunk(c, *metrics[-1])
    loss, acc = (np.concatenate([m[i] for m in metrics]) for i in (0, 1))
    return carry, loss, acc


def _trainable(architecture, config: TrainConfig, num_classes: int, image_shape, *, key: PRNGKeyArray):
    """`(network, state)` to train: a genotype's evaluation network, or a discretised supernet
    with running batch-norm statistics."""
    if isinstance(architecture, CellNetwork):
        if architecture.arch is not None:
            raise ValueError("train takes a genotype or a discretised network: discretize the supernet first")
        if has_running_norms(architecture):
            raise ValueError("this network already keeps running statistics: train takes a discretised supernet")
        # copies: training donates its buffers, and these are the caller's network's (and supernet's)
        return with_running_norms(
            jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, architecture)
        )
    space_name = getattr(architecture, "space", None)
    if not isinstance(space_name, str):
        raise ValueError(f"train takes a genotype or a discretised network, got {type(architecture).__name__}")
    space = get_space(space_name)
    height, width, in_channels = image_shape
    check_image_size(space, config, height, width)
    return space.topology.network(
        space, architecture, config.channels, config.layers, num_classes, in_channels, config.auxiliary, key=key
    )


def _checked(data, config: TrainConfig):
    """`data` if `config` can train on it, a test split held out of it (with a warning) if it has
    none; a `ValueError` if the batch does not fit."""
    if data.x_test is None:
        data = data.with_test_split(TEST_FRACTION)
        warnings.warn(
            f"data set {data.name!r} has no test split: test accuracy is measured on {len(data.x_test)} of its "
            f"training images, held out (ImageData.with_test_split({TEST_FRACTION}))",
            stacklevel=3,
        )
    if len(data.x_train) < config.batch_size:
        raise ValueError(f"batch_size (={config.batch_size}) is larger than the {len(data.x_train)} training images")
    return data


def _fitted(config: TrainConfig, architecture, image_shape) -> TrainConfig:
    """`config`, without the auxiliary head (and a warning) when the images are too small for it:
    the paper's head reads a 5x5 map or larger after the second reduction (a quarter of the image)."""
    height, width = image_shape[:2]
    space_name = getattr(architecture, "space", None)
    if not config.auxiliary or isinstance(architecture, CellNetwork) or not isinstance(space_name, str):
        return config
    space = get_space(space_name)
    check_image_size(space, config, height, width)  # too small for the cells: that error first
    # only the DARTS cell's network (the paper's NetworkCIFAR) has the auxiliary head
    if space.topology.genotype_form == "cell" and min(height, width) // 4 < 5:
        warnings.warn(
            f"{height}x{width} images are too small for the auxiliary head (it needs 20x20 or larger): training "
            "without it (auxiliary=False)",
            stacklevel=3,
        )
        return config.replace(auxiliary=False)
    return config


def _check_finite(loss, first: int, epoch: int) -> None:
    """Stop at the first non-finite loss of a chunk whose first step has global index `first`."""
    if not np.all(np.isfinite(loss)):
        bad = int(np.flatnonzero(~np.isfinite(loss))[0])
        raise FloatingPointError(f"training loss became non-finite at step {first + bad + 1} (epoch {epoch + 1})")
