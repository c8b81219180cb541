"""Checkpoints of a search: what one must match to be resumed, and writing and reading them.

A checkpoint records the search's identity: its config (what it computes; never how it is
executed), a fingerprint of its data and its key. Resuming checks all three and names each
difference; `SAFE_TO_CHANGE` fields may differ when asked for by name.
"""

import dataclasses
import hashlib
import math
import os
import warnings

import jax
import numpy as np

from . import _checkpoint, _parallel
from ._checkpoint import CheckpointError, CheckpointWarning
from ._dtype import float_dtype
from ._fused import from_per_source_view, per_source_view
from ._state import SearchState, StepMetrics, saved, unsaved
from ._version import __version__

# Fields that may differ between a checkpoint and the search resuming it, when asked for by name:
# more (or fewer, but not fewer than done) epochs continue the same search on a longer schedule.
SAFE_TO_CHANGE = ("epochs",)
DEFAULT_CHECKPOINT_EVERY = 100
# How a search ran, which older checkpoints recorded in their config: not part of its identity.
_EXECUTION_FIELDS = ("steps_per_chunk", "shared_trace")
# Config fields that do not change the search's steps (how its genotype is selected at the end):
# a checkpoint resumes whatever they are.
_NOT_COMPARED = ("select",)


def data_fingerprint(data) -> dict:
    """What identifies the search data in a checkpoint: sizes and a SHA-256 of the training arrays."""
    digest = hashlib.sha256()
    for a in (data.x_train, data.y_train):
        digest.update(np.ascontiguousarray(a).tobytes())
    return {
        "name": data.name,
        "train": len(data.x_train),
        "image_shape": list(data.image_shape),
        "num_classes": data.num_classes,
        "sha256": digest.hexdigest(),
    }


def identity(config, data, key, method=None) -> dict:
    """What a checkpoint of this search must match (hashing the data costs a pass over it): with a
    user's method plug-in, its name too."""
    found = {
        "darts_eqx": __version__,
        "config": dataclasses.asdict(config),
        "data": data_fingerprint(data),
        "key": np.asarray(jax.random.key_data(key)).tolist(),
    }
    if method is not None:
        found["config"]["plugin"] = getattr(method, "__qualname__", type(method).__name__)
    return found


def check_options(checkpoint_dir, checkpoint_every, resume: bool, allow_changes) -> tuple[str | None, tuple]:
    """`(checkpoint_dir, allow_changes)` checked: a bad value is a `ValueError` naming it."""
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every (={checkpoint_every!r}) must be a positive integer")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir to resume from")
    allow_changes = tuple(allow_changes)
    unsafe = [k for k in allow_changes if k not in SAFE_TO_CHANGE]
    if unsafe:
        raise ValueError(f"allow_changes {unsafe}: only {list(SAFE_TO_CHANGE)} may differ from a checkpoint")
    checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
    if checkpoint_dir is not None and not resume and _checkpoint.list_checkpoints(checkpoint_dir):
        raise ValueError(
            f"{checkpoint_dir} holds checkpoints of a search: continue it with resume=True, or use another directory"
        )
    return checkpoint_dir, allow_changes


def _recorded_config(manifest: dict) -> dict:
    """The search config a checkpoint's manifest records, without the execution options older
    checkpoints kept in it. Empty when the manifest records none."""
    recorded = {k: v for k, v in manifest.get("config", {}).items() if k not in _EXECUTION_FIELDS + _NOT_COMPARED}
    if recorded:  # written before the config named the method: a user's plug-in was recorded as it
        from ._variants import METHODS

        if recorded.get("method", "darts") not in METHODS:
            recorded["plugin"] = recorded.pop("method")
        recorded.setdefault("method", "darts")
        recorded.setdefault("augment", False)  # written before searches augmented their batches
    return recorded


def check_resumable(path: str, manifest: dict, expected: dict, allow_changes) -> None:
    """Raise `CheckpointError` naming every way the checkpoint at `path` is not this search's."""
    old = _recorded_config(manifest)
    new = {k: v for k, v in expected["config"].items() if k not in _NOT_COMPARED}
    differing = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    blocked = [k for k in differing if k not in allow_changes]
    problems = []
    if blocked:
        fields = ", ".join(f"{k} (checkpoint {old.get(k)!r}, now {new.get(k)!r})" for k in blocked)
        safe = [k for k in blocked if k in SAFE_TO_CHANGE]
        hint = f"; to change {safe} on purpose, allow it (allow_changes / --allow-change)" if safe else ""
        problems.append(f"the config differs in {fields}{hint}")
    old_data, new_data = manifest.get("data", {}), expected["data"]
    if old_data.get("sha256") != new_data["sha256"]:
        problems.append(
            f"the data set differs (checkpoint: {old_data.get('name')!r}, {old_data.get('train')} images "
            f"{old_data.get('image_shape')}; now: {new_data['name']!r}, {new_data['train']} images "
            f"{new_data['image_shape']})"
        )
    if manifest.get("key") != expected["key"]:
        problems.append("the key (seed) differs")
    if problems:
        raise CheckpointError(f"cannot resume from {path}: " + "; ".join(problems))
    if manifest["epoch"] > new["epochs"]:
        raise CheckpointError(
            f"cannot resume from {path}: it has done {manifest['epoch']} epochs, more than epochs={new['epochs']}"
        )


@dataclasses.dataclass
class Restored:
    """Where a resumed search continues: its state, epoch, step in the epoch, history, the
    metrics of the epoch's steps done, and the checkpoint it came from."""

    state: SearchState
    epoch: int
    epoch_step: int
    history: list[dict]
    epoch_metrics: list[StepMetrics]
    path: str


def restore(checkpoint_dir: str, state: SearchState, expected: dict, allow_changes, key_impl: str):
    """The newest intact checkpoint in `checkpoint_dir` as a `Restored`, shaped like `state`; None
    (with a `CheckpointWarning`) when there is none."""
    found = _checkpoint.latest(checkpoint_dir)
    if found is None:
        warnings.warn(f"no checkpoint in {checkpoint_dir}: starting a new search", CheckpointWarning, stacklevel=3)
        return None
    path, manifest = found
    check_resumable(path, manifest, expected, allow_changes)
    # format 1 stored each cell's ops per source: read through that view, then stack
    per_source, like = manifest["format"] == 1, saved(state)
    like = per_source_view(like) if per_source else like
    loaded = _checkpoint.load_arrays(path, like)
    state = unsaved(from_per_source_view(loaded) if per_source else loaded, key_impl)
    metrics = []
    if manifest["epoch_step"]:
        metrics = [StepMetrics(*(np.asarray(v, float_dtype()) for v in manifest["epoch_metrics"]))]
    return Restored(state, manifest["epoch"], manifest["epoch_step"], manifest["history"], metrics, path)


def resumed_chunk_len(chunk_len: int, epoch_step: int) -> int:
    """The chunk length that lands on `epoch_step`, where a checkpoint was written with another
    chunking: shorter chunks, same result."""
    return chunk_len if epoch_step % chunk_len == 0 else math.gcd(chunk_len, epoch_step)


def save(checkpoint_dir: str, state: SearchState, record: dict) -> str:
    """Write `state` with the manifest `record` (process 0 only: every process holds the same
    state) and return the checkpoint's path."""
    step = int(_parallel.fetch(state.step))
    if not _parallel.is_main_process():
        return os.path.join(checkpoint_dir, f"step-{step:09d}")
    return _checkpoint.save(checkpoint_dir, step, jax.tree.map(_parallel.fetch, saved(state)), record)
