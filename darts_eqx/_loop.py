"""The search's outer loop: epochs of scan-fused chunks, each epoch's record, each chunk's metrics
record, checkpoints, callbacks and early stopping. The steps themselves run inside the chunk
(`_step.make_chunk_fn`)."""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from . import _parallel, _resume
from ._config import SearchConfig
from ._metrics import MetricsLog, ProgressReport, alpha_entropies
from ._mixed import combine_arch
from ._optim import epoch_lr
from ._state import SearchState, StepMetrics
from ._supernet import arch_weights

# What the progress report shows of each epoch's record.
_SHOWN = ("train_loss", "train_acc", "val_loss", "val_acc")
# Fields an epoch's record gets at the epoch's end (`SearchLoop.epoch_end`) that its last chunk's
# metrics record carries too.
_EPOCH_EXTRAS = ("hessian_eigenvalue",)


class SearchDiverged(FloatingPointError):
    """A loss or alpha became non-finite during search; no genotype is derived from it."""


@dataclass(frozen=True)
class Schedule:
    """Which images each step sees: the weights' and alpha's halves of the training set, and the
    per-epoch order drawn from `key_order`, cut into `chunks` of `chunk_len` steps of `batch_size`."""

    train_pool: jax.Array
    val_pool: jax.Array
    key_order: jax.Array
    batch_size: int
    steps_per_epoch: int
    chunk_len: int

    @property
    def chunks(self) -> int:
        return self.steps_per_epoch // self.chunk_len

    def indices(self, epoch: int, host: bool):
        """`(train, val)` index arrays `[chunks, chunk_len, batch]` of `epoch` (NumPy if `host`)."""
        used = self.steps_per_epoch * self.batch_size
        key_t, key_v = jax.random.split(jax.random.fold_in(self.key_order, epoch))
        train = jax.random.permutation(key_t, self.train_pool)[:used].reshape(self.chunks, self.chunk_len, -1)
        val = jax.random.permutation(key_v, self.val_pool)[:used].reshape(self.chunks, self.chunk_len, -1)
        return (np.asarray(train), np.asarray(val)) if host else (train, val)


@dataclass
class Progress:
    """Where a search stands: its state, the epoch and step it continues from, the history so far,
    the metrics of the current epoch's steps, and the newest checkpoint."""

    state: SearchState
    epoch: int = 0
    epoch_step: int = 0
    history: list[dict] = field(default_factory=list)
    epoch_metrics: list[StepMetrics] = field(default_factory=list)
    last_checkpoint: str | None = None
    stopped_at: int | None = None
    epoch_seconds: list[float] = field(default_factory=list)


@dataclass
class SearchLoop:
    """Runs epochs of `chunk`s (see the module docstring). `epoch_end(record, state, epoch)` adds to
    each epoch's record (the Hessian eigenvalue); `stop(history)` ends the search early; `metrics`
    takes a record of each chunk."""

    chunk: Callable[[tuple, SearchState], tuple[SearchState, StepMetrics]]
    schedule: Schedule
    device_data: tuple
    mesh: Mesh | None
    static: object
    config: SearchConfig
    checkpoint_dir: str | None = None
    checkpoint_every: int = _resume.DEFAULT_CHECKPOINT_EVERY
    identity: dict | None = None
    callback: Callable[[list[dict], Any], object] | None = None
    epoch_end: Callable[[dict, SearchState, int], object] | None = None
    stop: Callable[[list[dict]], bool] | None = None
    metrics: MetricsLog = field(default_factory=MetricsLog)

    def run(self, progress: Progress, show: bool | None) -> Progress:
        s = self.schedule
        done_steps = progress.epoch * s.steps_per_epoch + progress.epoch_step
        report = ProgressReport(self.config.epochs * s.steps_per_epoch, done_steps, self.config.epochs, show, _SHOWN)
        try:
            self.metrics.open(int(_parallel.fetch(progress.state.step)))
            for epoch in range(progress.epoch, self.config.epochs):
                start = time.perf_counter()
                last = self._run_chunks(progress, epoch, report)
                record = self._record(progress, epoch)
                if last is not None:  # the epoch's last chunk: its record also has the epoch's extras
                    self.metrics.write({**last, **{k: record[k] for k in _EPOCH_EXTRAS if k in record}})
                progress.history.append(record)
                progress.epoch_seconds.append(time.perf_counter() - start)
                progress.epoch, progress.epoch_step, progress.epoch_metrics = epoch + 1, 0, []
                if self.checkpoint_dir:
                    self._save(progress)
                report.epoch(record, progress.epoch_seconds[-1])
                if self.callback is not None:
                    self.callback(list(progress.history), self._supernet(progress.state))
                if self.stop is not None and self.stop(progress.history):
                    progress.stopped_at = epoch + 1
                    break
        finally:
            report.close()
            self.metrics.close()
        return progress

    def _run_chunks(self, progress: Progress, epoch: int, report: ProgressReport) -> dict | None:
        """Run what is left of `epoch`; each chunk's metrics record is written as it comes, but the
        last chunk's is returned (None without a metrics log) to be completed at the epoch's end.
        A record is written before the checkpoint of its step, so a resumed run misses none."""
        s, mesh = self.schedule, self.mesh
        train_idx, val_idx = s.indices(epoch, host=mesh is not None)
        lrs = {"w_lr": float(epoch_lr(self.config, epoch)), "a_lr": float(self.config.a_lr)}
        unsaved_steps, record = 0, None
        for c in range(progress.epoch_step // s.chunk_len, s.chunks):
            step_before = int(_parallel.fetch(progress.state.step))
            idx = _parallel.shard_rows(train_idx[c], mesh), _parallel.shard_rows(val_idx[c], mesh)
            progress.state, m = self.chunk((*self.device_data, *idx), progress.state)
            m = jax.tree.map(_parallel.fetch, m)
            _check_finite(m, progress.state, step_before, epoch, progress.last_checkpoint)
            progress.epoch_metrics.append(m)
            progress.epoch_step = (c + 1) * s.chunk_len
            report.update(s.chunk_len)
            if self.metrics.enabled:
                record = self._chunk_record(progress.state, m, step_before + s.chunk_len, epoch, lrs)
                if progress.epoch_step < s.steps_per_epoch:
                    self.metrics.write(record)
            unsaved_steps += s.chunk_len
            due = unsaved_steps + s.chunk_len > self.checkpoint_every
            if self.checkpoint_dir and progress.epoch_step < s.steps_per_epoch and due:
                self._save(progress)
                unsaved_steps = 0
        return record

    def _chunk_record(self, state: SearchState, metrics: StepMetrics, step: int, epoch: int, lrs: dict) -> dict:
        """One chunk's metrics record: its steps' mean metrics, the learning rates, and the entropy
        of softmax(alpha) after it."""
        return {
            "step": step,
            "epoch": epoch + 1,
            **{name: float(np.mean(values)) for name, values in metrics._asdict().items()},
            **lrs,
            **alpha_entropies(arch_weights(self._supernet(state))),
        }

    def _record(self, progress: Progress, epoch: int) -> dict:
        metrics = StepMetrics(*(np.concatenate(v) for v in zip(*progress.epoch_metrics)))
        record = {
            "epoch": epoch + 1,
            **{name: float(values.mean()) for name, values in metrics._asdict().items()},
            "lr": float(epoch_lr(self.config, epoch)),
            **{k: v.tolist() for k, v in arch_weights(self._supernet(progress.state)).items()},
        }
        if self.epoch_end is not None:
            self.epoch_end(record, progress.state, epoch)
        return record

    def _supernet(self, state: SearchState):
        return combine_arch(state.arch, state.weights, self.static)

    def _save(self, progress: Progress) -> None:
        # only called with a checkpoint directory, and `search` gives those an identity
        assert self.checkpoint_dir is not None and self.identity is not None
        metrics = progress.epoch_metrics
        joined = [np.concatenate(v).tolist() for v in zip(*metrics)] if metrics else None
        record = {
            **self.identity,
            "epoch": progress.epoch,
            "epoch_step": progress.epoch_step,
            "history": progress.history,
            "epoch_metrics": joined,
        }
        progress.last_checkpoint = _resume.save(self.checkpoint_dir, progress.state, record)


@eqx.filter_jit
def _finite(state: SearchState):
    def all_finite(tree):
        leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))]
        return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)

    return all_finite(state.weights), all_finite(state.arch)


def _check_finite(metrics: StepMetrics, state: SearchState, step_before: int, epoch: int, last_checkpoint):
    """Stop at the first non-finite loss or gradient norm of a chunk, or non-finite weights/alpha
    after it, before anything derived from it is saved."""
    kept = f"; the last good checkpoint {last_checkpoint} is kept" if last_checkpoint else ""
    for name, values in metrics._asdict().items():
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise SearchDiverged(
                f"{name} became non-finite ({values[bad[0]]}) at step {step_before + int(bad[0]) + 1} "
                f"(epoch {epoch + 1}); the search stopped and no genotype was derived{kept}. Try a lower w_lr or a_lr."
            )
    weights_ok, arch_ok = (bool(_parallel.fetch(v)) for v in _finite(state))
    for name, ok in (("weights", weights_ok), ("alpha", arch_ok)):
        if not ok:
            raise SearchDiverged(
                f"{name} became non-finite by step {int(_parallel.fetch(state.step))} (epoch {epoch + 1}); "
                f"the search stopped and no genotype was derived{kept}"
            )
