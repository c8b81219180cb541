"""Genotypes: the discrete architecture a search returns, in the original DARTS notation.

`str(genotype)` prints `Genotype(normal=[('sep_conv_3x3', 0), ...], normal_concat=[2, 3, 4, 5],
reduce=[...], reduce_concat=[2, 3, 4, 5])`, and `Genotype.parse` reads that form back (including the
`range(2, 6)` spelling used by later papers), so published genotypes paste straight in.
"""

import ast
import json
from dataclasses import dataclass

import numpy as np

from ._op_names import droppable_op, genotype_form, space_op_names

Cell = tuple[tuple[str, int], ...]

_FIELDS = ("normal", "normal_concat", "reduce", "reduce_concat")


def _cell_ops(cell) -> Cell:
    try:
        pairs = tuple((op, index) for op, index in cell)
    except (TypeError, ValueError):
        raise ValueError(f"a genotype cell must be a list of (op, input) pairs, got {cell!r}") from None
    for op, index in pairs:
        if not isinstance(op, str) or isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"genotype pair ({op!r}, {index!r}) is not (op name, input index)")
    return pairs


def _concat(concat) -> tuple[int, ...]:
    try:
        values = tuple(concat)
    except TypeError:
        raise ValueError(f"a genotype concat must be a list of node indices, got {concat!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"a genotype concat must hold integers, got {concat!r}")
    return values


@dataclass(frozen=True)
class Genotype:
    """A discrete cell pair: for each intermediate node two `(op, input)` pairs, where inputs
    0 and 1 are the cell's two inputs and `k + 2` is intermediate node `k`; `*_concat` lists the
    nodes whose outputs are concatenated into the cell output. The `seed` space has a single
    pair `(op, 0)` in `normal` and empty reduction fields."""

    normal: Cell
    normal_concat: tuple[int, ...]
    reduce: Cell
    reduce_concat: tuple[int, ...]
    space: str = "darts"

    def __post_init__(self):
        object.__setattr__(self, "normal", _cell_ops(self.normal))
        object.__setattr__(self, "reduce", _cell_ops(self.reduce))
        object.__setattr__(self, "normal_concat", _concat(self.normal_concat))
        object.__setattr__(self, "reduce_concat", _concat(self.reduce_concat))
        self._validate()

    def _validate(self):
        op_names = space_op_names(self.space)
        allowed = tuple(op for op in op_names if op != droppable_op(op_names))
        form = genotype_form(self.space)
        if form == "single":
            if len(self.normal) != 1 or self.reduce or self.reduce_concat:
                raise ValueError(f"a {self.space}-space genotype has exactly one op, got {self}")
        cells = (("normal", self.normal, self.normal_concat), ("reduce", self.reduce, self.reduce_concat))
        for name, cell, concat in cells:
            for position, (op, index) in enumerate(cell):
                if op not in allowed:
                    raise ValueError(f"genotype {name} cell: op {op!r} is not one of {allowed} (space {self.space!r})")
                if form == "cell" and not 0 <= index < position // 2 + 2:
                    raise ValueError(
                        f"genotype {name} cell: pair {position} ({op!r}, {index}) feeds node "
                        f"{position // 2}, whose inputs are 0..{position // 2 + 1}"
                    )
            if form == "cell":
                if len(cell) % 2 or not cell:
                    raise ValueError(f"genotype {name} cell has {len(cell)} pairs; DARTS cells have two per node")
                nodes = len(cell) // 2 + 2
                bad = [c for c in concat if not 0 <= c < nodes]
                if bad or not concat:
                    raise ValueError(f"genotype {name}_concat {list(concat)} must name nodes in 0..{nodes - 1}")

    @property
    def steps(self) -> int:
        """Number of intermediate nodes per cell."""
        return len(self.normal) // 2

    def __str__(self) -> str:
        def cell(c):
            return "[" + ", ".join(f"({op!r}, {i})" for op, i in c) + "]"

        return (
            f"Genotype(normal={cell(self.normal)}, normal_concat={list(self.normal_concat)}, "
            f"reduce={cell(self.reduce)}, reduce_concat={list(self.reduce_concat)})"
        )

    def to_json(self, **dumps_options) -> str:
        """The genotype as JSON text (`to_dict`'s object; `dumps_options` go to `json.dumps`)."""
        return json.dumps(self.to_dict(), **dumps_options)

    def to_dict(self) -> dict:
        """A JSON-ready dict: `space`, and each cell a list of `[op, input]` pairs."""
        return {
            "space": self.space,
            "normal": [[op, i] for op, i in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [[op, i] for op, i in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    @classmethod
    def from_json(cls, obj: "dict | str") -> "Genotype":
        """Read `to_json`'s text or `to_dict`'s dict."""
        obj = parsed_json(obj, "genotype")
        if not isinstance(obj, dict):
            raise ValueError(f"genotype JSON must be an object, got {type(obj).__name__}")
        missing = [f for f in _FIELDS if f not in obj]
        if missing:
            raise ValueError(f"genotype JSON lacks {missing}")
        extra = sorted(set(obj) - set(_FIELDS) - {"space"})
        if extra:
            raise ValueError(f"genotype JSON has unknown keys {extra}")
        return cls._from_fields(obj, obj.get("space", "darts"))

    @classmethod
    def parse(cls, text: str, space: str = "darts") -> "Genotype":
        """Read the printed form `Genotype(normal=[...], normal_concat=..., reduce=[...],
        reduce_concat=...)`; concat may be a list or `range(a, b)`. Only literals are evaluated."""
        try:
            tree = ast.parse(text.strip(), mode="eval").body
        except SyntaxError as e:
            raise ValueError(f"genotype string does not parse ({e.msg}): {text!r}") from None
        if not (isinstance(tree, ast.Call) and getattr(tree.func, "id", None) == "Genotype"):
            raise ValueError(f"genotype string must be `Genotype(normal=..., ...)`, got {text!r}")
        if tree.args:
            raise ValueError("genotype string must use keyword arguments (normal=..., ...)")
        fields = {}
        for kw in tree.keywords:
            if kw.arg not in _FIELDS:
                raise ValueError(f"genotype string has unknown field {kw.arg!r}")
            fields[kw.arg] = _literal(kw.value)
        missing = [f for f in _FIELDS if f not in fields]
        if missing:
            raise ValueError(f"genotype string lacks {missing}")
        return cls._from_fields(fields, space)

    @classmethod
    def _from_fields(cls, fields: dict, space) -> "Genotype":
        if not isinstance(space, str):
            raise ValueError(f"genotype space must be a name, got {space!r}")
        normal, reduce = _cell_ops(fields["normal"]), _cell_ops(fields["reduce"])
        normal_concat, reduce_concat = _concat(fields["normal_concat"]), _concat(fields["reduce_concat"])
        return cls(normal, normal_concat, reduce, reduce_concat, space=space)


def _literal(node):
    # `range(a, b)` is the one call published genotypes use; everything else must be a literal.
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "range":
        return list(range(*(_literal(a) for a in node.args)))
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"genotype field is not a literal: {ast.unparse(node)!r}") from None


def derive_cell(weights: np.ndarray, op_names: tuple[str, ...], steps: int) -> Cell:
    """The paper's rule on softmax(alpha) of one cell type: for each node keep the 2 incoming
    edges whose strongest non-`none` op is strongest, and on each the argmax op excluding `none`.

    Ties go to the lower input index and the lower op index. Pairs of a node are listed strongest
    edge first, as the original code lists them.
    """
    weights = np.asarray(weights, dtype=np.float64)
    candidates = [i for i, name in enumerate(op_names) if name != "none"]
    expected = sum(2 + j for j in range(steps))
    if weights.shape != (expected, len(op_names)):
        raise ValueError(f"alpha weights of shape {weights.shape} do not fit {steps} nodes x {len(op_names)} ops")
    if not np.all(np.isfinite(weights)):
        raise ValueError("cannot derive a genotype from non-finite alpha")
    gene = []
    start = 0
    for node in range(steps):
        rows = weights[start : start + node + 2][:, candidates]
        strength = rows.max(axis=1)
        # stable sort on -strength: equal strengths keep ascending input order
        edges = sorted(range(node + 2), key=lambda i: -strength[i])[:2]
        for i in edges:
            gene.append((op_names[candidates[int(np.argmax(rows[i]))]], int(i)))
        start += node + 2
    return tuple(gene)


def parsed_json(obj, what: str):
    """`obj` read as JSON if it is text (a clear error naming `what` if it does not parse), else as is."""
    if not isinstance(obj, str):
        return obj
    try:
        return json.loads(obj)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} JSON does not parse: {e}") from None
