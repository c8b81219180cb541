"""The performance block against eager PyTorch, one process at a time, as a markdown table (and JSON
lines). Its current figures are in experiments/RESULTS.md.

    python experiments/bench_block.py --torch-python torchref/bin/python --json runs/bench_block.jsonl

In this order: eager PyTorch first order, darts_eqx first order (two traces, then the shared
trace), eager PyTorch second order, darts_eqx second order with finite differences (four traces,
then the shared trace) and with the exact estimator (`order=2`'s default; eager PyTorch has only
finite differences, so its ratio is to that), eager PyTorch first order again (the machine's
drift over the block), all at C=8, layers=5, batch 32, 32x32; then the compile of one chunk (no
run) at C=16, layers=8, batch 64: first order, second order with four traces, with the shared
trace, and with the exact estimator. Ratios are to the PyTorch runs of the same order in the same
block. The PyTorch rows run the reference script (`--torch-ref`, by default
`../shared/bench/torch_ref_darts.py` beside the repository) with a Python that has PyTorch
(`--torch-python`, by default `$DARTS_EQX_TORCH_PYTHON`), e.g. a virtualenv made with
`python3 -m venv torchref && torchref/bin/pip install torch==2.13.0`; `--no-torch` runs the
darts_eqx rows only. Absolute figures on a shared or busy machine are noise: run it on an idle one
and compare within one block.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TORCH_PYTHON_ENV = "DARTS_EQX_TORCH_PYTHON"
TORCH_SETUP = "python3 -m venv torchref && torchref/bin/pip install torch==2.13.0"
SMALL = ["--C", "8", "--layers", "5", "--batch", "32", "--image", "32", "--steps", "8"]
LARGE = ["--C", "16", "--layers", "8", "--batch", "64", "--image", "32", "--steps", "4", "--compile-only"]
FD = ["--order", "2", "--estimator", "finite_difference"]
EXACT = ["--order", "2", "--estimator", "exact"]

# (label, runner, arguments): runner "torch" is the PyTorch reference, "eqx" bench_search.py
BLOCK = [
    ("order 1, eager PyTorch", "torch", ["--order", "1", *SMALL]),
    ("order 1, darts_eqx, two traces (default)", "eqx", [*SMALL, "--no-shared-trace"]),
    ("order 1, darts_eqx, shared trace", "eqx", [*SMALL, "--shared-trace"]),
    ("order 2 (FD), eager PyTorch", "torch", ["--order", "2", *SMALL]),
    ("order 2 (FD), darts_eqx, four traces", "eqx", [*FD, *SMALL, "--no-shared-trace"]),
    ("order 2 (FD), darts_eqx, shared trace (default)", "eqx", [*FD, *SMALL, "--shared-trace"]),
    ("order 2 (exact), darts_eqx (the default estimator)", "eqx", [*EXACT, *SMALL]),
    ("order 1, eager PyTorch (again)", "torch", ["--order", "1", *SMALL]),
    ("compile C=16 L=8 B=64, order 1, two traces (default)", "eqx", [*LARGE, "--no-shared-trace"]),
    ("compile C=16 L=8 B=64, order 2 (FD), four traces", "eqx", [*FD, *LARGE, "--no-shared-trace"]),
    ("compile C=16 L=8 B=64, order 2 (FD), shared trace (default)", "eqx", [*FD, *LARGE, "--shared-trace"]),
    ("compile C=16 L=8 B=64, order 2 (exact)", "eqx", [*EXACT, *LARGE]),
]


def run_one(command: list[str], timeout_s: float) -> dict:
    """The last JSON line the command prints, or {"error": ...}."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    lines = done.stderr.strip().splitlines()
    return {"error": f"exit {done.returncode}: {lines[-1] if lines else 'no output'}"}


def order_of(label: str) -> int:
    return 2 if "order 2" in label else 1


def table(results: list[tuple[str, dict]]) -> str:
    torch_speed = {}
    for label, r in results:
        if "PyTorch" in label and "steps_per_s" in r:
            torch_speed.setdefault(order_of(label), []).append(r["steps_per_s"])
    rows = ["| run | steps/s | vs PyTorch | compile s | peak RSS |", "|---|---|---|---|---|"]
    for label, r in results:
        if "error" in r:
            rows.append(f"| {label} | {r['error']} | | | |")
            continue
        speed = r.get("steps_per_s")
        ratio = ""
        refs = torch_speed.get(order_of(label))
        if speed and refs and "PyTorch" not in label:
            low, high = speed / max(refs), speed / min(refs)
            ratio = f"{low:.2f}x" if abs(high - low) < 0.005 else f"{low:.2f}-{high:.2f}x"
        compile_s = r.get("compile_s")
        if "lower_s" in r:
            compile_s = f"{r['compile_s']:.1f} ({r['lower_s']:.1f} + {r['xla_compile_s']:.1f})"
        elif compile_s is not None:
            compile_s = f"{compile_s:.1f}"
        rows.append(
            f"| {label} | {'' if speed is None else f'{speed:.3f}'} | {ratio} | {compile_s or '-'} "
            f"| {r['peak_rss_mb'] / 1024:.2f} GB |"
        )
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--torch-python",
        default=os.environ.get(TORCH_PYTHON_ENV) or None,
        metavar="PATH",
        help=f"the Python interpreter that has torch, for the PyTorch rows (default: ${TORCH_PYTHON_ENV})",
    )
    parser.add_argument(
        "--torch-ref",
        "--torch-script",
        dest="torch_ref",
        default=str(HERE.parent.parent / "shared/bench/torch_ref_darts.py"),
        metavar="PATH",
        help="the eager PyTorch reference script (default: ../shared/bench/torch_ref_darts.py beside the repository)",
    )
    parser.add_argument("--no-torch", action="store_true", help="run the darts_eqx rows only, without PyTorch")
    parser.add_argument("--json", help="also append each run's JSON line (with its label) to this file")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    a = parser.parse_args()
    has_torch = not a.no_torch
    if has_torch:
        if a.torch_python is None:
            parser.error(
                f"the PyTorch rows need a Python interpreter that has torch: pass --torch-python PATH or set "
                f"${TORCH_PYTHON_ENV}, e.g. after `{TORCH_SETUP}` use --torch-python torchref/bin/python "
                "(or --no-torch for the darts_eqx rows only)"
            )
        # Absolute, since the runs' working directory is the repository root.
        python = shutil.which(a.torch_python)
        if python is None:
            parser.error(f"--torch-python {a.torch_python}: no such interpreter (set-up: `{TORCH_SETUP}`)")
        if not os.path.exists(a.torch_ref):
            parser.error(f"--torch-ref {a.torch_ref}: no such file (the eager PyTorch reference script)")
        a.torch_python, a.torch_ref = os.path.abspath(python), os.path.abspath(a.torch_ref)
    else:
        print("no PyTorch reference (--no-torch): darts_eqx rows only", file=sys.stderr)
    results = []
    for label, runner, args in BLOCK:
        if runner == "torch" and not has_torch:
            continue
        command = (
            [a.torch_python, a.torch_ref, *args]
            if runner == "torch"
            else [sys.executable, str(HERE / "bench_search.py"), *args]
        )
        result = run_one(command, a.timeout)
        results.append((label, result))
        print(f"{label}: {json.dumps(result)}", file=sys.stderr, flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps({"label": label, **result}) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
