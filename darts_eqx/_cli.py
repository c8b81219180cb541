"""`darts-eqx` command line: `darts-eqx search [options]`."""

import argparse
import dataclasses
import json
import os
import sys
import time

# Small defaults for the embedded digits, so that a bare `darts-eqx search` finishes in minutes on
# two CPU cores; any other data set starts from the paper's defaults (`SearchConfig`).
DIGITS_DEFAULTS = {"channels": 8, "layers": 3, "epochs": 8, "batch_size": 64}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="darts-eqx", description="Differentiable Architecture Search in JAX + Equinox"
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("search", help="run a first-order DARTS search")
    s.add_argument(
        "--dataset",
        default="digits",
        help="digits (embedded, default), a Hugging Face name such as cifar10, or a path "
        "(.npz, save_to_disk folder, image folder)",
    )
    s.add_argument("--space", default="darts", choices=("darts", "seed"))
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--channels", type=int, help="initial channels C")
    s.add_argument("--layers", type=int, help="number of cells (darts) or mixed layers (seed)")
    s.add_argument("--steps-per-chunk", type=int, help="search steps fused into one compiled call (default: an epoch)")
    s.add_argument(
        "--partial-channels",
        type=int,
        help="PC-DARTS: send 1/K of each edge's channels through its mixed op, with edge normalisation",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="run folder (default: a new folder under runs/)")
    s.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    return parser


def _new_run_dir() -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join("runs", stamp), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join("runs", f"{stamp}-{n}")
    return path


def _search(args) -> None:
    import equinox as eqx
    import jax

    from ._data import load
    from ._search import SearchConfig, search

    data = load(args.dataset)
    options = dict(DIGITS_DEFAULTS) if data.name == "digits" else {}
    for name in ("epochs", "batch_size", "channels", "layers", "steps_per_chunk", "partial_channels"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    config = SearchConfig(space=args.space).replace(**options)
    out = args.out or _new_run_dir()
    os.makedirs(out, exist_ok=True)
    print(f"darts-eqx search: {data!r}\n  config: {config}\n  run folder: {out}", file=sys.stderr)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"dataset": args.dataset, "seed": args.seed, **dataclasses.asdict(config)}, f, indent=2)

    history = []

    def save_history(record, supernet):
        history.append(record)
        with open(os.path.join(out, "history.json"), "w") as f:
            json.dump(history, f, indent=1)

    start = time.perf_counter()
    result = search(jax.random.key(args.seed), data, config, callback=save_history)
    with open(os.path.join(out, "genotype.json"), "w") as f:
        json.dump(result.genotype.to_json(), f, indent=2)
    eqx.tree_serialise_leaves(os.path.join(out, "supernet.eqx"), result.supernet)
    last = result.history[-1]
    print(
        f"done in {time.perf_counter() - start:.0f} s: train acc {last['train_acc']:.3f}, "
        f"val acc {last['val_acc']:.3f}; wrote {out}/genotype.json, history.json",
        file=sys.stderr,
    )
    print(result.genotype)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "search":
            _search(args)
        return 0
    except (ValueError, FloatingPointError, OSError) as e:
        if args.debug:
            raise
        print(f"darts-eqx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("darts-eqx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
