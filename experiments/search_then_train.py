"""One call: search an architecture, retrain it from scratch, and write a Markdown report.

    python experiments/search_then_train.py [--data ../shared/data/cifar10_10k.npz] [--out runs/study]

Defaults fit a 2-core CPU in about half an hour: images average-pooled to 16x16, the search on the
first 4,000 training images (C=8, 5 cells, 3 epochs, first order), retraining on all training images
(C=16, 8 cells, 10 epochs, cutout, no auxiliary head) with test accuracy on the test split, and the
same retraining of the published DARTS_V2 cell as a baseline. The report (`report.md`) gives the
genotype, parameter counts, search and test accuracies, wall times and the pictures.
"""

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
from shared_data import CIFAR10_SUBSET, pooled, write_report

import darts_eqx as dx


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=CIFAR10_SUBSET)
    p.add_argument("--out", default="runs/search_then_train")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--search-images", type=int, default=4000)
    p.add_argument("--search-epochs", type=int, default=3)
    p.add_argument("--search-channels", type=int, default=8)
    p.add_argument("--search-layers", type=int, default=5)
    p.add_argument("--search-batch", type=int, default=32)
    p.add_argument("--train-epochs", type=int, default=10)
    p.add_argument("--train-channels", type=int, default=16)
    p.add_argument("--train-layers", type=int, default=8)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--baselines", nargs="*", default=["DARTS_V2"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if not os.path.exists(a.data):
        print(f"skipped: {a.data} not found", file=sys.stderr)
        return
    os.makedirs(a.out, exist_ok=True)
    with np.load(a.data) as f:
        x, y, xt, yt = (f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    x, xt = pooled(x, a.image_size), pooled(xt, a.image_size)
    name = os.path.basename(a.data)
    search_data = dx.data.from_arrays(x[: a.search_images], y[: a.search_images], name=f"{name}[:{a.search_images}]")
    train_data = dx.data.from_arrays(x, y, xt, yt, name=name)
    key_search, key_train = jax.random.split(jax.random.key(a.seed))

    start = time.perf_counter()
    searched = dx.search(
        key_search,
        search_data,
        channels=a.search_channels,
        layers=a.search_layers,
        epochs=a.search_epochs,
        batch_size=a.search_batch,
    )
    search_s = time.perf_counter() - start
    for which in ("normal", "reduce"):
        dx.plot_cell(searched.genotype, which, os.path.join(a.out, f"{which}.png"))
    dx.plot_alphas(searched.history, os.path.join(a.out, "alphas.png"))
    with open(os.path.join(a.out, "search_history.json"), "w") as f:
        json.dump(searched.history, f, indent=1)
    with open(os.path.join(a.out, "genotype.json"), "w") as f:
        f.write(searched.genotype.to_json(indent=2))

    options = dict(
        channels=a.train_channels,
        layers=a.train_layers,
        epochs=a.train_epochs,
        batch_size=a.train_batch,
        auxiliary=False,
    )
    runs = {"searched": searched.genotype, **{b: dx.named_genotype(b) for b in a.baselines}}
    trained = {}
    for label, genotype in runs.items():
        start = time.perf_counter()
        result = dx.train(key_train, genotype, train_data, **options)
        trained[label] = (result, time.perf_counter() - start)
        with open(os.path.join(a.out, f"train_history_{label}.json"), "w") as f:
            json.dump(result.history, f, indent=1)

    last = searched.history[-1]
    lines = [
        "# Search, then train from scratch",
        "",
        f"Data: `{name}`, images average-pooled to {a.image_size}x{a.image_size}. Search on the first "
        f"{a.search_images} training images (half for weights, half for alpha): C={a.search_channels}, "
        f"{a.search_layers} cells, {a.search_epochs} epochs, batch {a.search_batch}, first order. Retraining "
        f"on all {len(x)} training images, test on {len(xt)}: C={a.train_channels}, {a.train_layers} cells, "
        f"{a.train_epochs} epochs, batch {a.train_batch}, cutout, drop-path 0.2, no auxiliary head. "
        f"Backend: {jax.default_backend()}, seed {a.seed}.",
        "",
        "## Searched genotype",
        "",
        f"```\n{searched.genotype}\n```",
        "",
        "![normal cell](normal.png) ![reduce cell](reduce.png)",
        "",
        f"Search: {search_s:.0f} s; last epoch train acc {last['train_acc']:.3f}, val acc (alpha batches) "
        f"{last['val_acc']:.3f}. softmax(alpha) over epochs: ![alphas](alphas.png)",
        "",
        "## Training from scratch",
        "",
        "| cell | parameters | final train acc | final test acc | best test acc | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for label, (result, seconds) in trained.items():
        h = result.history
        lines.append(
            f"| {label} | {result.parameters:,} | {h[-1]['train_acc']:.3f} | {h[-1]['test_acc']:.3f} | "
            f"{max(r['test_acc'] for r in h):.3f} | {seconds:.0f} s |"
        )
    write_report(a.out, lines)


if __name__ == "__main__":
    main()
