"""NAS-Bench-201 study: first-order DARTS, second-order DARTS and beta-DARTS on the CIFAR-10
subset, every derived cell looked up in the benchmark table (one Markdown report).

    python experiments/nb201_cifar10.py [--data ../shared/data/cifar10_10k.npz]
        [--table ../shared/data/nb201_accuracy.csv] [--seeds 0 1] [--out runs/nb201_cifar10]

The budget is cut to fit a 2-core CPU (each cut is a flag): images average-pooled to 16x16, the
search on the first 2,000 training images, C=8 and 1 cell per stage instead of C=16 and 5, 8 epochs
instead of 50, batch 32. The published values come from full searches (NAS-Bench-201 paper, Table 5;
beta-DARTS paper), so the comparison says how this budget behaves, not how the methods rank at full
size. The dominant Hessian eigenvalue is recorded every epoch.
"""

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
from shared_data import CIFAR10_SUBSET, NB201_TABLE, pooled, write_report

import darts_eqx as dx

METHODS = {
    "DARTS (1st order)": dict(order=1),
    "DARTS (2nd order)": dict(order=2),
    "beta-DARTS": dict(order=1, beta_reg=20.0),
}
PUBLISHED = {"DARTS (1st order)": 54.30, "DARTS (2nd order)": 54.30, "beta-DARTS": 94.36}
OPTIMUM = 94.37


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=CIFAR10_SUBSET)
    p.add_argument("--table", default=NB201_TABLE)
    p.add_argument("--out", default="runs/nb201_cifar10")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--cells", type=int, default=1)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args()
    for path in (a.data, a.table):
        if not os.path.exists(path):
            print(f"skipped: {path} not found", file=sys.stderr)
            return
    os.makedirs(a.out, exist_ok=True)
    with np.load(a.data) as f:
        x, y = pooled(f["x_train"][: a.images], a.image_size), f["y_train"][: a.images]
    data = dx.data.from_arrays(x, y, name=os.path.basename(a.data))
    runs = []
    for method in a.methods:
        for seed in a.seeds:
            start = time.perf_counter()
            result = dx.search(
                jax.random.key(seed),
                data,
                space="nb201",
                channels=a.channels,
                layers=a.cells,
                epochs=a.epochs,
                batch_size=a.batch_size,
                hessian=True,
                **METHODS[method],
            )
            scores = dx.nb201.lookup(result.genotype, a.table)
            runs.append(
                {
                    "method": method,
                    "seed": seed,
                    "arch": str(result.genotype),
                    **scores,
                    "eigenvalues": [h["hessian_eigenvalue"] for h in result.history],
                    "val_acc": result.history[-1]["val_acc"],
                    "seconds": time.perf_counter() - start,
                }
            )
            print(json.dumps(runs[-1]), flush=True)
            with open(os.path.join(a.out, "runs.json"), "w") as f:
                json.dump(runs, f, indent=1)

    lines = [
        "# NAS-Bench-201 on the CIFAR-10 subset",
        "",
        f"Search data: first {a.images} images of `{os.path.basename(a.data)}` pooled to "
        f"{a.image_size}x{a.image_size}; "
        f"C={a.channels}, {a.cells} cell(s) per stage, {a.epochs} epochs, batch {a.batch_size}, seeds {a.seeds}. "
        "Accuracies: the benchmark's 200-epoch test accuracy of each derived cell (mean ± std over seeds).",
        "",
        "| method | CIFAR-10 | CIFAR-100 | ImageNet16-120 | published CIFAR-10 | cells found |",
        "|---|---|---|---|---|---|",
    ]
    for method in a.methods:
        mine = [r for r in runs if r["method"] == method]
        cols = []
        for key in ("cifar10", "cifar100", "imagenet16-120"):
            values = np.array([r[key] for r in mine if key in r])
            cols.append(f"{values.mean():.2f} ± {values.std():.2f}" if len(values) else "-")
        archs = ", ".join(r["arch"].replace("|", "\\|") for r in mine)  # a bare | would split the table cell
        lines.append(f"| {method} | {' | '.join(cols)} | {PUBLISHED[method]:.2f} | {archs} |")
    lines += ["", f"Optimum of the table on CIFAR-10: {OPTIMUM}.", "", "## Dominant Hessian eigenvalue per epoch", ""]
    for r in runs:
        trace = ", ".join(f"{v:.3g}" for v in r["eigenvalues"])
        lines.append(f"- {r['method']}, seed {r['seed']} ({r['seconds']:.0f} s): {trace}")
    write_report(a.out, lines)


if __name__ == "__main__":
    main()
