"""Search a DARTS cell, retrain it from scratch beside published cells, and report (resumable).

    python experiments/search_then_train.py --out runs/search_then_train [--method drnas] [--select pt]

Defaults fit a 2-core CPU: images average-pooled to 16x16; the search on the first 4,000 training
images (C=8, 5 cells, 20 epochs, batch 32, the given method; its search batches cropped and
flipped); every cell (`--baselines`, DARTS_V2 by default, first, then the searched one)
retrained with the same budget once per `--train-seeds` on all training images (C=16, 8 cells, 10
epochs, cutout, no auxiliary head), test accuracy on the test split. The search checkpoints into OUT/search and
resumes; each finished training is a line of OUT/results.jsonl and is not repeated. The report
(`report.md`) gives the genotype, the search's options, and each cell's test accuracy
(mean ± std over the training seeds).
"""

import argparse
import json
import os
import sys
import time
import warnings

import jax
import numpy as np
from shared_data import CIFAR10_SUBSET, commit, jsonl_rows, pooled, write_report

import darts_eqx as dx

SEARCH_OPTIONS = ("method", "select", "order", "beta_reg", "aux_skip", "a_lr")
SEARCH_BUDGET = ("image_size", "search_images", "search_epochs", "search_channels", "search_layers", "search_batch")
TRAIN_SETTINGS = ("data", "image_size", "train_epochs", "train_channels", "train_layers", "train_batch")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=CIFAR10_SUBSET)
    p.add_argument("--out", default="runs/search_then_train")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--search-images", type=int, default=4000)
    p.add_argument("--search-epochs", type=int, default=20)
    p.add_argument("--search-channels", type=int, default=8)
    p.add_argument("--search-layers", type=int, default=5)
    p.add_argument("--search-batch", type=int, default=32)
    p.add_argument("--search-seed", type=int, default=0)
    p.add_argument("--method", default="darts", help="a name from darts_eqx.methods (default: darts)")
    p.add_argument("--select", default="argmax", help="argmax or pt (DARTS-PT)")
    p.add_argument("--order", type=int, default=1)
    p.add_argument("--beta-reg", type=float, default=0.0)
    p.add_argument("--aux-skip", type=float, default=0.0)
    p.add_argument(
        "--a-lr", type=float, default=dx.SearchConfig.a_lr, help="alpha's Adam learning rate (the paper's: %(default)g)"
    )
    p.add_argument("--train-epochs", type=int, default=10)
    p.add_argument("--train-channels", type=int, default=16)
    p.add_argument("--train-layers", type=int, default=8)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--baselines", nargs="*", default=["DARTS_V2"])
    p.add_argument("--baselines-only", action="store_true", help="retrain the baselines, then stop")
    a = p.parse_args()
    if not os.path.exists(a.data):
        print(f"skipped: {a.data} not found", file=sys.stderr)
        return
    os.makedirs(a.out, exist_ok=True)
    check_settings(a)
    with np.load(a.data) as f:
        x, y, xt, yt = (f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    x, xt = pooled(x, a.image_size), pooled(xt, a.image_size)
    name = os.path.basename(a.data)

    train_data = dx.data.from_arrays(x, y, xt, yt, name=name)
    baselines = {b: dx.named_genotype(b) for b in a.baselines}
    retrain_all(a, train_data, baselines)  # first: they do not depend on the search
    if a.baselines_only:
        return
    searched = search(a, dx.data.from_arrays(x[: a.search_images], y[: a.search_images], name=name))
    found = {"searched": dx.Genotype.from_json(searched["genotype"])}
    retrain_all(a, train_data, found)
    report(a, searched, {**found, **baselines}, len(x), len(xt))


def retrain_all(a, data, cells: dict) -> None:
    done = finished(a.out)
    for label, genotype in cells.items():
        for seed in a.train_seeds:
            if (label, seed) not in done:
                retrain(a, data, label, genotype, seed)


def search(a, data) -> dict:
    """The search's summary (OUT/search.json), searching (or resuming the search) first if needed."""
    path = os.path.join(a.out, "search.json")
    options = {k: getattr(a, k) for k in SEARCH_OPTIONS}
    budget = {k: getattr(a, k) for k in (*SEARCH_BUDGET, "search_seed")}
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)
        _same({**done["options"], **done["budget"]}, {**options, **budget}, a.out)
        return done
    warnings.filterwarnings("ignore", message="no checkpoint in", category=dx.CheckpointWarning)
    start = time.perf_counter()
    result = dx.search(
        jax.random.key(a.search_seed),
        data,
        channels=a.search_channels,
        layers=a.search_layers,
        epochs=a.search_epochs,
        batch_size=a.search_batch,
        checkpoint_dir=os.path.join(a.out, "search", "checkpoints"),
        resume=True,
        progress=False,
        **options,
    )
    for which in ("normal", "reduce"):
        dx.plot_cell(result.genotype, which, os.path.join(a.out, f"{which}.png"))
    dx.plot_alphas(result.history, os.path.join(a.out, "alphas.png"))
    last = result.history[-1]
    summary = {
        "genotype": result.genotype.to_dict(),
        "options": options,
        "budget": budget,
        "seconds": time.perf_counter() - start,  # of this sitting only, when the search resumed
        "train_acc": last["train_acc"],
        "val_acc": last["val_acc"],
        "commit": commit(),
    }
    with open(os.path.join(a.out, "search_history.json"), "w") as f:
        json.dump(result.history, f, indent=1)
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def finished(out: str) -> dict:
    return {(r["cell"], r["seed"]): r for r in jsonl_rows(os.path.join(out, "results.jsonl"))}


def check_settings(a) -> None:
    """The data and training options, written to OUT/settings.json the first time; a rerun into
    the same folder with other ones is an error naming them (the search's are checked against
    OUT/search.json)."""
    settings = {k: getattr(a, k) for k in TRAIN_SETTINGS}
    path = os.path.join(a.out, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            _same(json.load(f), settings, a.out)
        return
    with open(path, "w") as f:
        json.dump(settings, f, indent=2)


def _same(before: dict, now: dict, out: str) -> None:
    changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
    if changed:
        what = ", ".join(f"--{k.replace('_', '-')} (was {old!r}, now {new!r})" for k, (old, new) in changed.items())
        raise SystemExit(f"{out} holds results of other settings: {what}; use another --out")


def retrain(a, data, label: str, genotype, seed: int) -> None:
    start = time.perf_counter()
    result = dx.train(
        jax.random.key(seed),
        genotype,
        data,
        channels=a.train_channels,
        layers=a.train_layers,
        epochs=a.train_epochs,
        batch_size=a.train_batch,
        auxiliary=False,
        progress=False,
    )
    h = result.history
    row = {
        "cell": label,
        "seed": seed,
        "genotype": str(genotype),
        "parameters": result.parameters,
        "train_acc": h[-1]["train_acc"],
        "test_acc": h[-1]["test_acc"],
        "best_test_acc": max(r["test_acc"] for r in h),
        "seconds": time.perf_counter() - start,
        "history": h,
        "commit": commit(),
    }
    print(f"{label} seed {seed}: test acc {row['test_acc']:.3f} in {row['seconds']:.0f} s", flush=True)
    with open(os.path.join(a.out, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def report(a, searched: dict, cells: dict, n_train: int, n_test: int) -> None:
    rows = finished(a.out)
    options = ", ".join(f"{k}={v}" for k, v in searched["options"].items())
    lines = [
        "# Search, then train from scratch",
        "",
        f"Data: `{os.path.basename(a.data)}`, images average-pooled to {a.image_size}x{a.image_size}. Search "
        f"on the first {a.search_images} training images (half for weights, half for alpha): C={a.search_channels}, "
        f"{a.search_layers} cells, {a.search_epochs} epochs, batch {a.search_batch}, {options}, seed "
        f"{a.search_seed}. Retraining on all {n_train} training images, test on {n_test}: C={a.train_channels}, "
        f"{a.train_layers} cells, {a.train_epochs} epochs, batch {a.train_batch}, cutout, drop-path 0.2, "
        f"no auxiliary head; seeds {', '.join(map(str, a.train_seeds))}.",
        "",
        f"Searched cell (search: last train acc {searched['train_acc']:.3f}, val acc on the alpha batches "
        f"{searched['val_acc']:.3f}):",
        "",
        f"```\n{cells['searched']}\n```",
        "",
        "![normal cell](normal.png) ![reduce cell](reduce.png)",
        "",
        "| cell | seeds | parameters | final test acc | best test acc | final train acc | minutes per training |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in cells:
        mine = [r for (c, _), r in sorted(rows.items()) if c == label]
        if mine:
            stats = [_stat([r[k] for r in mine]) for k in ("test_acc", "best_test_acc", "train_acc")]
            minutes = _stat([r["seconds"] / 60 for r in mine], digits=1)
            lines.append(f"| {label} | {len(mine)} | {mine[0]['parameters']:,} | {' | '.join(stats)} | {minutes} |")
    write_report(a.out, lines)


def _stat(values, digits: int = 3) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" if len(v) > 1 else f"{v[0]:.{digits}f}"


if __name__ == "__main__":
    main()
