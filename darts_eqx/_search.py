"""`search`: DARTS as the paper's Algorithm 1. Build the supernet, then alternate an alpha step on
validation data and a weight step on training data for the configured epochs, then derive the
genotype and discretise. Each piece lives in its own module: the config (`_config`), how it runs
(`_execution`), state and optimisers (`_state`, `_optim`), the step (`_step`), the loop
(`_loop`) and checkpoints (`_resume`)."""

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from . import _parallel, _resume
from ._augment import search_augmentation
from ._config import SearchConfig
from ._data import load
from ._execution import Execution, as_execution
from ._guards import grew, hessian_eigenvalue
from ._loop import Progress, Schedule, SearchDiverged, SearchLoop
from ._loss import supernet_loss
from ._methods import MethodContext, Plugin, chain, from_config, parts
from ._metrics import MetricsLog
from ._mixed import combine_arch, split_arch
from ._optim import arch_optimizer, weight_optimizer
from ._skeleton import CellNetwork
from ._spaces import get_space
from ._state import as_typed_key, initial_state, saved, unsaved
from ._step import make_chunk_fn
from ._supernet import build_supernet, derive_genotype, discretize, with_recorded_alpha

__all__ = ["SearchDiverged", "SearchResult", "search"]


@dataclass(frozen=True)
class SearchResult:
    """What `search` returns: the derived genotype, the trained supernet, the discretised network
    (`discretize(supernet, genotype)`: still to be trained, see `darts_eqx.train`), the per-epoch history
    (deterministic: no wall-clock times), the config used, the wall-clock seconds of each epoch
    run in this call, the epoch at which DARTS-ES stopped the search (None if it did not), and
    the resolved execution it ran with."""

    genotype: Any
    supernet: CellNetwork
    network: CellNetwork
    history: list[dict]
    config: SearchConfig
    epoch_seconds: list[float] = dataclasses.field(default_factory=list)
    stopped_at: int | None = None
    execution: Execution | None = None


def search(
    key: PRNGKeyArray,
    data=None,
    config: SearchConfig | None = None,
    *,
    execution: Execution | None = None,
    method: str | Plugin | None = None,
    progress: bool | None = None,
    callback=None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = _resume.DEFAULT_CHECKPOINT_EVERY,
    resume: bool = False,
    allow_changes=(),
    metrics_dir: str | os.PathLike | None = None,
    tensorboard: bool = False,
    on_metrics=None,
    score_genotype=None,
    **options,
) -> SearchResult:
    """Run a DARTS search (first or second order, as `config.order` says).

    **Arguments:**
    - `key`: a JAX PRNG key; it decides the initial weights and alpha, the split of the training
      images between weights and alpha, and the data order, so the same key, data and config give
      the same search, bit for bit on CPU under the same execution.
    - `data`: anything `darts_eqx.data.load` accepts (default: the embedded digits).
    - `config`: a `SearchConfig`; keyword `options` override its fields.
    - `execution`: an `Execution`, how the search runs (chunking, tracing, kernels, devices); it
      never changes what the search computes beyond floating-point rounding.
    - `method`: the name of a built-in method (the config's `method`: `"gdas"`, `"drnas"`, ...),
      or a method plug-in of the user's own (`darts_eqx.Method`), run after the ones the config
      names (first or second order, its `method`, `beta_reg`, `aux_skip`): its relaxation stacks
      on theirs, its loss term adds to theirs, and it may set what they leave unset.
    - `progress`: progress on stderr: None (default) shows a bar on a terminal, else one plain
      line per epoch (losses, accuracies, seconds); True the bar anywhere; False nothing.
    - `callback`: called as `callback(history, supernet)` after each epoch, with the list of all
      epoch records so far (restored ones included after a resume).
    - `checkpoint_dir`: write checkpoints of the whole search state there, at least every
      `checkpoint_every` steps and at the end of each epoch (the two newest are kept).
    - `resume`: continue from the newest intact checkpoint in `checkpoint_dir` (an older one, with a
      `CheckpointWarning`, if the newest is damaged; a fresh start if there is none). Under the same
      execution the result is bit-for-bit that of the same search never interrupted (same
      jax/darts_eqx versions); another execution resumes it too. A checkpoint of another config,
      data set or key is a `CheckpointError` naming the differences; `allow_changes=("epochs",)`
      accepts a different number of epochs.
    - `metrics_dir`: the run folder to write `metrics.jsonl` into: one JSON record per chunk of
      steps (`execution.steps_per_chunk`; default an epoch), flushed as it goes, with `step` (steps
      done), `epoch` (from 1), the chunk's mean `train_loss`, `train_acc`, `val_loss`, `val_acc`,
      `w_grad_norm` and `a_grad_norm`, the learning rates `w_lr` and `a_lr`, the entropy of
      softmax(alpha) per cell kind after the chunk (`entropy_normal`, `entropy_reduce`; `entropy`
      for spaces with one kind of cell: the mean over edges, in nats), and in an epoch's last
      record the `hessian_eigenvalue` when the config tracks it. `darts_eqx.read_metrics` reads it
      back. With `resume`, records past the restored checkpoint's step are dropped before the
      search appends, so the file ends as the uninterrupted search's; without, it starts anew.
    - `tensorboard`: also write each record's scalars as TensorBoard event files under
      `metrics_dir/tensorboard/` (needs the `tensorboard` extra).
    - `on_metrics`: called as `on_metrics(record)` with each record as it is written (a dict as
      above, also without `metrics_dir`), e.g. to forward it to an experiment tracker. Process 0
      alone writes records and calls it.
    - `score_genotype`: called at each epoch's end with the genotype the method selects from the
      supernet then (alpha's argmax with `select="pt"`, which runs once, at the end); the dict it
      returns joins that epoch's history record (and its checkpoint),
      e.g. `darts_eqx.nb201.benchmark_scores(table)` for anytime NAS-Bench-201 accuracies.

    Data-parallel (`execution.devices`): each global batch is split over the devices, everything
    else is replicated, and gradients and batch-norm statistics are over the global batch: the same
    search as on one device, up to the order of floating-point sums. `batch_size` must divide evenly.

    **Returns:** a `SearchResult`.

    **Raises:** `SearchDiverged` when a loss, gradient norm, weight or alpha becomes non-finite,
    naming the step and the quantity; the checkpoints written before stay in place.
    """
    if isinstance(method, str):
        options, method = {**options, "method": method}, None
    config = (config or SearchConfig()).replace(**options)
    execution = as_execution(execution).resolve(config)
    checkpoint_dir, allow_changes = _resume.check_options(checkpoint_dir, checkpoint_every, resume, allow_changes)
    metrics = MetricsLog(metrics_dir, tensorboard, on_metrics)
    execution.use_compile_cache()
    mesh = _parallel.data_mesh(execution.devices)
    _parallel.check_batch(config.batch_size, mesh)
    data, key = load(data), as_typed_key(key)
    key_model, key_split, key_state = jax.random.split(key, 3)
    schedule = _schedule(config, execution, len(data.x_train), key_split, checkpoint_every if checkpoint_dir else None)

    # The supernet: weights w and alpha, each with its own optimiser.
    supernet = build_supernet(config, data.image_shape, data.num_classes, key=key_model)
    supernet = dataclasses.replace(supernet, pixel_norm=data.pixel_norm)  # for `predict` on new images
    arch, weights, static = split_arch(supernet)
    # The method: how alpha weighs the ops, the losses' extra terms, alpha's gradient, the
    # selection, the epochs before alpha's first step.
    plugin = from_config(config) if method is None else chain(from_config(config), method)
    context = MethodContext(config, get_space(config.space).op_names, schedule.steps_per_epoch)
    method_parts = parts(plugin, context)
    frozen = method_parts.arch_warmup * schedule.steps_per_epoch
    w_opt, a_opt = weight_optimizer(config, schedule.steps_per_epoch), arch_optimizer(config, frozen)
    state = initial_state(weights, arch, w_opt, a_opt, key_state)
    identity = _resume.identity(config, data, key, method) if checkpoint_dir is not None else None
    key_impl = str(jax.random.key_impl(key_state))
    start, schedule = _start(Progress(state), schedule, resume, checkpoint_dir, identity, allow_changes, key_impl)
    start.state = _parallel.replicate(start.state, mesh)
    device_data = _on_devices((data.x_train, data.y_train), mesh)

    # Alternate alpha and weight steps, chunk by chunk, for the configured epochs.
    estimate = method_parts._asdict()
    select = estimate.pop("select")
    del estimate["arch_warmup"]  # in alpha's optimiser
    chunk = make_chunk_fn(static, w_opt, a_opt, execution, mesh=mesh, augment=search_augmentation(config), **estimate)
    epoch_end, stop = _hessian_tracking(config, static, device_data, schedule.val_pool, key_split)
    epoch_end = _scored(epoch_end, score_genotype, select or derive_genotype, static)
    checkpoints, reports = (checkpoint_dir, checkpoint_every, identity), (callback, epoch_end, stop, metrics)
    loop = SearchLoop(chunk, schedule, device_data, mesh, static, config, *checkpoints, *reports)
    done = loop.run(start, progress)
    if config.select == "pt":
        select = _perturbation(config, data, schedule, execution, jax.random.fold_in(key_split, 3))
    return _result(done, static, config, execution, mesh, key_impl, select or derive_genotype)


def _schedule(config, execution, n: int, key_split, checkpoint_every) -> Schedule:
    """The split of `n` training images between weights and alpha, and the epoch's chunks."""
    n_train = int(round(n * config.train_portion))
    n_val = n - n_train
    steps_per_epoch = min(n_train, n_val) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size (={config.batch_size}) is larger than the search split: {n} training images "
            f"give {n_train} for weights and {n_val} for alpha"
        )
    chunk_len, chunks = execution.chunking(steps_per_epoch, checkpoint_every)
    order = np.asarray(jax.random.permutation(key_split, n))
    train_pool, val_pool = jnp.asarray(order[:n_train]), jnp.asarray(order[n_train:])
    key_order = jax.random.fold_in(key_split, 1)
    return Schedule(train_pool, val_pool, key_order, config.batch_size, chunks * chunk_len, chunk_len)


def _start(start: Progress, schedule: Schedule, resume, checkpoint_dir, identity, allow_changes, key_impl):
    """`(progress, schedule)` to run from: `start` and `schedule`, or, when resuming and a
    checkpoint is found, where it left off (a partial epoch resumes with a chunk length dividing
    what is left of it)."""
    if not resume:
        return start, schedule
    found = _resume.restore(checkpoint_dir, start.state, identity, allow_changes, key_impl)
    if found is not None:
        start = Progress(found.state, found.epoch, found.epoch_step, found.history, found.epoch_metrics, found.path)
    chunk_len = _resume.resumed_chunk_len(schedule.chunk_len, start.epoch_step)
    return start, dataclasses.replace(schedule, chunk_len=chunk_len)


def _on_devices(arrays, mesh):
    if mesh is None:
        return tuple(jnp.asarray(a) for a in arrays)
    return _parallel.replicate(arrays, mesh)


def _hessian_tracking(config: SearchConfig, static, device_data, val_pool, key_split):
    """`(epoch_end, stop)` for the loop: record the Hessian eigenvalue on a fixed validation batch
    (so that epochs compare) and DARTS-ES's rule; `(None, None)` when the config asks for neither."""
    if not config.tracks_hessian:
        return None, None
    fixed = val_pool[: config.batch_size]
    batch = (device_data[0][fixed], device_data[1][fixed])

    @eqx.filter_jit
    def eigenvalue(arch, weights, x, y, key):
        loss = lambda a: supernet_loss(a, weights, static, x, y)[0]  # noqa: E731
        return hessian_eigenvalue(loss, arch, key=key, iterations=config.hessian_iterations)

    def epoch_end(record, state, epoch):
        key = jax.random.fold_in(jax.random.fold_in(key_split, 2), epoch)  # the state's key is donated
        record["hessian_eigenvalue"] = float(_parallel.fetch(eigenvalue(state.arch, state.weights, *batch, key)))

    factor = config.early_stop_factor  # the config is frozen
    if factor is None:
        return epoch_end, None

    def stop(history):
        eigenvalues = [h["hessian_eigenvalue"] for h in history]
        return grew(eigenvalues, factor, config.early_stop_window)

    return epoch_end, stop


def _perturbation(config, data, schedule: Schedule, execution: Execution, key):
    """DARTS-PT's selection on the search's data and split, as `select(supernet) -> genotype`, with
    the authors' fine-tuning (`perturbation_select`)."""
    from ._perturbation import perturbation_select

    images, labels = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    single = execution.replace(devices=None)
    whole_epochs = dataclasses.replace(schedule, chunk_len=schedule.steps_per_epoch)

    def select(supernet):
        return perturbation_select(supernet, config, images, labels, whole_epochs, key=key, execution=single)[0]

    return select


def _scored(epoch_end, score_genotype, select, static):
    """`epoch_end` that also adds `score_genotype(genotype)` to the epoch's record."""
    if score_genotype is None:
        return epoch_end

    def scored(record, state, epoch):
        if epoch_end is not None:
            epoch_end(record, state, epoch)
        record.update(score_genotype(select(combine_arch(state.arch, state.weights, static))))

    return scored


def _result(done: Progress, static, config, execution, mesh, key_impl: str, select) -> SearchResult:
    state = done.state
    if mesh is not None:  # hand back ordinary single-device arrays
        state = unsaved(jax.tree.map(lambda x: jnp.asarray(_parallel.fetch(x)), saved(state)), key_impl)
    supernet = combine_arch(state.arch, state.weights, static)
    if done.stopped_at is None:
        genotype = select(supernet)
    else:  # DARTS-ES: the architecture from before the eigenvalue grew
        record = done.history[done.stopped_at - 1 - config.early_stop_window]
        genotype = select(with_recorded_alpha(supernet, record))
    network = discretize(supernet, genotype)
    return SearchResult(
        genotype, supernet, network, done.history, config, done.epoch_seconds, done.stopped_at, execution
    )
