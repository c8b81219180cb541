"""A small DARTS search on the CIFAR-10 subset in ../shared/data (not needed by the tests).

python experiments/search_cifar10_subset.py [--epochs 2] [--channels 8] [--layers 5]
"""

import argparse
import os
import sys
import time

import jax
from shared_data import CIFAR10_SUBSET

import darts_eqx as dx


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=CIFAR10_SUBSET)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if not os.path.exists(args.data):
        print(f"skipped: {args.data} not found", file=sys.stderr)
        return
    data = dx.data.load(args.data)
    start = time.perf_counter()
    result = dx.search(
        jax.random.key(0),
        data,
        channels=args.channels,
        layers=args.layers,
        epochs=args.epochs,
        batch_size=args.batch_size,
    )
    for record in result.history:
        print({k: round(v, 4) for k, v in record.items() if not k.startswith("alpha")})
    print(result.genotype)
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
