"""NAS-Bench-201 study: which DARTS variants find good cells, and which drift towards parameter-free
ones, on the CIFAR-10 subset with every epoch's cell looked up in the benchmark table.

    python experiments/nb201_study.py [--out runs/nb201_study] [--seeds 0 1 2] [--methods ...]
        [--data ../shared/data/cifar10_10k.npz] [--table ../shared/data/nb201_accuracy.csv]

Resumable: each search checkpoints into OUT/runs/METHOD-seedS/ and a rerun continues where it
stopped (a killed search resumes from its last checkpoint, bit for bit); finished searches are
lines of OUT/results.jsonl. Searches run seed by seed across the methods, so a partial study is
balanced. OUT/report.md holds the table (benchmark test accuracy, mean ± std over seeds; the share
of parameter-free ops, `none`, `skip_connect` and `avg_pool_3x3`, in the final cells; wall time per
search) and OUT/anytime.png the CIFAR-10 accuracy of each epoch's cell, mean over seeds.

Search batches are cropped and flipped as the DARTS code's (`--no-augment`: not; on 2,000 images
the weights then memorise their half within the search). The budget is cut to fit a 2-core CPU
(each cut is a flag); the published figures come from full searches (C=16, 5 cells per stage,
32x32 images, 25,000 images, 50-100 epochs), so the comparison says how the methods behave at this
budget. Hyper-parameters are the papers' (`darts_eqx.methods`);
beta-DARTS follows the authors' NAS-Bench-201 code, whose lambda grows by 0.5 per epoch (50 *
epoch / 100, reaching 24.5 in 50 epochs); DARTS-PT is the
first-order DARTS search (the same key gives the same supernet) selected by perturbation.
"""

import argparse
import csv
import json
import os
import shutil
import sys
import time
import warnings

import equinox as eqx
import jax
import numpy as np
from shared_data import CIFAR10_SUBSET, NB201_TABLE, commit, jsonl_rows, pooled, write_report

import darts_eqx as dx

# name -> search options (the rest of the config is the paper's DARTS search)
METHODS = {
    "darts-1st": dict(order=1),
    "darts-pt": dict(order=1, select="pt"),  # the darts-1st search (same key), selected by perturbation
    "darts-2nd": dict(order=2),
    "beta-darts": {},  # beta_reg from the epochs: `method_options`
    "darts-minus": dict(aux_skip=1.0),
    "gdas": dict(method="gdas"),
    "drnas": dict(method="drnas"),
    "sdarts-rs": dict(method="sdarts-rs"),
    "fairdarts": dict(method="fairdarts"),
}
# The authors' NAS-Bench-201 search weighs the beta loss by 50 * epoch / 100 (epoch from 0);
# darts_eqx ramps lambda from 0 at the first epoch to `beta_reg` at the last, so the same slope is
# beta_reg = 0.5 * (epochs - 1).
BETA_PER_EPOCH = 0.5
PARAMETER_FREE = ("none", "skip_connect", "avg_pool_3x3")
DATASETS = ("cifar10", "cifar100", "imagenet16-120")
BUDGET = ("images", "image_size", "channels", "cells", "epochs", "batch_size", "augment", "arch_lr")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=CIFAR10_SUBSET)
    p.add_argument("--table", default=NB201_TABLE)
    p.add_argument("--out", default="runs/nb201_study")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--cells", type=int, default=1, help="cells per stage")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--arch-lr",
        type=float,
        default=dx.SearchConfig.a_lr,
        help="alpha's Adam learning rate (the paper's: %(default)g)",
    )
    p.add_argument(
        "--augment", action=argparse.BooleanOptionalAction, default=True, help="crop and flip search batches"
    )
    p.add_argument("--report-only", action="store_true", help="write the report from what has finished")
    a = p.parse_args()
    for path in (a.data, a.table):
        if not os.path.exists(path):
            print(f"skipped: {path} not found", file=sys.stderr)
            return
    os.makedirs(os.path.join(a.out, "runs"), exist_ok=True)
    if not a.report_only:
        with np.load(a.data) as f:
            x, y = pooled(f["x_train"][: a.images], a.image_size), f["y_train"][: a.images]
        data = dx.data.from_arrays(x, y, name=os.path.basename(a.data))
        for seed in a.seeds:
            for method in a.methods:
                if (method, seed) not in finished(a.out):
                    run(a, data, method, seed)
    report(a)


def method_options(method: str, epochs: int) -> dict:
    if method == "beta-darts":
        return dict(beta_reg=BETA_PER_EPOCH * (epochs - 1))
    return METHODS[method]


def finished(out: str) -> dict:
    rows = {(r["method"], r["seed"]): r for r in jsonl_rows(os.path.join(out, "results.jsonl"))}
    for (method, seed), r in rows.items():
        if "options" in r and method in METHODS and r["options"] != method_options(method, r["budget"]["epochs"]):
            raise SystemExit(
                f"{out}/results.jsonl: {method} seed {seed} ran with {r['options']}, not today's "
                f"{method_options(method, r['budget']['epochs'])}: move that row and its run folder aside"
            )
    return rows


def run(a, data, method: str, seed: int) -> None:
    folder = os.path.join(a.out, "runs", f"{method}-seed{seed}")
    plain = os.path.join(a.out, "runs", f"darts-1st-seed{seed}")
    if method == "darts-pt" and not os.path.exists(folder) and ("darts-1st", seed) in finished(a.out):
        # DARTS-PT selects on the darts-1st supernet (same key and config): resume its finished
        # search instead of repeating it; the selection is all that runs
        shutil.copytree(os.path.join(plain, "checkpoints"), os.path.join(folder, "checkpoints"))
        shutil.copy(os.path.join(plain, "seconds.json"), folder)
    os.makedirs(folder, exist_ok=True)
    seconds_path = os.path.join(folder, "seconds.json")
    seconds = json.load(open(seconds_path)) if os.path.exists(seconds_path) else []
    clock = [time.perf_counter()]

    def timed(history, supernet):  # wall time per epoch, kept across resumes
        now = time.perf_counter()
        del seconds[len(history) - 1 :]
        seconds.append(now - clock[0])
        clock[0] = now
        with open(seconds_path, "w") as f:
            json.dump(seconds, f)
        print(f"{method} seed {seed}: epoch {len(history)}, {history[-1]['nb201']['cifar10']:.2f}", flush=True)

    warnings.filterwarnings("ignore", message="no checkpoint in", category=dx.CheckpointWarning)
    result = dx.search(
        jax.random.key(seed),
        data,
        space="nb201",
        channels=a.channels,
        layers=a.cells,
        epochs=a.epochs,
        batch_size=a.batch_size,
        checkpoint_dir=os.path.join(folder, "checkpoints"),
        resume=True,
        progress=False,
        callback=timed,
        score_genotype=dx.nb201.benchmark_scores(a.table),
        augment=a.augment,
        a_lr=a.arch_lr,
        **method_options(method, a.epochs),
    )
    eqx.tree_serialise_leaves(os.path.join(folder, "supernet.eqx"), result.supernet)
    row = {
        "method": method,
        "seed": seed,
        "arch": str(result.genotype),
        **dx.nb201.lookup(result.genotype, a.table),  # the selected cell (PT's differs from the last argmax)
        "parameter_free": parameter_free_share(str(result.genotype)),
        "seconds": float(sum(seconds) + time.perf_counter() - clock[0]),  # epochs + selection
        "anytime": [h["nb201"] for h in result.history],
        "budget": {k: getattr(a, k) for k in BUDGET},
        "options": method_options(method, a.epochs),
        "commit": commit(),
    }
    with open(os.path.join(a.out, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def parameter_free_share(arch: str) -> float:
    """Share of a NAS-Bench-201 cell's 6 edges whose op has no parameters."""
    ops = [part.split("~")[0] for part in arch.replace("+", "").split("|") if "~" in part]
    return sum(op in PARAMETER_FREE for op in ops) / len(ops)


def report(a) -> None:
    rows = finished(a.out)
    if not rows:
        return
    budget = next(iter(rows.values()))["budget"]
    lines = [
        "# NAS-Bench-201 study on the CIFAR-10 subset",
        "",
        f"Budget: first {budget['images']} images of the subset pooled to {budget['image_size']}x"
        f"{budget['image_size']}, C={budget['channels']}, {budget['cells']} cell(s) per stage, "
        f"{budget['epochs']} epochs, batch {budget['batch_size']}, "
        f"{'search batches cropped and flipped' if budget.get('augment') else 'no augmentation'}, "
        f"alpha's learning rate {budget.get('arch_lr') or dx.SearchConfig.a_lr:g}. "  # older rows lack it
        "Test accuracy (%, 200 epochs) of each "
        "final cell in the benchmark table, mean ± std over seeds.",
        "",
        "| method | seeds | CIFAR-10 | CIFAR-100 | ImageNet16-120 | parameter-free ops | minutes per search |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        mine = [r for (m, _), r in sorted(rows.items()) if m == method]
        if not mine:
            continue
        cols = [_stat([r[d] for r in mine if d in r]) for d in DATASETS]
        free = _stat([100 * r["parameter_free"] for r in mine], "%")
        minutes = _stat([r["seconds"] / 60 for r in mine])
        lines.append(f"| {method} | {len(mine)} | {' | '.join(cols)} | {free} | {minutes} |")
    lines += [
        "",
        "How far alpha moved by the last epoch (from the last checkpoint's history; a logit gap of g "
        "between two ops is a weight ratio of e^g): alpha's optimiser steps, the median over edges of "
        "the gap between the two strongest ops' logits, and the widest logit range of any edge.",
        "",
        "| method | alpha steps | median top-2 logit gap | widest logit range |",
        "|---|---|---|---|",
    ]
    for method in METHODS:
        moved = [m for (name, seed) in sorted(rows) if name == method and (m := alpha_movement(a.out, name, seed))]
        if moved:
            steps = sorted({m["steps"] for m in moved})
            gap, widest = (_stat([m[k] for m in moved]) for k in ("top2_gap", "range"))
            lines.append(f"| {method} | {', '.join(map(str, steps))} | {gap} | {widest} |")
    lines += ["", "Cells found:", ""]
    for (method, seed), r in sorted(rows.items()):
        lines.append(f"- {method}, seed {seed}: `{r['arch']}` ({r['cifar10']:.2f})")
    write_report(a.out, lines)
    plot_anytime(rows, os.path.join(a.out, "anytime.png"), a.table)


def alpha_movement(out: str, method: str, seed: int) -> dict | None:
    """Alpha's steps and the logit gaps of its last epoch, from the run folder's last checkpoint
    (history records hold softmax(alpha), so log-weight differences are logit differences)."""
    folder = os.path.join(out, "runs", f"{method}-seed{seed}", "checkpoints")
    steps = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if not steps:
        return None
    with open(os.path.join(folder, steps[-1], "manifest.json")) as f:
        manifest = json.load(f)
    logits = np.log(np.asarray(manifest["history"][-1]["alpha"], float))
    top = np.sort(logits, axis=-1)
    return {
        "steps": int(manifest["step"]),
        "top2_gap": float(np.median(top[:, -1] - top[:, -2])),
        "range": float(np.max(top[:, -1] - top[:, 0])),
    }


def _stat(values, unit: str = "") -> str:
    if not values:
        return "-"
    v = np.asarray(values, float)
    return f"{v.mean():.2f}{unit} ± {v.std():.2f}{unit}" if len(v) > 1 else f"{v[0]:.2f}{unit}"


def plot_anytime(rows: dict, path: str, table: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 80.0  # below this the curves would flatten the rest; a curve that dips says how far
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for method in METHODS:
        if method == "darts-pt":  # its epochs' argmax cells are darts-1st's: only its selection differs
            continue
        curves = [r["anytime"] for (m, _), r in rows.items() if m == method]
        if not curves:
            continue
        acc = np.asarray([[epoch["cifar10"] for epoch in c] for c in curves]).mean(0)
        label = f"{method} ({len(curves)})" + (f", down to {acc.min():.0f}" if acc.min() < floor else "")
        ax.plot(np.arange(1, len(acc) + 1), acc, label=label)
    with open(table, newline="") as f:  # by column name, as darts_eqx.nb201 reads the table
        best = max(float(row["CIFAR10TestAccuracy200Epochs"]) for row in csv.DictReader(f))
    ax.axhline(best, color="k", linestyle="--", linewidth=0.8, label=f"benchmark's best cell ({best:.2f})")
    ax.set_ylim(floor, 95.5)
    ax.set_xlabel("search epoch")
    ax.set_ylabel("CIFAR-10 test accuracy of the epoch's cell (%)")
    ax.set_title("Mean over seeds (their number in brackets)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
