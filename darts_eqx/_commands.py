"""The `darts-eqx` commands (`search`, `train`, `show`), given parsed arguments (`_cli`)."""

import dataclasses
import json
import os
import sys
import time

from ._cli import EXECUTION_OPTIONS, SEARCH_OPTIONS

# Small defaults for the embedded digits, so that a bare `darts-eqx search` finishes in minutes on
# two CPU cores; any other data set starts from the paper's defaults (`SearchConfig`).
# No augmentation: a mirrored digit is another digit or none.
DIGITS_DEFAULTS = {"channels": 8, "layers": 3, "epochs": 8, "batch_size": 64, "augment": False}
# Small defaults for the embedded digits (8x8), so that a bare `darts-eqx train` takes minutes.
TRAIN_DIGITS_DEFAULTS = {"channels": 8, "layers": 5, "epochs": 20, "batch_size": 64, "auxiliary": False, "flip": False}
_CONFIG_OPTIONS = tuple(flag[2:].replace("-", "_") for flag, _, _ in SEARCH_OPTIONS) + ("hessian", "augment")


def _new_run_dir() -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join("runs", stamp), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join("runs", f"{stamp}-{n}")
    return path


def _read_json(path: str, what: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); give the options explicitly") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} holds a {type(saved).__name__}, not the run's {what}")
    return saved


def _run_settings(args) -> tuple[str, int, int, dict, dict]:
    """`(dataset, seed, checkpoint_every, config options, execution options)` from the command
    line; with `--resume`, options not given come from the run folder's `config.json` and
    `execution.json`."""
    from ._resume import DEFAULT_CHECKPOINT_EVERY

    saved, ran = {}, {}
    if args.resume:
        if not args.out:
            raise ValueError("--resume needs --out DIR, the run folder to continue")
        if not os.path.isdir(args.out):
            raise ValueError(f"--resume: there is no run folder {args.out!r} to continue (drop --resume to start one)")
        saved = _read_json(os.path.join(args.out, "config.json"), "options")
        if saved:
            saved.setdefault("augment", False)  # written before searches augmented their batches
        ran = _read_json(os.path.join(args.out, "execution.json"), "execution")
    dataset, seed, every = saved.pop("dataset", None), saved.pop("seed", None), saved.pop("checkpoint_every", None)
    classes = saved.pop("num_classes", None)
    args.num_classes = args.num_classes if args.num_classes is not None else classes
    dataset = args.dataset or dataset or "digits"
    seed = args.seed if args.seed is not None else 0 if seed is None else seed
    every = args.checkpoint_every if args.checkpoint_every is not None else every or DEFAULT_CHECKPOINT_EVERY
    execution = {k: v for k, v in ran.items() if k in EXECUTION_OPTIONS}
    execution.update({k: getattr(args, k) for k in EXECUTION_OPTIONS if getattr(args, k, None) is not None})
    return dataset, seed, every, saved, execution


def _with_classes(data, num_classes: int | None):
    """`data`, with `--num-classes` classes when given."""
    return data if num_classes is None else data.with_num_classes(num_classes)


def _check_tensorboard(args) -> None:
    """With --tensorboard, fail before any work when its writer is not installed."""
    if args.tensorboard:
        from ._metrics import check_tensorboard

        try:
            check_tensorboard()
        except ImportError as e:
            raise ValueError(str(e)) from None


def _join_cluster(args) -> None:
    from . import _parallel

    cluster = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in cluster):
        if any(v is None for v in cluster):
            raise ValueError("--coordinator, --num-processes and --process-id go together")
        _parallel.initialize(*cluster)
    elif args.distributed:
        _parallel.initialize()


def _search_config(args, data, options: dict):
    from ._config import SearchConfig

    if not options:
        options = dict(DIGITS_DEFAULTS) if data.name == "digits" else {}
    for name in _CONFIG_OPTIONS:
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if "space" in options and "layers" not in options:
        from ._spaces import get_space

        default = get_space(options["space"]).topology.default_layers
        if default is not None:
            options["layers"] = default
    config = SearchConfig().replace(**options)
    if args.nb201_table is not None:
        if config.space != "nb201":
            raise ValueError(f"--nb201-table scores NAS-Bench-201 cells: it needs --space nb201, not {config.space!r}")
        if not os.path.isfile(args.nb201_table):
            raise ValueError(f"NAS-Bench-201 table {args.nb201_table!r} does not exist")
    return config


def search(args) -> None:
    import jax

    from . import _parallel
    from ._checkpoint import atomic_write_text, list_checkpoints
    from ._data import load
    from ._execution import Execution, use_compile_cache
    from ._search import search

    use_compile_cache(args.compile_cache)
    _check_tensorboard(args)
    _join_cluster(args)
    main_process = _parallel.is_main_process()  # the one that writes the run folder and prints
    if jax.process_count() > 1 and not args.out:
        raise ValueError("a search over several processes needs --out DIR, one run folder (shared for --resume)")
    dataset, seed, checkpoint_every, options, ran = _run_settings(args)
    data = _with_classes(load(dataset), args.num_classes)
    config = _search_config(args, data, options)
    execution = Execution(**ran, devices=args.devices).resolve(config)
    out = args.out or _new_run_dir()
    checkpoints = os.path.join(out, "checkpoints")
    if not args.resume and list_checkpoints(checkpoints):
        raise ValueError(f"{out} holds checkpoints of a search: continue it with --resume, or choose another --out")
    if main_process:
        os.makedirs(out, exist_ok=True)
        print(f"darts-eqx search: {data!r}\n  config: {config}\n  run folder: {out}", file=sys.stderr)
    classes = {} if args.num_classes is None else {"num_classes": args.num_classes}
    settings = {"dataset": dataset, "seed": seed, "checkpoint_every": checkpoint_every, **classes}
    settings.update(dataclasses.asdict(config))
    ran = {k: getattr(execution, k) for k in EXECUTION_OPTIONS}

    def save_settings():
        atomic_write_text(os.path.join(out, "config.json"), json.dumps(settings, indent=2))
        atomic_write_text(os.path.join(out, "execution.json"), json.dumps(ran, indent=2))

    if not args.resume and main_process:
        save_settings()

    def save_history(history, supernet):
        if main_process:  # on resume, the settings change only once the checkpoint has been accepted
            save_settings()
            atomic_write_text(os.path.join(out, "history.json"), json.dumps(history, indent=1))

    start = time.perf_counter()
    result = search(
        jax.random.key(seed),
        data,
        config,
        execution=execution,
        callback=save_history,
        checkpoint_dir=checkpoints,
        checkpoint_every=checkpoint_every,
        resume=args.resume,
        allow_changes=args.allow_change,
        progress=None if main_process else False,
        metrics_dir=out,
        tensorboard=args.tensorboard,
        score_genotype=_benchmark_scores(args.nb201_table),
    )
    if main_process:
        save_history(result.history, result.supernet)
        _write_search_results(result, out, time.perf_counter() - start, args.nb201_table)


def _benchmark_scores(nb201_table):
    """Each epoch's record scored in the NAS-Bench-201 table (anytime accuracies), if one is given."""
    if nb201_table is None:
        return None
    from .nb201 import benchmark_scores

    return benchmark_scores(nb201_table)


def _write_search_results(result, out: str, seconds: float, nb201_table) -> None:
    from ._checkpoint import atomic_write_bytes, atomic_write_text, serialised
    from ._plot import plot_alphas, plot_benchmark, plot_cell
    from ._spaces import get_space

    config = result.config
    atomic_write_text(os.path.join(out, "genotype.json"), result.genotype.to_json(indent=2))
    atomic_write_bytes(os.path.join(out, "supernet.eqx"), serialised(result.supernet))
    last = result.history[-1]
    print(
        f"done in {seconds:.0f} s: train acc {last['train_acc']:.3f}, "
        f"val acc {last['val_acc']:.3f}; wrote {out}/genotype.json, history.json, metrics.jsonl",
        file=sys.stderr,
    )
    if _has_cell_pictures(result.genotype):
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
    if nb201_table is not None:
        from .nb201 import lookup

        scores = lookup(result.genotype, nb201_table)
        atomic_write_text(os.path.join(out, "nb201.json"), json.dumps({"arch": str(result.genotype), **scores}))
        plot_benchmark(result.history, os.path.join(out, "nb201.png"))
        print("NAS-Bench-201: " + ", ".join(f"{k} {v:.2f}%" for k, v in scores.items()))


def _train_config(args, data):
    """The training config: the digits' small defaults or the paper's, then the given options."""
    from ._train import TrainConfig

    options = dict(TRAIN_DIGITS_DEFAULTS) if data.name == "digits" else {}
    for name in ("epochs", "channels", "layers", "batch_size", "auxiliary", "cutout", "flip"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return TrainConfig().replace(**options)


def read_genotype(source: str):
    """A genotype from a JSON file (`genotype.json`), a text file holding `Genotype(...)`, or a
    published genotype's name."""
    from ._genotype import Genotype, parsed_json
    from ._spaces import get_space
    from ._zoo import named_genotype

    if os.path.isfile(source):
        with open(source) as f:
            text = f.read()
        try:
            if not text.lstrip().startswith("{"):
                return Genotype.parse(text.strip())
            obj = parsed_json(text, "genotype")
            if not isinstance(obj, dict):
                raise ValueError(f"genotype JSON must be an object, not a {type(obj).__name__}")
            space = get_space(obj.get("space", "darts"))  # its topology reads its genotypes
            return space.topology.genotype_from_json(space, obj)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    if os.sep in source or source.endswith((".json", ".txt")):
        raise ValueError(f"genotype file {source!r} does not exist")
    return named_genotype(source)


def train(args) -> None:
    import jax

    from ._checkpoint import atomic_write_text
    from ._data import load
    from ._execution import Execution, use_compile_cache
    from ._saved import save_trained
    from ._train import train

    use_compile_cache(args.compile_cache)
    _check_tensorboard(args)
    genotype = read_genotype(args.genotype)
    data = _with_classes(load(args.dataset), args.num_classes)
    config = _train_config(args, data)
    execution = Execution(**{k: getattr(args, k) for k in EXECUTION_OPTIONS if getattr(args, k, None) is not None})
    out = args.out or _new_run_dir()
    os.makedirs(out, exist_ok=True)
    print(f"darts-eqx train: {genotype}\n  {data!r}\n  config: {config}\n  run folder: {out}", file=sys.stderr)
    atomic_write_text(os.path.join(out, "genotype.json"), genotype.to_json(indent=2))
    atomic_write_text(
        os.path.join(out, "train_config.json"),
        json.dumps({"dataset": args.dataset, "seed": args.seed, **dataclasses.asdict(config)}, indent=2),
    )

    def save_history(history, model, state):
        atomic_write_text(os.path.join(out, "history.json"), json.dumps(history, indent=1))

    start = time.perf_counter()
    metrics = {"metrics_dir": out, "tensorboard": args.tensorboard}
    result = train(
        jax.random.key(args.seed), genotype, data, config, execution=execution, callback=save_history, **metrics
    )
    save_trained(out, result, data.num_classes, data.image_shape[2])
    last = result.history[-1]
    print(
        f"done in {time.perf_counter() - start:.0f} s: {result.parameters:,} parameters, train acc "
        f"{last['train_acc']:.3f}, test acc {last['test_acc']:.3f}; wrote {out}/history.json, metrics.jsonl, model.eqx",
        file=sys.stderr,
    )


def _has_cell_pictures(genotype) -> bool:
    """A DARTS-cell genotype (two ops per node, normal and reduction cells) has cell pictures."""
    reduce = getattr(genotype, "reduce", ())
    return bool(reduce) and len(reduce) % 2 == 0


def show(args) -> None:
    from ._plot import plot_cell

    genotype = read_genotype(args.genotype)
    print(genotype)
    if not _has_cell_pictures(genotype):
        return
    os.makedirs(args.out, exist_ok=True)
    for which in ("normal", "reduce"):
        path = os.path.join(args.out, f"{which}.png")
        engine = plot_cell(genotype, which, path)
        print(f"wrote {path} ({engine})", file=sys.stderr)
