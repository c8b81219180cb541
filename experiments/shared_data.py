"""What the experiments share: where ../shared/data lies, image pooling, and report writing."""

import json
import os
import subprocess

import numpy as np

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
CIFAR10_SUBSET = os.path.join(SHARED_DATA, "cifar10_10k.npz")
NB201_TABLE = os.path.join(SHARED_DATA, "nb201_accuracy.csv")


def pooled(x: np.ndarray, size: int) -> np.ndarray:
    """Average-pool NHWC images down to `size` x `size` (an integer factor)."""
    factor = x.shape[1] // size
    if factor * size != x.shape[1]:
        raise ValueError(f"--image-size {size} must divide the image size {x.shape[1]}")
    n, _, _, c = x.shape
    return x.astype(np.float32).reshape(n, size, factor, size, factor, c).mean(axis=(2, 4))


def write_report(out: str, lines: list[str]) -> None:
    """`out/report.md` from Markdown `lines`, echoed to stdout."""
    report = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report)
    print(report)


def commit() -> str:
    """The short hash of the checked-out commit, or "unknown" outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip()


def jsonl_rows(path: str) -> list[dict]:
    """The rows of a JSON-lines file (none if it does not exist); a last line cut short by a kill
    is skipped."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return rows
