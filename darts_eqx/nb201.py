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
import os
from dataclasses import dataclass

import einops
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from ._conv import pointwise_conv
from ._mixed import ArchLogits, MixedOp
from ._network import Stem, classify
from ._ops import BatchNorm, Output, ReLUConvBN, _uniform
from ._spaces import NB201_SPACE

Images = Float[Array, "batch height width channels"]

NODES = 4
EDGES = tuple((i, j) for j in range(1, NODES) for i in range(j))  # (from, to), the string's order


class NB201Cell(eqx.Module):
    """Node j = sum over i < j of mixed_op(i -> j)(node i); output node 3."""

    edges: tuple[MixedOp, ...]

    def __init__(self, channels: int, *, key: PRNGKeyArray):
        keys = jax.random.split(key, len(EDGES))
        self.edges = tuple(MixedOp(NB201_SPACE, channels, 1, key=k) for k in keys)

    def __call__(self, x: Images, weights: Float[Array, "6 5"]) -> Images:
        nodes = [x]
        for j in range(1, NODES):
            terms = [self.edges[e](nodes[i], weights[e]) for e, (i, to) in enumerate(EDGES) if to == j]
            nodes.append(sum(terms[1:], terms[0]))
        return nodes[-1]


class ResidualReduction(eqx.Module):
    """The benchmark's residual block between stages: ReLU-conv3x3(stride 2)-BN, ReLU-conv3x3-BN,
    plus a shortcut of 2x2 average pooling and a 1x1 conv."""

    conv_a: ReLUConvBN
    conv_b: ReLUConvBN
    shortcut: Float[Array, "cin cout"]

    def __init__(self, cin: int, cout: int, *, key: PRNGKeyArray):
        ka, kb, ks = jax.random.split(key, 3)
        self.conv_a = ReLUConvBN(cin, cout, 3, 2, 1, True, key=ka)
        self.conv_b = ReLUConvBN(cout, cout, 3, 1, 1, True, key=kb)
        self.shortcut = _uniform(ks, (cin, cout), cin)  # a 1x1 conv's kernel, PyTorch's init

    def __call__(self, x: Images) -> Output:
        pooled = einops.reduce(x, "b (h 2) (w 2) c -> b h w c", "mean")
        return self.conv_b(self.conv_a(x)) + pointwise_conv(pooled, self.shortcut)


class NB201Network(eqx.Module):
    """The NAS-Bench-201 supernet (see the module docstring); `cells` is N per stage."""

    stem: Stem
    stages: tuple[NB201Cell, ...]  # each: N cells stacked along a leading axis
    reductions: tuple[ResidualReduction, ...]
    last_norm: BatchNorm
    classifier: eqx.nn.Linear
    alpha: ArchLogits

    def __init__(
        self, channels: int = 16, cells: int = 5, num_classes: int = 10, in_channels: int = 3, *, key: PRNGKeyArray
    ):
        if channels < 1 or cells < 1:
            raise ValueError(f"channels (={channels}) and cells (={cells}) must be positive")
        k_stem, k_cells, k_red, k_cls, k_alpha = jax.random.split(key, 5)
        self.stem = Stem(in_channels, channels, key=k_stem)
        widths = (channels, 2 * channels, 4 * channels)
        stages = []
        for width, k in zip(widths, jax.random.split(k_cells, 3)):
            built = [NB201Cell(width, key=kc) for kc in jax.random.split(k, cells)]
            stages.append(jax.tree.map(lambda *xs: jnp.stack(xs), *built))
        self.stages = tuple(stages)
        self.reductions = tuple(
            ResidualReduction(a, b, key=k) for a, b, k in zip(widths[:-1], widths[1:], jax.random.split(k_red, 2))
        )
        self.last_norm = BatchNorm(widths[-1], affine=True)
        self.classifier = eqx.nn.Linear(widths[-1], num_classes, key=k_cls)
        self.alpha = ArchLogits.init(len(EDGES), len(NB201_SPACE.op_names), key=k_alpha)

    def __call__(self, x: Images):
        h = self.stem(x)
        weights = self.alpha.weights()
        for s, stage in enumerate(self.stages):
            if s:
                if h.shape[1] % 2 or h.shape[2] % 2:
                    raise ValueError(f"NB201 reduction needs even height and width, got {h.shape[1]}x{h.shape[2]}")
                h = self.reductions[s - 1](h)
            dynamic, static = eqx.partition(stage, eqx.is_array)
            h, _ = lax.scan(lambda h, d: (eqx.combine(d, static)(h, weights), None), h, dynamic)
        return classify(self.classifier, jax.nn.relu(self.last_norm(h)))


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

    def to_json(self) -> dict:
        return {"space": "nb201", "arch": str(self)}

    @classmethod
    def from_json(cls, obj: dict) -> "NB201Genotype":
        if not isinstance(obj, dict) or obj.get("space") != "nb201" or "arch" not in obj:
            raise ValueError(f"an NB201 genotype JSON is {{'space': 'nb201', 'arch': ...}}, got {obj!r}")
        return cls.parse(obj["arch"])


def derive_nb201_genotype(model: NB201Network) -> NB201Genotype:
    """The strongest op of each edge (`none` included: the benchmark has cells without some edges)."""
    weights = np.asarray(model.alpha.weights())
    return NB201Genotype(tuple(NB201_SPACE.op_names[int(i)] for i in weights.argmax(axis=1)))


_COLUMNS = {
    "cifar10": "CIFAR10TestAccuracy200Epochs",
    "cifar100": "CIFAR100TestAccuracy200Epochs",
    "imagenet16-120": "ImageNetTestAccuracy200Epochs",
}


def lookup(arch, table_path: str | os.PathLike) -> dict[str, float]:
    """The benchmark's test accuracies (percent, 200 epochs) of `arch` (a string or
    `NB201Genotype`) from a NAS-Bench-201 accuracy CSV with an `ArchitectureString` column, as
    `{"cifar10": ..., "cifar100": ..., "imagenet16-120": ...}` (columns the table lacks are left out)."""
    arch = str(arch if isinstance(arch, NB201Genotype) else NB201Genotype.parse(arch))
    table_path = os.fspath(table_path)
    try:
        with open(table_path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "ArchitectureString" not in reader.fieldnames:
                raise ValueError(f"{table_path}: no ArchitectureString column (has {reader.fieldnames})")
            for row in reader:
                if row["ArchitectureString"] == arch:
                    return {k: float(row[c]) for k, c in _COLUMNS.items() if row.get(c) not in (None, "")}
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the NAS-Bench-201 table {table_path} ({e})") from None
    raise ValueError(f"architecture {arch} is not in {table_path}")
