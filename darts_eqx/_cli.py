"""`darts-eqx` command line: `darts-eqx search|train|show [options]`."""

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings

from ._search import DEFAULT_CHECKPOINT_EVERY, SAFE_TO_CHANGE

# Small defaults for the embedded digits, so that a bare `darts-eqx search` finishes in minutes on
# two CPU cores; any other data set starts from the paper's defaults (`SearchConfig`).
DIGITS_DEFAULTS = {"channels": 8, "layers": 3, "epochs": 8, "batch_size": 64}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 2, like every other bad input."""

    def error(self, message):
        self.exit(2, f"darts-eqx: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="darts-eqx", description="Differentiable Architecture Search in JAX + Equinox")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("search", help="run a DARTS search")
    s.add_argument(
        "--dataset",
        help="digits (embedded, default), a Hugging Face name such as cifar10, or a path "
        "(.npz, save_to_disk folder, image folder)",
    )
    s.add_argument(
        "--space",
        choices=("darts", "seed", "nb201"),
        help="search space (default: darts); nb201 is NAS-Bench-201's (--layers: cells per stage, default 5)",
    )
    s.add_argument("--nb201-table", help="with --space nb201: a NAS-Bench-201 accuracy CSV to score the result")
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
    s.add_argument("--order", type=int, choices=(1, 2), help="1: first order (default); 2: unrolled gradient")
    s.add_argument(
        "--estimator",
        choices=("exact", "finite_difference"),
        help="second order: differentiate through the virtual step (exact, default) or the paper's finite difference",
    )
    s.add_argument(
        "--shared-trace",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="trace the supernet's gradient once per step (first order, or order 2 with finite_difference) or "
        "once per phase: the shared trace compiles faster and holds less memory, and runs a little slower "
        "(default: shared for order 2 with finite_difference on CPU)",
    )
    s.add_argument("--beta-reg", type=float, help="beta-DARTS regularisation strength (ramped from 0; default off)")
    s.add_argument("--aux-skip", type=float, help="DARTS-: auxiliary skip weight, decaying to 0 (paper: 1)")
    s.add_argument(
        "--hessian", action="store_true", default=None, help="record the dominant Hessian eigenvalue per epoch"
    )
    s.add_argument("--early-stop-factor", type=float, help="DARTS-ES: stop when the eigenvalue grew by this factor")
    s.add_argument("--early-stop-window", type=int, help="DARTS-ES window in epochs (default 5)")
    s.add_argument("--seed", type=int, help="PRNG seed (default: 0)")
    s.add_argument("--out", help="run folder (default: a new folder under runs/)")
    s.add_argument(
        "--checkpoint-every",
        type=int,
        help=f"checkpoint at least every N steps and at each epoch end (default: {DEFAULT_CHECKPOINT_EVERY})",
    )
    s.add_argument(
        "--resume",
        action="store_true",
        help="continue the search in --out from its newest good checkpoint; options not given are "
        "taken from its config.json",
    )
    s.add_argument(
        "--allow-change",
        action="append",
        default=[],
        choices=SAFE_TO_CHANGE,
        help="with --resume: accept this option differing from the checkpoint's (repeatable)",
    )
    s.add_argument("--devices", type=int, help="data-parallel over this many devices (default: all that JAX sees)")
    s.add_argument("--coordinator", help="several hosts: HOST:PORT of process 0 (jax.distributed)")
    s.add_argument("--num-processes", type=int, help="several hosts: number of processes")
    s.add_argument("--process-id", type=int, help="several hosts: this process's index, 0 to P-1")
    s.add_argument(
        "--distributed",
        action="store_true",
        help="several hosts: let jax.distributed.initialize read the cluster (SLURM, Open MPI, ...)",
    )
    _compile_cache_option(s)
    s.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")

    t = commands.add_parser("train", help="train a genotype from scratch and report test accuracy")
    t.add_argument("--genotype", required=True, help="a genotype.json, a file with Genotype(...), or a name (DARTS_V2)")
    t.add_argument("--dataset", default="digits", help="as for search; needs a test split")
    t.add_argument("--epochs", type=int)
    t.add_argument("--channels", type=int, help="initial channels C (paper: 36)")
    t.add_argument("--layers", type=int, help="number of cells (paper: 20)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--auxiliary", action=argparse.BooleanOptionalAction, default=None, help="auxiliary head (0.4)")
    t.add_argument("--cutout", action=argparse.BooleanOptionalAction, default=None, help="cutout augmentation")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="run folder (default: a new folder under runs/)")
    _compile_cache_option(t)
    t.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")

    v = commands.add_parser("show", help="print a genotype and draw its cells")
    v.add_argument("genotype", help="a genotype.json, a file with Genotype(...), or a name (DARTS_V2)")
    v.add_argument("--out", default=".", help="folder for normal.png and reduce.png (default: here)")
    v.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    return parser


def _compile_cache_option(parser) -> None:
    parser.add_argument(
        "--compile-cache",
        metavar="DIR|off",
        help="keep compiled XLA programs in DIR, so a run with the same shapes and options (a resume, "
        "another seed) skips XLA's compile (default: $DARTS_EQX_COMPILE_CACHE, else "
        "$JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, /darts_eqx/xla, at most 2 GiB; "
        "off: compile every time)",
    )


def default_compile_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "darts_eqx", "xla")


def use_compile_cache(path: str | None) -> str | None:
    """Turn on JAX's persistent compilation cache at `path` ("off": turn it off; None:
    `$DARTS_EQX_COMPILE_CACHE`, else JAX's own `$JAX_COMPILATION_CACHE_DIR`, else
    `default_compile_cache()`), before anything compiles. XLA's compile of a search chunk takes
    about a minute on CPU; JAX keys each entry by the program, compile options, backend and
    versions, so a hit is the same executable. Our own directories are bounded to 2 GiB (LRU); a
    directory of JAX's own settings keeps its settings. Returns the directory in use."""
    import jax

    source = "--compile-cache"
    if path is None and os.environ.get("DARTS_EQX_COMPILE_CACHE"):
        path, source = os.environ["DARTS_EQX_COMPILE_CACHE"], "$DARTS_EQX_COMPILE_CACHE"
    if path is not None and path.strip().lower() == "off":
        jax.config.update("jax_enable_compilation_cache", False)  # also over $JAX_COMPILATION_CACHE_DIR
        return None
    if path is None and jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir  # the user's own JAX setting, as it is
    path = default_compile_cache() if path is None else os.path.expanduser(path)
    if not path.strip():
        raise ValueError(f"{source} needs a directory (or off), got {path!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{source} {path!r} is not a directory")
    jax.config.update("jax_compilation_cache_dir", path)
    if jax.config.jax_compilation_cache_max_size == -1:  # unbounded: bound it (LRU eviction)
        jax.config.update("jax_compilation_cache_max_size", 2 * 1024**3)
    return path


def _new_run_dir() -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join("runs", stamp), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join("runs", f"{stamp}-{n}")
    return path


_CONFIG_OPTIONS = (
    "space",
    "epochs",
    "batch_size",
    "channels",
    "layers",
    "steps_per_chunk",
    "partial_channels",
    "order",
    "estimator",
    "beta_reg",
    "aux_skip",
    "hessian",
    "early_stop_factor",
    "early_stop_window",
    "shared_trace",
)


def _run_settings(args) -> tuple[str, int, int, dict]:
    """`(dataset, seed, checkpoint_every, config options)` from the command line; with `--resume`,
    options not given come from the run folder's `config.json`."""
    saved = {}
    if args.resume:
        if not args.out:
            raise ValueError("--resume needs --out DIR, the run folder to continue")
        path = os.path.join(args.out, "config.json")
        if os.path.exists(path):
            try:
                with open(path) as f:
                    saved = json.load(f)
            except ValueError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); give the options explicitly") from None
            if not isinstance(saved, dict):
                raise ValueError(f"{path} holds a {type(saved).__name__}, not the run's options")
    dataset, seed, every = saved.pop("dataset", None), saved.pop("seed", None), saved.pop("checkpoint_every", None)
    dataset = args.dataset or dataset or "digits"
    seed = args.seed if args.seed is not None else 0 if seed is None else seed
    every = args.checkpoint_every if args.checkpoint_every is not None else every or DEFAULT_CHECKPOINT_EVERY
    return dataset, seed, every, saved


def _search(args) -> None:
    import jax

    from . import _parallel
    from ._checkpoint import atomic_write_bytes, atomic_write_text, list_checkpoints, serialised
    from ._data import load
    from ._search import SearchConfig, resolve_shared_trace, search

    cluster = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in cluster):
        if any(v is None for v in cluster):
            raise ValueError("--coordinator, --num-processes and --process-id go together")
        _parallel.initialize(*cluster)
    elif args.distributed:
        _parallel.initialize()
    main_process = _parallel.is_main_process()  # the one that writes the run folder and prints
    if jax.process_count() > 1 and not args.out:
        raise ValueError("a search over several processes needs --out DIR, one run folder (shared for --resume)")
    dataset, seed, checkpoint_every, options = _run_settings(args)
    data = load(dataset)
    if not options:
        options = dict(DIGITS_DEFAULTS) if data.name == "digits" else {}
    for name in _CONFIG_OPTIONS:
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if options.get("space") == "nb201" and "layers" not in options:
        options["layers"] = 5  # the benchmark's cells per stage
    config = SearchConfig().replace(**options)
    if not args.resume:  # the run folder records what runs (a resume takes its checkpoint's choice)
        config = config.replace(shared_trace=resolve_shared_trace(config))
    if args.nb201_table is not None:
        if config.space != "nb201":
            raise ValueError(f"--nb201-table scores NAS-Bench-201 cells: it needs --space nb201, not {config.space!r}")
        if not os.path.isfile(args.nb201_table):
            raise ValueError(f"NAS-Bench-201 table {args.nb201_table!r} does not exist")
    out = args.out or _new_run_dir()
    checkpoints = os.path.join(out, "checkpoints")
    if not args.resume and list_checkpoints(checkpoints):
        raise ValueError(f"{out} holds checkpoints of a search: continue it with --resume, or choose another --out")
    if main_process:
        os.makedirs(out, exist_ok=True)
        print(f"darts-eqx search: {data!r}\n  config: {config}\n  run folder: {out}", file=sys.stderr)
    settings = {"dataset": dataset, "seed": seed, "checkpoint_every": checkpoint_every, **dataclasses.asdict(config)}
    config_path = os.path.join(out, "config.json")
    if not args.resume and main_process:
        atomic_write_text(config_path, json.dumps(settings, indent=2))

    def save_history(history, supernet):
        if not main_process:
            return
        # On resume, config.json changes only once the checkpoint has been accepted.
        atomic_write_text(config_path, json.dumps(settings, indent=2))
        atomic_write_text(os.path.join(out, "history.json"), json.dumps(history, indent=1))

    start = time.perf_counter()
    result = search(
        jax.random.key(seed),
        data,
        config,
        callback=save_history,
        checkpoint_dir=checkpoints,
        checkpoint_every=checkpoint_every,
        resume=args.resume,
        allow_changes=args.allow_change,
        devices=args.devices,
        progress=None if main_process else False,
    )
    if not main_process:
        return
    save_history(result.history, result.supernet)
    atomic_write_text(os.path.join(out, "genotype.json"), json.dumps(result.genotype.to_json(), indent=2))
    atomic_write_bytes(os.path.join(out, "supernet.eqx"), serialised(result.supernet))
    last = result.history[-1]
    print(
        f"done in {time.perf_counter() - start:.0f} s: train acc {last['train_acc']:.3f}, "
        f"val acc {last['val_acc']:.3f}; wrote {out}/genotype.json, history.json",
        file=sys.stderr,
    )
    from ._plot import plot_alphas, plot_cell
    from ._spaces import get_space

    if result.genotype.space == "darts":
        for which in ("normal", "reduce"):
            plot_cell(result.genotype, which, os.path.join(out, f"{which}.png"))
    plot_alphas(result.history, os.path.join(out, "alphas.png"), get_space(config.space).op_names)
    print(result.genotype)
    if result.stopped_at is not None:
        print(
            f"DARTS-ES stopped the search after epoch {result.stopped_at}; genotype from epoch "
            f"{result.stopped_at - config.early_stop_window}",
            file=sys.stderr,
        )
    if args.nb201_table is not None:
        from .nb201 import lookup

        scores = lookup(result.genotype, args.nb201_table)
        atomic_write_text(os.path.join(out, "nb201.json"), json.dumps({"arch": str(result.genotype), **scores}))
        print("NAS-Bench-201: " + ", ".join(f"{k} {v:.2f}%" for k, v in scores.items()))


def read_genotype(source: str):
    """A genotype from a JSON file (`genotype.json`), a text file holding `Genotype(...)`, or a
    published genotype's name."""
    from ._genotype import Genotype
    from ._zoo import named_genotype

    if os.path.isfile(source):
        with open(source) as f:
            text = f.read()
        try:
            return Genotype.from_json(text) if text.lstrip().startswith("{") else Genotype.parse(text.strip())
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    if os.sep in source or source.endswith((".json", ".txt")):
        raise ValueError(f"genotype file {source!r} does not exist")
    return named_genotype(source)


# Small defaults for the embedded digits (8x8), so that a bare `darts-eqx train` takes minutes.
TRAIN_DIGITS_DEFAULTS = {"channels": 8, "layers": 5, "epochs": 20, "batch_size": 64, "auxiliary": False}


def _train(args) -> None:
    import jax

    from ._checkpoint import atomic_write_text
    from ._data import load
    from ._train import TrainConfig, save_trained, train

    genotype = read_genotype(args.genotype)
    data = load(args.dataset)
    options = dict(TRAIN_DIGITS_DEFAULTS) if data.name == "digits" else {}
    for name in ("epochs", "channels", "layers", "batch_size", "auxiliary", "cutout"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    config = TrainConfig().replace(**options)
    out = args.out or _new_run_dir()
    os.makedirs(out, exist_ok=True)
    print(f"darts-eqx train: {genotype}\n  {data!r}\n  config: {config}\n  run folder: {out}", file=sys.stderr)
    atomic_write_text(os.path.join(out, "genotype.json"), json.dumps(genotype.to_json(), indent=2))
    atomic_write_text(
        os.path.join(out, "train_config.json"),
        json.dumps({"dataset": args.dataset, "seed": args.seed, **dataclasses.asdict(config)}, indent=2),
    )

    def save_history(history, model, state):
        atomic_write_text(os.path.join(out, "history.json"), json.dumps(history, indent=1))

    start = time.perf_counter()
    result = train(jax.random.key(args.seed), genotype, data, config, callback=save_history)
    save_trained(out, result, data.num_classes, data.image_shape[2])
    last = result.history[-1]
    print(
        f"done in {time.perf_counter() - start:.0f} s: {result.parameters:,} parameters, train acc "
        f"{last['train_acc']:.3f}, test acc {last['test_acc']:.3f}; wrote {out}/history.json, model.eqx",
        file=sys.stderr,
    )


def _show(args) -> None:
    from ._plot import plot_cell

    genotype = read_genotype(args.genotype)
    print(genotype)
    if genotype.space != "darts":
        return
    os.makedirs(args.out, exist_ok=True)
    for which in ("normal", "reduce"):
        path = os.path.join(args.out, f"{which}.png")
        engine = plot_cell(genotype, which, path)
        print(f"wrote {path} ({engine})", file=sys.stderr)


def _one_line(message) -> str:
    return " ".join(str(message).split())


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"darts-eqx: warning: {_one_line(message)}", file=sys.stderr)


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # usage errors (status 2) and --help (0)
        return e.code
    try:
        with warnings.catch_warnings():  # restores the caller's warning display afterwards
            if not args.debug:
                warnings.showwarning = _show_warning
            if args.command in ("search", "train"):
                use_compile_cache(args.compile_cache)
            {"search": _search, "train": _train, "show": _show}[args.command](args)
        return 0
    except (ValueError, FloatingPointError, OSError) as e:
        if args.debug:
            raise
        print(f"darts-eqx: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("darts-eqx: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: still one line, the traceback with --debug
        if args.debug:
            raise
        print(f"darts-eqx: internal error: {type(e).__name__}: {_one_line(e)} (--debug shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
