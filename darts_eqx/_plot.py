"""Pictures: a cell of a genotype (graphviz's `dot` when it is installed, else matplotlib) and
softmax(alpha) over the epochs of a search's history (matplotlib), as PNG files."""

import os
import shutil
import subprocess

import numpy as np

from ._genotype import Genotype

_INPUT_NAMES = ("c_{k-2}", "c_{k-1}")


def _cell(genotype: Genotype, which: str):
    if which not in ("normal", "reduce"):
        raise ValueError(f"cell (={which!r}) must be 'normal' or 'reduce'")
    pairs = genotype.normal if which == "normal" else genotype.reduce
    concat = genotype.normal_concat if which == "normal" else genotype.reduce_concat
    if not pairs or len(pairs) % 2:
        raise ValueError(
            f"cell pictures are drawn for DARTS-cell genotypes (two ops per node); the {genotype.space!r} genotype's "
            f"{which} cell has {len(pairs)} ops"
        )
    return pairs, concat


def _dot_source(genotype: Genotype, which: str) -> str:
    pairs, concat = _cell(genotype, which)
    lines = [
        "digraph cell {",
        "  rankdir=LR; node [style=filled, fontname=Helvetica]; edge [fontname=Helvetica, fontsize=11];",
    ]
    for name in _INPUT_NAMES:
        lines.append(f'  "{name}" [fillcolor=darkseagreen2];')
    for node in range(len(pairs) // 2):
        lines.append(f'  "{node}" [shape=box, fillcolor=lightblue];')
    lines.append('  "c_{k}" [fillcolor=palegoldenrod];')
    for position, (op, index) in enumerate(pairs):
        source = _INPUT_NAMES[index] if index < 2 else str(index - 2)
        lines.append(f'  "{source}" -> "{position // 2}" [label="{op}", fillcolor=gray];')
    for node in concat:
        lines.append(f'  "{node - 2}" -> "c_{{k}}" [fillcolor=gray];')
    lines.append("}")
    return "\n".join(lines)


def _positions(pairs, concat):
    steps = len(pairs) // 2
    pos = {_INPUT_NAMES[0]: (0.0, 1.0), _INPUT_NAMES[1]: (0.0, -1.0)}
    for node in range(steps):
        pos[str(node)] = (1.0 + node, 1.5 - 3.0 * node / max(steps - 1, 1))
    pos["c_{k}"] = (steps + 1.0, 0.0)
    return pos


def _matplotlib_cell(genotype: Genotype, which: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs, concat = _cell(genotype, which)
    pos = _positions(pairs, concat)
    fig, ax = plt.subplots(figsize=(2.2 * (len(pairs) // 2 + 2), 4.5))
    colours = {**dict.fromkeys(_INPUT_NAMES, "#c1e1c1"), "c_{k}": "#eee8aa"}

    def arrow(a, b, label=None, bend=0.0):
        ax.annotate(
            "",
            xy=pos[b],
            xytext=pos[a],
            arrowprops=dict(arrowstyle="-|>", color="0.4", shrinkA=18, shrinkB=18, connectionstyle=f"arc3,rad={bend}"),
        )
        if label:
            (x0, y0), (x1, y1) = pos[a], pos[b]
            # the midpoint of matplotlib's arc3 curve: half-way to its control point
            mx, my = (x0 + x1) / 2 + 0.5 * bend * (y1 - y0), (y0 + y1) / 2 - 0.5 * bend * (x1 - x0)
            ax.text(mx, my, label, fontsize=8, ha="center", va="center",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))  # fmt: skip

    for position, (op, index) in enumerate(pairs):
        source = _INPUT_NAMES[index] if index < 2 else str(index - 2)
        arrow(source, str(position // 2), op, bend=0.15 if position % 2 else -0.15)
    for node in concat:
        arrow(str(node - 2), "c_{k}")
    for name, (x, y) in pos.items():
        ax.text(x, y, f"${name}$" if "_" in name else name, ha="center", va="center", fontsize=11,
                bbox=dict(boxstyle="round,pad=0.4", fc=colours.get(name, "#add8e6"), ec="0.3"))  # fmt: skip
    ax.set_xlim(-0.6, len(pairs) // 2 + 1.6)
    ax.set_ylim(-2.2, 2.2)
    ax.axis("off")
    ax.set_title(f"{which} cell")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_cell(genotype: Genotype, which: str, path: str | os.PathLike, *, engine: str | None = None) -> str:
    """Draw the `normal` or `reduce` cell of `genotype` as a PNG at `path`: nodes c_{k-2},
    c_{k-1}, the intermediate nodes 0..3 and the output c_{k}, edges labelled with their ops.
    `engine`: `dot` (graphviz, needs the binary), `matplotlib`, or None for dot when installed.
    Returns the engine used."""
    path = os.fspath(path)
    if engine not in (None, "dot", "matplotlib"):
        raise ValueError(f"engine (={engine!r}) must be 'dot', 'matplotlib' or None")
    dot = shutil.which("dot")
    if engine == "dot" and dot is None:
        raise ValueError("engine='dot' needs graphviz's `dot` binary on PATH")
    if engine != "matplotlib" and dot is not None:
        subprocess.run([dot, "-Tpng", "-o", path], input=_dot_source(genotype, which).encode(), check=True)
        return "dot"
    _matplotlib_cell(genotype, which, path)
    return "matplotlib"


def plot_alphas(history: list[dict], path: str | os.PathLike, op_names=None) -> None:
    """softmax(alpha) over the epochs of a search history: one small panel per edge and cell
    type, one line per op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("alpha_normal", "alpha_reduce", "alpha") if history and k in history[0]]
    if not keys:
        raise ValueError("the history holds no softmax(alpha) records (alpha_normal / alpha_reduce / alpha)")
    series = {k: np.asarray([record[k] for record in history]) for k in keys}  # [epochs, edges, ops]
    edges: int = max(v.shape[1] for v in series.values())
    ops = next(iter(series.values())).shape[2]
    if op_names is None:
        from ._op_names import DARTS_OPS, SEED_OPS

        op_names = DARTS_OPS if ops == len(DARTS_OPS) else SEED_OPS
    epochs = np.arange(1, len(history) + 1)
    cols = min(edges, 7)
    rows_per = -(-edges // cols)
    fig, axes = plt.subplots(
        rows_per * len(keys), cols, figsize=(2.1 * cols, 1.7 * rows_per * len(keys)), squeeze=False, sharey=True
    )
    for k_i, key in enumerate(keys):
        for e in range(edges):
            ax = axes[k_i * rows_per + e // cols][e % cols]
            if e >= series[key].shape[1]:
                ax.axis("off")
                continue
            for o in range(ops):
                ax.plot(epochs, series[key][:, e, o], label=op_names[o] if o < len(op_names) else str(o))
            ax.set_title(f"{key.removeprefix('alpha_') or 'alpha'} edge {e}", fontsize=8)
            ax.tick_params(labelsize=6)
        for e in range(edges, rows_per * cols):
            axes[k_i * rows_per + e // cols][e % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=7)
    fig.suptitle("softmax(alpha) per epoch")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(os.fspath(path), dpi=90)
    plt.close(fig)


def plot_benchmark(history: list[dict], path: str | os.PathLike, key: str = "nb201") -> None:
    """The benchmark accuracies each epoch's selected cell scores (`record[key]`, e.g. anytime
    NAS-Bench-201: one line per data set) over the epochs of a search history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [(r["epoch"], r[key]) for r in history if key in r]
    if not records:
        raise ValueError(f"the history holds no {key!r} records")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name in records[0][1]:
        ax.plot([e for e, _ in records], [scores[name] for _, scores in records], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy of the selected cell (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=90)
    plt.close(fig)
