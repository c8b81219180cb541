"""Atomic, verified checkpoints: one folder per checkpoint holding the arrays and a JSON manifest.

Arrays go through `eqx.tree_serialise_leaves` (already a dependency; exact bytes, no new format
or service to install: orbax would add tensorstore and async machinery we do not need for one
host-local tree). The manifest holds everything else (step, config, history, ...), the SHA-256
of the array file and its own, so a truncated or corrupted checkpoint is detected before anything
is loaded.

A checkpoint is written into a hidden temporary folder, fsynced, then renamed into place (rename
is atomic on POSIX); the `keep` newest complete checkpoints are kept, so a kill at any instant
leaves at least one loadable checkpoint.
"""

import hashlib
import io
import json
import os
import re
import shutil
import warnings

import equinox as eqx
import jax
import numpy as np

FORMAT = 2  # 2: the supernet's cells store their ops stacked per source group
READS = (1, 2)  # 1: per source, read through `_fused.per_source_view`
_NAME = re.compile(r"^step-(\d{9})$")


class CheckpointError(ValueError):
    """No usable checkpoint, or one that does not belong to this search."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (unreadable); an older one was used instead."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old or the new file, never a partial one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    _write(tmp, data)
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def serialised(tree) -> bytes:
    """The bytes `eqx.tree_serialise_leaves` writes for `tree`."""
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, tree)
    return buffer.getvalue()


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, str]]:
    """Complete checkpoint folders in `directory` as `(step, path)`, newest first."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found, reverse=True)


def save(directory: str | os.PathLike, step: int, tree, manifest: dict, *, keep: int = 2) -> str:
    """Write `tree` (arrays) and `manifest` (JSON-able) as checkpoint `step`; prune to `keep`."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    data = serialised(tree)
    manifest = {**manifest, "format": FORMAT, "step": step, "arrays_sha256": hashlib.sha256(data).hexdigest()}
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    final = os.path.join(directory, f"step-{step:09d}")
    tmp = os.path.join(directory, f".tmp-step-{step:09d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _write(os.path.join(tmp, "arrays.eqx"), data)
    _write(os.path.join(tmp, "manifest.json"), json.dumps(manifest).encode())
    _fsync_dir(tmp)
    if os.path.exists(final):  # a corrupted one we fell back from, or the same step written again
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(directory)
    for _, old in list_checkpoints(directory)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_manifest(path: str) -> dict:
    """The manifest of checkpoint folder `path`, after checking the array file's checksum."""
    try:
        with open(os.path.join(path, "manifest.json"), "rb") as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"unreadable manifest ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or "arrays_sha256" not in manifest:
        raise CheckpointError("manifest is not a darts_eqx checkpoint manifest")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise CheckpointError("manifest.json does not match its checksum (corrupted)")
    if manifest.get("format") not in READS:
        raise CheckpointError(f"checkpoint format {manifest.get('format')!r}, this darts_eqx reads {list(READS)}")
    try:
        with open(os.path.join(path, "arrays.eqx"), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise CheckpointError(f"unreadable arrays ({e})") from None
    if digest != manifest["arrays_sha256"]:
        raise CheckpointError("arrays.eqx does not match its checksum (truncated or corrupted)")
    return manifest


def latest(directory: str | os.PathLike) -> tuple[str, dict] | None:
    """The newest checkpoint in `directory` whose files are intact, as `(path, manifest)`; None if
    there is none at all. Unreadable ones are skipped with a `CheckpointWarning`; if every one is
    unreadable, `CheckpointError` lists why."""
    directory = os.fspath(directory)
    problems = []
    for _, path in list_checkpoints(directory):
        try:
            manifest = _read_manifest(path)
        except CheckpointError as e:
            problems.append(f"{os.path.basename(path)}: {e}")
            warnings.warn(f"skipping checkpoint {path}: {e}; trying an older one", CheckpointWarning, stacklevel=2)
            continue
        return path, manifest
    if problems:
        raise CheckpointError(f"no loadable checkpoint in {directory}: " + "; ".join(problems))
    return None


def load_arrays(path: str, like):
    """The arrays of checkpoint folder `path`, shaped like `like`; a leaf of another shape or dtype
    (a checkpoint of another network) is an error naming it."""
    paths = iter(jax.tree_util.tree_flatten_with_path(like)[0])

    def checked(f, x):
        name = jax.tree_util.keystr(next(paths)[0])
        if not eqx.is_array(x):
            return x
        try:
            value = np.load(f)
        except Exception as e:  # np.load's errors on a bad stream vary
            raise CheckpointError(f"{path}: cannot read array {name} ({e})") from None
        if value.shape != x.shape or value.dtype != x.dtype:
            raise CheckpointError(
                f"{path}: array {name} is {value.dtype}{list(value.shape)}, this search expects "
                f"{x.dtype}{list(x.shape)}: the checkpoint belongs to another network"
            )
        # A copy: on CPU `asarray` may share the NumPy buffer, and the search donates its state's
        # buffers to each chunk (with jax 0.5 a resumed search then read freed memory now and then).
        return jax.numpy.array(value, copy=True)

    try:
        return eqx.tree_deserialise_leaves(os.path.join(path, "arrays.eqx"), like, filter_spec=checked)
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, CheckpointError):  # Equinox wraps errors per leaf
            cause = cause.__cause__
        raise (cause or CheckpointError(f"{path}: cannot read arrays ({e})")) from None
