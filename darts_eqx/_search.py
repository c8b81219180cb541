"""First-order DARTS search: alternating alpha and weight steps, fused with `lax.scan`.

Per step: one Adam step on alpha with the gradient of the loss on a validation batch, then one SGD
step on the weights with the gradient of the loss on a training batch (Liu et al., 2019, Alg. 1,
first-order approximation). A chunk of steps is one `lax.scan` inside one jitted call.
"""

import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ._data import load
from ._discretize import derive_genotype, discretize
from ._genotype import Genotype
from ._mixed import combine_arch, split_arch
from ._network import SearchNetwork, SeedNetwork, reduction_layers
from ._spaces import get_space


class SearchDiverged(FloatingPointError):
    """A loss or alpha became non-finite during search; no genotype is derived from it."""


@dataclass(frozen=True)
class SearchConfig:
    """Search options; the defaults are the paper's CIFAR-10 search (Liu et al., 2019, App. A.1).

    - `space`: `darts` (the CIFAR search network) or `seed` (one mixed-op layer type).
    - `channels`, `layers`: initial channels C and number of cells.
    - `epochs`, `batch_size`: an epoch is `min(len(search_train), len(search_val)) // batch_size`
      steps; each step takes one batch from each half.
    - `train_portion`: share of the training set used to train weights; the rest trains alpha.
    - `w_*`: SGD for weights (lr cosine-annealed per epoch to `w_lr_min`, momentum, L2 weight
      decay), gradients clipped to global norm `grad_clip`.
    - `a_*`: Adam for alpha, with L2 weight decay added to the gradient as PyTorch's Adam does.
    - `steps_per_chunk`: steps fused into one jitted `lax.scan` call (default: a whole epoch);
      an epoch is cut to a whole number of chunks.
    - `partial_channels`: k > 1 searches PC-DARTS' partial channel connections with edge
      normalisation (Xu et al., ICLR 2020; k=4 there) in the DARTS space; it must divide
      `channels`. Its supernet is not discretised (its weights fit 1/k-wide ops only).
    """

    space: str = "darts"
    channels: int = 16
    layers: int = 8
    epochs: int = 50
    batch_size: int = 64
    train_portion: float = 0.5
    w_lr: float = 0.025
    w_lr_min: float = 0.001
    w_momentum: float = 0.9
    w_weight_decay: float = 3e-4
    grad_clip: float = 5.0
    a_lr: float = 3e-4
    a_beta1: float = 0.5
    a_beta2: float = 0.999
    a_weight_decay: float = 1e-3
    steps_per_chunk: int | None = None
    order: int = 1
    partial_channels: int = 1

    def __post_init__(self):
        get_space(self.space)
        for name in ("channels", "layers", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` (={value!r}) must be a positive integer")
        if self.steps_per_chunk is not None and (not isinstance(self.steps_per_chunk, int) or self.steps_per_chunk < 1):
            raise ValueError(f"`steps_per_chunk` (={self.steps_per_chunk!r}) must be a positive integer or None")
        if not 0.0 < self.train_portion < 1.0:
            raise ValueError(f"`train_portion` (={self.train_portion!r}) must lie strictly between 0 and 1")
        for name in ("w_lr", "a_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` (={getattr(self, name)!r}) must be positive")
        for name in ("w_lr_min", "w_weight_decay", "a_weight_decay", "grad_clip", "w_momentum"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"`{name}` (={getattr(self, name)!r}) must be non-negative")
        if isinstance(self.partial_channels, bool) or not isinstance(self.partial_channels, int):
            raise ValueError(f"`partial_channels` (={self.partial_channels!r}) must be a positive integer")
        if self.partial_channels != 1:
            if self.space != "darts":
                raise ValueError(
                    f"`partial_channels` (={self.partial_channels}) needs the darts space, not {self.space!r}"
                )
            if self.partial_channels < 1 or self.channels % self.partial_channels:
                raise ValueError(
                    f"`partial_channels` (={self.partial_channels}) must be a positive divisor of "
                    f"`channels` (={self.channels})"
                )
        if self.order != 1:
            raise ValueError(f"`order` (={self.order!r}): only first-order search (1) is implemented")

    def replace(self, **changes) -> "SearchConfig":
        """A copy with `changes`; unknown option names are an error naming them."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown search option(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)


class SearchState(eqx.Module):
    """Everything that changes during a search: the scan carry."""

    weights: PyTree
    arch: PyTree
    w_opt_state: PyTree
    a_opt_state: PyTree
    step: Int[Array, ""]
    key: PRNGKeyArray


class StepMetrics(NamedTuple):
    train_loss: Float[Array, ""]
    train_acc: Float[Array, ""]
    val_loss: Float[Array, ""]
    val_acc: Float[Array, ""]


@dataclass(frozen=True)
class SearchResult:
    """What `search` returns: the derived genotype, the trained supernet, the discretised network
    (`discretize(supernet, genotype)`; None for a partial-channel search), the per-epoch history
    and the config used."""

    genotype: Genotype
    supernet: Any
    network: Any
    history: list[dict]
    config: SearchConfig


def build_supernet(config: SearchConfig, image_shape, num_classes: int, *, key: PRNGKeyArray):
    """The supernet of `config.space` for images of `image_shape` (height, width, channels)."""
    height, width, in_channels = image_shape
    if config.space == "darts":
        factor = 2 ** len(reduction_layers(config.layers))
        if height % factor or width % factor:
            raise ValueError(
                f"images of {height}x{width} cannot pass {len(reduction_layers(config.layers))} "
                f"reduction cells: height and width must be divisible by {factor}"
            )
        network = SearchNetwork
    else:
        network = SeedNetwork
    if config.space == "darts":
        return network(
            config.channels, config.layers, num_classes, in_channels, partial_channels=config.partial_channels, key=key
        )
    return network(config.channels, config.layers, num_classes, in_channels, key=key)


def epoch_lr(config: SearchConfig, epoch):
    """The paper's cosine annealing of the weight lr, stepped once per epoch."""
    cos = jnp.cos(jnp.pi * epoch / config.epochs)
    return config.w_lr_min + (config.w_lr - config.w_lr_min) * 0.5 * (1.0 + cos)


def weight_optimizer(config: SearchConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Clip to global norm, add L2 weight decay, SGD with momentum on the per-epoch cosine lr."""
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.add_decayed_weights(config.w_weight_decay),
        optax.sgd(lambda count: epoch_lr(config, count // steps_per_epoch), momentum=config.w_momentum),
    )


def arch_optimizer(config: SearchConfig) -> optax.GradientTransformation:
    """Adam on alpha with L2 weight decay added to the gradient (PyTorch's `Adam(weight_decay=)`)."""
    return optax.chain(
        optax.add_decayed_weights(config.a_weight_decay),
        optax.adam(config.a_lr, b1=config.a_beta1, b2=config.a_beta2, eps=1e-8),
    )


def loss_and_accuracy(model, x, y):
    """Mean cross-entropy and accuracy of `model` on one batch."""
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, axis=-1) == y)


def _arch_loss(arch, weights, static, x, y):
    return loss_and_accuracy(combine_arch(arch, weights, static), x, y)


def _weight_loss(weights, arch, static, x, y):
    return loss_and_accuracy(combine_arch(arch, weights, static), x, y)


def search_step(state: SearchState, static, w_opt, a_opt, train_batch, val_batch):
    """One first-order DARTS step: alpha on `val_batch`, then weights on `train_batch`."""
    (val_loss, val_acc), a_grads = eqx.filter_value_and_grad(_arch_loss, has_aux=True)(
        state.arch, state.weights, static, *val_batch
    )
    a_updates, a_opt_state = a_opt.update(a_grads, state.a_opt_state, state.arch)
    arch = eqx.apply_updates(state.arch, a_updates)
    (train_loss, train_acc), w_grads = eqx.filter_value_and_grad(_weight_loss, has_aux=True)(
        state.weights, arch, static, *train_batch
    )
    w_updates, w_opt_state = w_opt.update(w_grads, state.w_opt_state, state.weights)
    weights = eqx.apply_updates(state.weights, w_updates)
    new = SearchState(weights, arch, w_opt_state, a_opt_state, state.step + 1, state.key)
    return new, StepMetrics(train_loss, train_acc, val_loss, val_acc)


def make_chunk_fn(static, w_opt, a_opt):
    """A jitted `chunk((images, labels, train_idx, val_idx), state) -> (state, metrics)` that
    runs one search step per row of the index arrays `[steps, batch]` inside a `lax.scan`. The
    data stays on device and only indices change per call, so nothing recompiles; the state's
    buffers are donated, so a chunk does not hold two copies of the supernet."""

    # A retrace would mean a recompile per chunk (minutes on CPU): make it an error, not a slowdown.
    @eqx.filter_jit(donate="all-except-first")
    @eqx.debug.assert_max_traces(max_traces=1)
    def chunk(inputs, state):
        images, labels, train_idx, val_idx = inputs

        def body(state, idx):
            it, iv = idx
            return search_step(state, static, w_opt, a_opt, (images[it], labels[it]), (images[iv], labels[iv]))

        return lax.scan(body, state, (train_idx, val_idx))

    return chunk


def arch_weights(model) -> dict[str, np.ndarray]:
    """softmax(alpha) of each cell type, by name."""
    if isinstance(model, SearchNetwork):
        out = {
            "alpha_normal": np.asarray(model.alpha_normal.weights()),
            "alpha_reduce": np.asarray(model.alpha_reduce.weights()),
        }
        if model.beta_normal is not None:
            out["beta_normal"] = np.asarray(model.beta_normal.weights())
            out["beta_reduce"] = np.asarray(model.beta_reduce.weights())
        return out
    return {"alpha": np.asarray(model.alpha.weights())}


def _progress(total: int, enabled: bool | None):
    from tqdm.auto import tqdm

    # tqdm's disable=None turns the bar off when stderr is not a terminal.
    return tqdm(
        total=total, unit="step", disable=None if enabled is None else not enabled, file=sys.stderr, dynamic_ncols=True
    )


def search(
    key: PRNGKeyArray,
    data=None,
    config: SearchConfig | None = None,
    *,
    progress: bool | None = None,
    callback=None,
    **options,
) -> SearchResult:
    """Run a first-order DARTS search.

    **Arguments:**
    - `key`: a JAX PRNG key; it decides the initial weights and alpha, the 50/50 split and the
      data order, so the same key, data and config give the same search.
    - `data`: anything `darts_eqx.data.load` accepts (default: the embedded digits).
    - `config`: a `SearchConfig`; keyword `options` override its fields.
    - `progress`: show a progress bar (default: only on a terminal).
    - `callback`: called as `callback(record, supernet)` after each epoch.

    **Returns:** a `SearchResult`.
    """
    config = (config or SearchConfig()).replace(**options)
    data = load(data)
    n = len(data.x_train)
    n_train = int(round(n * config.train_portion))
    n_val = n - n_train
    steps_per_epoch = min(n_train, n_val) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size (={config.batch_size}) is larger than the search split: {n} training images "
            f"give {n_train} for weights and {n_val} for alpha"
        )
    chunk_len = min(config.steps_per_chunk or steps_per_epoch, steps_per_epoch)
    chunks_per_epoch = steps_per_epoch // chunk_len
    steps_per_epoch = chunks_per_epoch * chunk_len

    key_model, key_split, key_state = jax.random.split(key, 3)
    model = build_supernet(config, data.image_shape, data.num_classes, key=key_model)
    arch, weights, static = split_arch(model)
    w_opt, a_opt = weight_optimizer(config, steps_per_epoch), arch_optimizer(config)
    state = SearchState(weights, arch, w_opt.init(weights), a_opt.init(arch), jnp.zeros((), jnp.int32), key_state)
    order = np.asarray(jax.random.permutation(key_split, n))
    train_pool, val_pool = jnp.asarray(order[:n_train]), jnp.asarray(order[n_train:])
    device_data = (jnp.asarray(data.x_train), jnp.asarray(data.y_train))
    chunk = make_chunk_fn(static, w_opt, a_opt)

    history = []
    bar = _progress(config.epochs * steps_per_epoch, progress)
    try:
        for epoch in range(config.epochs):
            start = time.perf_counter()
            key_next, key_t, key_v = jax.random.split(state.key, 3)
            state = eqx.tree_at(lambda s: s.key, state, key_next)
            used = steps_per_epoch * config.batch_size
            train_idx = jax.random.permutation(key_t, train_pool)[:used].reshape(chunks_per_epoch, chunk_len, -1)
            val_idx = jax.random.permutation(key_v, val_pool)[:used].reshape(chunks_per_epoch, chunk_len, -1)
            metrics = []
            for c in range(chunks_per_epoch):
                state, m = chunk((*device_data, train_idx[c], val_idx[c]), state)
                metrics.append(jax.device_get(m))
                bar.update(chunk_len)
            metrics = StepMetrics(*(np.concatenate(v) for v in zip(*metrics)))
            supernet = combine_arch(state.arch, state.weights, static)
            _check_finite(metrics, supernet, epoch, steps_per_epoch)
            record = {
                "epoch": epoch + 1,
                "train_loss": float(metrics.train_loss.mean()),
                "train_acc": float(metrics.train_acc.mean()),
                "val_loss": float(metrics.val_loss.mean()),
                "val_acc": float(metrics.val_acc.mean()),
                "lr": float(epoch_lr(config, epoch)),
                "seconds": time.perf_counter() - start,
                **{k: v.tolist() for k, v in arch_weights(supernet).items()},
            }
            history.append(record)
            bar.set_postfix(epoch=epoch + 1, train_acc=f"{record['train_acc']:.3f}", val_acc=f"{record['val_acc']:.3f}")
            if callback is not None:
                callback(record, supernet)
    finally:
        bar.close()
    supernet = combine_arch(state.arch, state.weights, static)
    genotype = derive_genotype(supernet)
    network = discretize(supernet, genotype) if config.partial_channels == 1 else None
    return SearchResult(genotype, supernet, network, history, config)


def _check_finite(metrics: StepMetrics, supernet, epoch: int, steps_per_epoch: int):
    for name, values in metrics._asdict().items():
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            step = epoch * steps_per_epoch + int(bad[0]) + 1
            raise SearchDiverged(
                f"{name} became non-finite ({values[bad[0]]}) at step {step} (epoch {epoch + 1}); "
                "the search stopped and no genotype was derived. Try a lower w_lr or a_lr."
            )
    for name, values in arch_weights(supernet).items():
        if not np.all(np.isfinite(values)):
            raise SearchDiverged(f"{name} became non-finite in epoch {epoch + 1}; the search stopped")
