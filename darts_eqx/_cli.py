"""`darts-eqx` command line: `darts-eqx search|train|show [options]`.

`--help` of each command lists what the run computes apart from how it runs: the options of the
second kind (chunking, tracing, kernels, devices, compile cache) never change a result beyond
floating-point rounding, and a search checkpointed under one resumes under another.
"""

import argparse
import sys
import warnings
from typing import cast

# Fields of `SearchConfig` set from the command line: (flag, type, help).
SEARCH_OPTIONS = (
    (
        "--space",
        None,
        "search space: a registered space's name; built in: darts (default), nb201 (NAS-Bench-201's; --layers: "
        "cells per stage, default 5) and seed",
    ),
    ("--epochs", int, "search epochs"),
    ("--batch-size", int, "images per batch, in each half"),
    ("--channels", int, "initial channels C"),
    ("--layers", int, "number of cells (darts), cells per stage (nb201) or mixed layers (seed)"),
    ("--train-portion", float, "share of the training images that train the weights; the rest train alpha (0.5)"),
    ("--w-lr", float, "weight SGD learning rate, cosine-annealed per epoch (paper: 0.025)"),
    ("--w-lr-min", float, "the weight lr at the last epoch (paper: 0.001)"),
    ("--w-momentum", float, "weight SGD momentum (paper: 0.9)"),
    ("--w-weight-decay", float, "weight L2 weight decay (paper: 3e-4)"),
    ("--grad-clip", float, "clip the weight gradient to this global norm (paper: 5)"),
    ("--a-lr", float, "alpha Adam learning rate (paper: 3e-4)"),
    ("--a-weight-decay", float, "alpha L2 weight decay (paper: 1e-3)"),
    (
        "--partial-channels",
        int,
        "PC-DARTS: send 1/K of each edge's channels through its mixed op, with edge normalisation",
    ),
    ("--order", int, "1: first order (default); 2: unrolled architecture gradient"),
    (
        "--estimator",
        None,
        "order 2: exact (differentiate through the virtual step, default) or finite_difference (the paper's Eq. 8)",
    ),
    ("--xi", float, "order 2: the virtual step's size (default: the current weight lr, as the paper)"),
    (
        "--method",
        None,
        "the DARTS variant, with its authors' defaults: darts (default), gdas, drnas, sdarts-rs, sdarts-adv, fairdarts",
    ),
    (
        "--select",
        None,
        "how the genotype is chosen: argmax (the strongest alpha, default) or pt (DARTS-PT: the ops whose removal "
        "costs the supernet most validation accuracy)",
    ),
    ("--beta-reg", float, "beta-DARTS regularisation strength (ramped from 0; default off)"),
    ("--aux-skip", float, "DARTS-: auxiliary skip weight, decaying to 0 (paper: 1)"),
    ("--early-stop-factor", float, "DARTS-ES: stop when the Hessian eigenvalue grew by this factor"),
    ("--early-stop-window", int, "DARTS-ES window in epochs (default 5)"),
)
_CHOICES = {"--order": (1, 2), "--estimator": ("exact", "finite_difference"), "--select": ("argmax", "pt")}
# Fields of `Execution` set from the command line.
EXECUTION_OPTIONS = ("steps_per_chunk", "shared_trace", "depthwise", "xla_preset")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 2, like every other bad input."""

    def error(self, message):
        self.exit(2, f"darts-eqx: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="darts-eqx", description="Differentiable Architecture Search in JAX + Equinox")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    _search_parser(commands.add_parser("search", help="run a DARTS search"))
    _train_parser(commands.add_parser("train", help="train a genotype from scratch and report test accuracy"))
    v = commands.add_parser("show", help="print a genotype and draw its cells")
    v.add_argument("genotype", help="a genotype.json, a file with Genotype(...), or a name (DARTS_V2)")
    v.add_argument("--out", default=".", help="folder for normal.png and reduce.png (default: here)")
    v.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    return parser


_NUM_CLASSES_HELP = "the number of classes (default: the data set's, or the largest training label + 1)"


def _search_parser(s) -> None:
    from ._resume import DEFAULT_CHECKPOINT_EVERY, SAFE_TO_CHANGE
    from ._variants import METHODS

    meaning = s.add_argument_group("what the search computes")
    meaning.add_argument(
        "--dataset",
        help="digits (embedded, default), a Hugging Face name such as cifar10, or a path "
        "(.npz, save_to_disk folder, image folder)",
    )
    for flag, kind, text in SEARCH_OPTIONS:
        choices = tuple(METHODS) if flag == "--method" else _CHOICES.get(flag)
        meaning.add_argument(flag, type=kind, choices=choices, help=text)
    meaning.add_argument(
        "--hessian", action="store_true", default=None, help="record the dominant Hessian eigenvalue per epoch"
    )
    meaning.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crop and horizontal flip of every search batch (default: on; off on the digits)",
    )
    meaning.add_argument("--num-classes", type=int, help=_NUM_CLASSES_HELP)
    meaning.add_argument("--seed", type=int, help="PRNG seed (default: 0)")
    run = s.add_argument_group("run folder and checkpoints")
    run.add_argument("--out", help="run folder (default: a new folder under runs/)")
    run.add_argument("--nb201-table", help="with --space nb201: a NAS-Bench-201 accuracy CSV to score the result")
    run.add_argument(
        "--checkpoint-every",
        type=int,
        help=f"checkpoint at least every N steps and at each epoch end (default: {DEFAULT_CHECKPOINT_EVERY})",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the search in --out from its newest good checkpoint; options not given are "
        "taken from its config.json and execution.json",
    )
    _tensorboard_option(run)
    run.add_argument(
        "--allow-change",
        action="append",
        default=[],
        choices=SAFE_TO_CHANGE,
        help="with --resume: accept this option differing from the checkpoint's (repeatable)",
    )
    how = _execution_group(s)
    how.add_argument("--devices", type=int, help="data-parallel over this many devices (default: all that JAX sees)")
    how.add_argument("--coordinator", help="several hosts: HOST:PORT of process 0 (jax.distributed)")
    how.add_argument("--num-processes", type=int, help="several hosts: number of processes")
    how.add_argument("--process-id", type=int, help="several hosts: this process's index, 0 to P-1")
    how.add_argument(
        "--distributed",
        action="store_true",
        help="several hosts: let jax.distributed.initialize read the cluster (SLURM, Open MPI, ...)",
    )
    how.add_argument(
        "--shared-trace",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="trace the supernet's gradient once per step (first order, or order 2 with finite_difference) or "
        "once per phase: the shared trace compiles faster and holds less memory, and runs a little slower "
        "(default: shared for order 2 with finite_difference on CPU)",
    )
    s.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")


def _tensorboard_option(group) -> None:
    group.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write metrics.jsonl's scalars as TensorBoard event files under OUT/tensorboard/ "
        "(pip install 'darts_eqx[tensorboard]')",
    )


def _execution_group(parser):
    how = parser.add_argument_group("how it runs (never changes the result beyond rounding)")
    how.add_argument("--steps-per-chunk", type=int, help="steps fused into one compiled call (default: an epoch)")
    how.add_argument(
        "--depthwise",
        choices=("auto", "kernel", "composed"),
        help="CPU depthwise convolutions: the C++ kernel when it builds (auto, default), the kernel or an "
        "error (kernel), or XLA's dense convolution with composed kernels (composed)",
    )
    how.add_argument(
        "--xla-preset", choices=("fast_compile", "default"), help="XLA:CPU's optimisation preset (fast_compile)"
    )
    how.add_argument(
        "--compile-cache",
        metavar="DIR|off",
        help="keep compiled XLA programs in DIR, so a run with the same shapes and options (a resume, "
        "another seed) skips XLA's compile (default: $DARTS_EQX_COMPILE_CACHE, else "
        "$JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, /darts_eqx/xla, at most 2 GiB; "
        "off: compile every time)",
    )
    return how


def _train_parser(t) -> None:
    meaning = t.add_argument_group("what the training computes")
    meaning.add_argument(
        "--genotype", required=True, help="a genotype.json, a file with Genotype(...), or a name (DARTS_V2)"
    )
    meaning.add_argument("--dataset", default="digits", help="as for search; needs a test split")
    meaning.add_argument("--num-classes", type=int, help=_NUM_CLASSES_HELP)
    meaning.add_argument("--epochs", type=int)
    meaning.add_argument("--channels", type=int, help="initial channels C (paper: 36)")
    meaning.add_argument("--layers", type=int, help="number of cells (paper: 20)")
    meaning.add_argument("--batch-size", type=int)
    meaning.add_argument(
        "--auxiliary", action=argparse.BooleanOptionalAction, default=None, help="auxiliary head (0.4)"
    )
    meaning.add_argument("--cutout", action=argparse.BooleanOptionalAction, default=None, help="cutout augmentation")
    meaning.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random horizontal flips (default: on; off on the digits)",
    )
    meaning.add_argument("--seed", type=int, default=0)
    run = t.add_argument_group("run folder")
    run.add_argument("--out", help="run folder (default: a new folder under runs/)")
    _tensorboard_option(run)
    _execution_group(t)
    t.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")


def _one_line(message) -> str:
    return " ".join(str(message).split())


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"darts-eqx: warning: {_one_line(message)}", file=sys.stderr)


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # usage errors (status 2) and --help (0)
        return cast(int, e.code)  # argparse exits with an int status
    try:
        with warnings.catch_warnings():  # restores the caller's warning display afterwards
            if not args.debug:
                warnings.showwarning = _show_warning
            from . import _commands

            {"search": _commands.search, "train": _commands.train, "show": _commands.show}[args.command](args)
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
