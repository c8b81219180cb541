"""The NAS-Bench-201 search space (Dong & Yang, ICLR 2020) and its ground-truth lookup.

Ops: none, skip_connect, nor_conv_1x1, nor_conv_3x3 (ReLU-conv-BN), avg_pool_3x3. A cell has 4
nodes; node j sums a mixed op on the edge from every earlier node (6 edges), the cell output is
node 3. The macro network is the benchmark's: 3x3 stem conv to C + BN, three stages of N cells
(C, 2C, 4C channels) joined by residual reduction blocks, BN-ReLU, global pool, linear; one alpha
[6, 5] is shared by all cells. The cells of a stage have the same shapes, so each stage is one
`lax.scan` over stacked cells: one compiled cell body per stage instead of N.

A genotype is the argmax op of each edge (`none` allowed), written as the benchmark's string
`|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`; `lookup(arch, table)` reads its accuracies from a
NAS-Bench-201 accuracy CSV (`ArchitectureString` plus `*TestAccuracy*` columns).
"""

import csv
import json
import os
from dataclasses import dataclass
from typing import Any

import einops
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from ._cell import OpModule
from ._conv import pointwise_conv
from ._genotype import parsed_json
from ._mixed import ArchLogits, MixedOp, OpWeights
from ._norm import EVAL_NORM, SEARCH_NORM, Normalisation
from ._op_names import NB201_OPS
from ._ops import Identity, ReLUConvBN, _uniform, pool, relu_conv_bn, skip, zero
from ._skeleton import CellNetwork, DropPath, Head, Stem
from ._spaces import Topology, register_space, space
from ._supernet import Architecture

Images = Float[Array, "batch height width channels"]

NODES = 4
EDGES = tuple((i, j) for j in range(1, NODES) for i in range(j))  # (from, to), the string's order


class NB201Cell(eqx.Module):
    """A supernet cell: node j = sum over i < j of mixed_op(i -> j)(node i); output node 3."""

    edges: tuple[MixedOp, ...]

    def __init__(self, channels: int, *, key: PRNGKeyArray):
        keys = jax.random.split(key, len(EDGES))
        self.edges = tuple(MixedOp(NB201_SPACE, channels, 1, key=k) for k in keys)

    def __call__(self, x: Images, weights: OpWeights) -> Images:
        nodes = [x]
        for j in range(1, NODES):
            terms = [self.edges[e](nodes[i], weights[e]) for e, (i, to) in enumerate(EDGES) if to == j]
            nodes.append(sum(terms[1:], terms[0]))
        return nodes[-1]


class NB201Stage(eqx.Module):
    """A supernet stage: N cells of the same shapes stacked along a leading axis, run as one
    `lax.scan` (one compiled cell body per stage instead of N)."""

    cells: NB201Cell

    def __call__(self, s0, s1: Images, weights, state=None, drop: DropPath | None = None):
        dynamic, static = eqx.partition(self.cells, eqx.is_array)
        h, _ = lax.scan(lambda h, d: (eqx.combine(d, static)(h, weights[0]), None), s1, dynamic)
        return h, state


class DiscreteNB201Cell(eqx.Module):
    """A discrete cell: node j = sum over i < j of op(i -> j)(node i), edges whose op is `none`
    left out (a node without edges is zero); output node 3."""

    ops: tuple[OpModule | None, ...]

    def __call__(self, s0, s1: Images, weights=None, state=None, drop: DropPath | None = None):
        nodes = [s1]
        keys: list[Any] = [None] * len(EDGES) if drop is None else list(jax.random.split(drop.key, len(EDGES)))
        for j in range(1, NODES):
            total = jnp.zeros_like(s1)
            for e, (i, to) in enumerate(EDGES):
                if to != j or self.ops[e] is None:
                    continue
                op = self.ops[e]
                assert op is not None  # skipped above
                h, state = op(nodes[i], state)
                if drop is not None and not isinstance(self.ops[e], Identity):
                    h = drop(h, keys[e])
                total = total + h
            nodes.append(total)
        return nodes[-1], state


class ResidualReduction(eqx.Module):
    """The benchmark's residual block between stages: ReLU-conv3x3(stride 2)-BN, ReLU-conv3x3-BN,
    plus a shortcut of 2x2 average pooling and a 1x1 conv."""

    conv_a: ReLUConvBN
    conv_b: ReLUConvBN
    shortcut: Float[Array, "cin cout"]

    def __init__(self, cin: int, cout: int, norm: Normalisation, *, key: PRNGKeyArray):
        ka, kb, ks = jax.random.split(key, 3)
        self.conv_a = ReLUConvBN(cin, cout, 3, 2, 1, norm, key=ka)
        self.conv_b = ReLUConvBN(cout, cout, 3, 1, 1, norm, key=kb)
        self.shortcut = _uniform(ks, (cin, cout), cin)  # a 1x1 conv's kernel, PyTorch's init

    def __call__(self, s0, x: Images, weights=None, state=None, drop: DropPath | None = None):
        if x.shape[1] % 2 or x.shape[2] % 2:
            raise ValueError(f"NB201 reduction needs even height and width, got {x.shape[1]}x{x.shape[2]}")
        pooled = einops.reduce(x, "b (h 2) (w 2) c -> b h w c", "mean")
        y, state = self.conv_a(x, state)
        y, state = self.conv_b(y, state)
        return y + pointwise_conv(pooled, self.shortcut), state


_AFFINE_SEARCH_NORM = Normalisation(running=False, affine=True)  # the residual blocks' and head's BN


def supernet(
    channels: int = 16, cells: int = 5, num_classes: int = 10, in_channels: int = 3, *, key: PRNGKeyArray
) -> CellNetwork:
    """The NAS-Bench-201 supernet (see the module docstring); `cells` is N per stage."""
    if channels < 1 or cells < 1:
        raise ValueError(f"channels (={channels}) and cells (={cells}) must be positive")
    k_stem, k_cells, k_red, k_cls, k_alpha = jax.random.split(key, 5)
    widths = (channels, 2 * channels, 4 * channels)
    stages = []
    for width, k in zip(widths, jax.random.split(k_cells, 3)):
        built = [NB201Cell(width, key=kc) for kc in jax.random.split(k, cells)]
        stages.append(NB201Stage(jax.tree.map(lambda *xs: jnp.stack(xs), *built)))
    reductions = [
        ResidualReduction(a, b, _AFFINE_SEARCH_NORM, key=k)
        for a, b, k in zip(widths[:-1], widths[1:], jax.random.split(k_red, 2))
    ]
    blocks = (stages[0], reductions[0], stages[1], reductions[1], stages[2])
    return CellNetwork(
        Stem(in_channels, channels, SEARCH_NORM, key=k_stem),
        blocks,
        Head(widths[-1], num_classes, _AFFINE_SEARCH_NORM, key=k_cls),
        None,
        Architecture({"cell": ArchLogits.init(len(EDGES), len(NB201_SPACE.op_names), key=k_alpha)}),
        "nb201",
        ("cell", None, "cell", None, "cell"),
    )


def network(
    genotype: "NB201Genotype", channels: int = 16, cells: int = 5, num_classes: int = 10, in_channels: int = 3, *, key
):
    """`(network, state)`: `genotype` as the benchmark's network to train from scratch (running
    batch-norm statistics)."""
    if channels < 1 or cells < 1:
        raise ValueError(f"channels (={channels}) and cells (={cells}) must be positive")

    def build(*, key):
        k_stem, k_cells, k_red, k_cls = jax.random.split(key, 4)
        widths = (channels, 2 * channels, 4 * channels)
        blocks = []
        for s, (width, k) in enumerate(zip(widths, jax.random.split(k_cells, 3))):
            if s:
                blocks.append(ResidualReduction(widths[s - 1], width, EVAL_NORM, key=jax.random.fold_in(k_red, s)))
            for kc in jax.random.split(k, cells):
                keys = jax.random.split(kc, len(EDGES))
                ops = tuple(
                    None if op == "none" else NB201_SPACE.make_op(op, width, 1, EVAL_NORM, key=ke)
                    for op, ke in zip(genotype.ops, keys)
                )
                blocks.append(DiscreteNB201Cell(ops))
        return CellNetwork(
            Stem(in_channels, channels, EVAL_NORM, key=k_stem),
            tuple(blocks),
            Head(widths[-1], num_classes, EVAL_NORM, key=k_cls),
            None,
            None,
            "nb201",
            (None,) * len(blocks),
            genotype=genotype,
        )

    return eqx.nn.make_with_state(build)(key=key)


def _discretize(supernet: CellNetwork, genotype: "NB201Genotype") -> CellNetwork:
    blocks = []
    for block in supernet.cells:
        if not isinstance(block, NB201Stage):
            blocks.append(block)
            continue
        n = jax.tree.leaves(block.cells)[0].shape[0]
        for c in range(n):
            cell = jax.tree.map(lambda x, c=c: x[c] if eqx.is_array(x) else x, block.cells)
            ops = tuple(
                None if op == "none" else mixed.ops[NB201_SPACE.op_names.index(op)]
                for op, mixed in zip(genotype.ops, cell.edges)
            )
            blocks.append(DiscreteNB201Cell(ops))
    return CellNetwork(
        supernet.stem, tuple(blocks), supernet.head, None, None, "nb201", (None,) * len(blocks), genotype=genotype
    )


@dataclass(frozen=True)
class NB201Genotype:
    """One op per edge, in the benchmark's edge order (1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2);
    `str()` is the benchmark's architecture string."""

    ops: tuple[str, ...]
    space: str = "nb201"

    def __post_init__(self):
        ops = tuple(self.ops)
        if len(ops) != len(EDGES):
            raise ValueError(f"an NB201 genotype has {len(EDGES)} edges, got {len(ops)}: {ops}")
        for op in ops:
            if op not in NB201_SPACE.op_names:
                raise ValueError(f"NB201 op {op!r} is not one of {NB201_SPACE.op_names}")
        object.__setattr__(self, "ops", ops)

    def __str__(self) -> str:
        nodes = []
        for j in range(1, NODES):
            nodes.append("|" + "|".join(f"{self.ops[e]}~{i}" for e, (i, to) in enumerate(EDGES) if to == j) + "|")
        return "+".join(nodes)

    @classmethod
    def parse(cls, arch: str) -> "NB201Genotype":
        """Read `|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`."""
        if not isinstance(arch, str):
            raise ValueError(f"an NB201 architecture string is a str, got {type(arch).__name__}")
        nodes = arch.strip().split("+")
        if len(nodes) != NODES - 1:
            raise ValueError(f"NB201 architecture {arch!r} must have {NODES - 1} '+'-separated nodes")
        ops = []
        for j, node in enumerate(nodes, start=1):
            parts = node.strip("|").split("|")
            if not node.startswith("|") or not node.endswith("|") or len(parts) != j:
                raise ValueError(f"NB201 architecture {arch!r}: node {j} must be |op~0|...|op~{j - 1}|")
            for i, part in enumerate(parts):
                op, _, source = part.partition("~")
                if source != str(i):
                    raise ValueError(f"NB201 architecture {arch!r}: {part!r} should come from node {i}")
                ops.append(op)
        return cls(tuple(ops))

    def to_json(self, **dumps_options) -> str:
        """The genotype as JSON text (`to_dict`'s object; `dumps_options` go to `json.dumps`)."""
        return json.dumps(self.to_dict(), **dumps_options)

    def to_dict(self) -> dict:
        return {"space": "nb201", "arch": str(self)}

    @classmethod
    def from_json(cls, obj: "dict | str") -> "NB201Genotype":
        """Read `to_json`'s text or `to_dict`'s dict."""
        obj = parsed_json(obj, "NB201 genotype")
        if not isinstance(obj, dict) or obj.get("space") != "nb201" or "arch" not in obj:
            raise ValueError(f"an NB201 genotype JSON is {{'space': 'nb201', 'arch': ...}}, got {obj!r}")
        return cls.parse(obj["arch"])


def derive_nb201_genotype(model: CellNetwork) -> "NB201Genotype":
    """The strongest op of each edge (`none` included: the benchmark has cells without some edges)."""
    weights = np.asarray(model.arch.alpha["cell"].weights())
    if not np.all(np.isfinite(weights)):
        raise ValueError("cannot derive a genotype from non-finite alpha")
    return NB201Genotype(tuple(NB201_SPACE.op_names[int(i)] for i in weights.argmax(axis=1)))


class NB201Topology(Topology):
    """NAS-Bench-201's macro network and cell (see the module docstring); `layers` is the number
    of cells per stage. Its genotype is an `NB201Genotype`."""

    default_layers = 5  # the benchmark's cells per stage
    chooses_droppable = True

    def reductions(self, config) -> int:
        return 2

    def supernet(self, space, config, image_shape, num_classes, *, key):
        return supernet(config.channels, config.layers, num_classes, image_shape[2], key=key)

    def derive(self, space, supernet):
        return derive_nb201_genotype(supernet)

    def discretize(self, space, supernet, genotype):
        return _discretize(supernet, genotype)

    def network(self, space, genotype, channels, layers, num_classes, in_channels, auxiliary, *, key):
        # the benchmark's network has no auxiliary head: `auxiliary` is ignored
        return network(genotype, channels, layers, num_classes, in_channels, key=key)

    def genotype_from_json(self, space, obj):
        return NB201Genotype.from_json(obj)


NB201_SPACE = register_space(
    space(
        "nb201",
        NB201_OPS,
        {
            "none": zero,
            "skip_connect": skip,
            "nor_conv_1x1": relu_conv_bn(1),
            "nor_conv_3x3": relu_conv_bn(3),
            "avg_pool_3x3": pool("avg", normalised_in_search=False),
        },
        NB201Topology(),
    )
)


_COLUMNS = {
    "cifar10": "CIFAR10TestAccuracy200Epochs",
    "cifar100": "CIFAR100TestAccuracy200Epochs",
    "imagenet16-120": "ImageNetTestAccuracy200Epochs",
}


def lookup(arch, table_path: str | os.PathLike) -> dict[str, float]:
    """The benchmark's test accuracies (percent, 200 epochs) of `arch` (a string or
    `NB201Genotype`) from a NAS-Bench-201 accuracy CSV with an `ArchitectureString` column, as
    `{"cifar10": ..., "cifar100": ..., "imagenet16-120": ...}` (columns the table lacks are left out)."""
    arch = arch if isinstance(arch, NB201Genotype) else NB201Genotype.parse(arch)
    return benchmark_scores(table_path)(arch)["nb201"]


def benchmark_scores(table_path: str | os.PathLike):
    """`score(genotype) -> {"nb201": lookup(genotype, table_path)}`, the table read once: give it to
    `search(score_genotype=...)` and every epoch's history record carries the benchmark accuracies
    of the cell selected at that epoch (anytime NAS-Bench-201)."""
    table_path = os.fspath(table_path)
    try:
        with open(table_path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "ArchitectureString" not in reader.fieldnames:
                raise ValueError(f"{table_path}: no ArchitectureString column (has {reader.fieldnames})")
            table = {
                row["ArchitectureString"]: {
                    k: float(row[c]) for k, c in _COLUMNS.items() if row.get(c) not in (None, "")
                }
                for row in reader
            }
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the NAS-Bench-201 table {table_path} ({e})") from None

    def score(genotype) -> dict:
        arch = str(genotype)
        if arch not in table:
            raise ValueError(f"architecture {arch} is not in {table_path}")
        return {"nb201": table[arch]}

    return score
