"""What a run reports as it goes: `metrics.jsonl` in its run folder (one JSON record per scan-fused
chunk), TensorBoard event files, a callback per record, and progress on stderr (a tqdm bar on a
terminal, else one plain line per epoch).

Records are made on the host between chunks, from the metrics a chunk returns and the state after
it: nothing is added inside the compiled loop. Like `history.json`, `metrics.jsonl` holds no
wall-clock times, so the same run writes the same file, and a resumed run the file of the run
never interrupted.
"""

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from . import _parallel
from ._checkpoint import atomic_write_text

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Fields of a record that are not scalars to plot.
_NOT_SCALARS = ("step", "epoch")
_INSTALL_HINT = "pip install 'darts_eqx[tensorboard]'"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a run's `metrics.jsonl`, oldest first.

    **Arguments:**
    - `path`: the file, or the run folder holding it.

    **Returns:** a list of dicts, one per chunk of steps. A last line without its newline (a run
    writing it right now, or killed while writing it) is left out.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines[:-1], start=1):  # the last: "", or a record partly written
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as e:
            raise ValueError(f"{path}, line {number}: not a JSON record ({e})") from None
    return records


def alpha_entropies(weights: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The entropy (in nats) of softmax(alpha) of each edge, averaged over the edges, per cell kind:
    `entropy_normal` for `alpha_normal` and so on (`entropy` for a single kind), from the
    softmax(alpha) of `_supernet.arch_weights`. It lies in [0, log(number of ops)]: 0 when each
    edge has chosen one op, log(ops) while all weigh the same."""
    out = {}
    for name, p in weights.items():
        if not name.startswith("alpha"):
            continue  # PC-DARTS' edge weights beta are not a choice among ops
        p = np.asarray(p, np.float64)
        p = p.reshape(-1, p.shape[-1])
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        out["entropy" + name[len("alpha") :]] = float(terms.sum(axis=1).mean())
    return out


def _tensorboard_writer_class():
    """tensorboardX's `SummaryWriter`: a writer of TensorBoard event files that needs neither
    TensorFlow nor PyTorch."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError as e:
        raise ImportError(f"TensorBoard event files need tensorboardX ({e}): {_INSTALL_HINT}") from e
    return SummaryWriter


def check_tensorboard() -> None:
    """Raise an `ImportError` with the install command when the TensorBoard writer is missing."""
    _tensorboard_writer_class()


class MetricsLog:
    """Where a run's chunk records go: `directory/metrics.jsonl` (flushed after each record),
    TensorBoard event files under `directory/tensorboard/` when `tensorboard`, and
    `callback(record)`. Only process 0 writes and calls back. A log without a directory or callback
    does nothing."""

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        tensorboard: bool = False,
        callback: Callable[[dict], object] | None = None,
    ):
        if tensorboard and directory is None:
            raise ValueError("tensorboard=True needs a metrics_dir to write its event files under")
        if tensorboard:
            check_tensorboard()  # before anything is compiled
        self.directory = None if directory is None else os.fspath(directory)
        self.tensorboard = tensorboard
        self.callback = callback
        self._file = None
        self._writer = None

    @property
    def enabled(self) -> bool:
        return (self.directory is not None or self.callback is not None) and _parallel.is_main_process()

    def open(self, step: int) -> None:
        """Start writing after global step `step` (0 for a new run): records of later steps already in
        the folder (written by a run killed after its last checkpoint, or by an older run) are dropped,
        and TensorBoard is told to hide its events from step `step + 1` on."""
        if self.directory is None or not self.enabled:
            return
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, METRICS_FILE)
        kept = [r for r in read_metrics(path) if r["step"] <= step] if os.path.exists(path) else []
        atomic_write_text(path, "".join(_line(r) for r in kept))
        self._file = open(path, "a")
        if self.tensorboard:
            # purge_step: TensorBoard hides the events of later steps in the older files. The
            # suffix keeps two writers started within one second (the name's timestamp) apart.
            writer = _tensorboard_writer_class()
            folder = os.path.join(self.directory, TENSORBOARD_DIR)
            self._writer = writer(folder, purge_step=step + 1, filename_suffix=f".step-{step:09d}")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(_line(record))
            self._file.flush()
        if self._writer is not None:
            for name, value in record.items():
                if name not in _NOT_SCALARS:
                    self._writer.add_scalar(name, value, record["step"])
            self._writer.flush()
        if self.callback is not None:
            self.callback(dict(record))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _line(record: dict) -> str:
    return json.dumps(record) + "\n"


class ProgressReport:
    """Progress on stderr. `enabled=None` (the default): a tqdm bar on a terminal, else one plain
    line per epoch (`epoch 3/8: train_loss 0.4210, ..., 12.3 s`) that a log file keeps readable;
    True: the bar anywhere; False: nothing. `shown` names the epoch record's fields to show."""

    def __init__(self, total: int, initial: int, epochs: int, enabled: bool | None, shown: Sequence[str]):
        self.epochs, self.shown = epochs, tuple(shown)
        self._plain = enabled is None and not _is_terminal(sys.stderr)
        self._bar = None
        if enabled or (enabled is None and not self._plain):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(self, steps: int) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def epoch(self, record: dict, seconds: float) -> None:
        """Report the end of an epoch with its record (`epoch` counts from 1)."""
        shown = {name: record[name] for name in self.shown if name in record}
        if self._bar is not None:
            self._bar.set_postfix({"epoch": record["epoch"], **{k: f"{v:.3f}" for k, v in shown.items()}})
        elif self._plain:
            parts = [*(f"{k} {v:.4f}" for k, v in shown.items()), f"{seconds:.1f} s"]
            print(f"epoch {record['epoch']}/{self.epochs}: " + ", ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
