import ast
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import darts_eqx as dx
from darts_eqx._genotype import derive_cell

# Published with the paper (Liu et al., 2019; quark0/darts, cnn/genotypes.py).
DARTS_V2 = (
    "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
    "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], "
    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), "
    "('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])"
)
# PC-DARTS (Xu et al., 2020) writes concat as range(2, 6).
PC_DARTS = (
    "Genotype(normal=[('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 0), ('dil_conv_3x3', 1), "
    "('sep_conv_5x5', 0), ('sep_conv_3x3', 1), ('avg_pool_3x3', 0), ('dil_conv_3x3', 1)], normal_concat=range(2, 6), "
    "reduce=[('sep_conv_5x5', 1), ('max_pool_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_5x5', 2), "
    "('sep_conv_3x3', 0), ('sep_conv_3x3', 3), ('sep_conv_3x3', 1), ('sep_conv_3x3', 2)], reduce_concat=range(2, 6))"
)


def test_published_genotypes_round_trip():
    g = dx.Genotype.parse(DARTS_V2)
    assert str(g) == DARTS_V2
    assert g.normal[5] == ("skip_connect", 0) and g.reduce_concat == (2, 3, 4, 5)
    assert dx.Genotype.from_json(g.to_json()) == g == dx.Genotype.from_json(g.to_dict())
    pc = dx.Genotype.parse(PC_DARTS)
    assert pc.normal_concat == (2, 3, 4, 5)
    assert dx.Genotype.parse(str(pc)) == pc


@pytest.mark.parametrize(
    "text,message",
    [
        ("Genotype(normal=[", "does not parse"),
        ("Foo(normal=[])", "must be `Genotype"),
        (DARTS_V2.replace("'sep_conv_3x3', 0", "'sep_conv_9x9', 0", 1), "sep_conv_9x9"),
        (DARTS_V2.replace("('dil_conv_3x3', 2)", "('dil_conv_3x3', 6)"), r"pair 7 \('dil_conv_3x3', 6\) feeds node 3"),
        (DARTS_V2.replace("('max_pool_3x3', 0)", "('none', 0)", 1), "'none' is not one of"),
        (DARTS_V2.replace("normal_concat=[2, 3, 4, 5]", "normal_concat=[2, 9]"), r"normal_concat \[2, 9\]"),
        (DARTS_V2.replace(", reduce_concat=[2, 3, 4, 5]", ""), "lacks"),
        (DARTS_V2.replace("[2, 3, 4, 5]", "__import__('os')", 1), "not a literal"),
    ],
)
def test_malformed_genotype_strings_are_clear_errors(text, message):
    with pytest.raises(ValueError, match=message):
        dx.Genotype.parse(text)


def test_malformed_genotype_json_is_a_clear_error():
    with pytest.raises(ValueError, match="does not parse"):
        dx.Genotype.from_json("{not json")
    good = dx.Genotype.parse(DARTS_V2).to_dict()
    with pytest.raises(ValueError, match="unknown keys"):
        dx.Genotype.from_json({**good, "colour": 1})
    with pytest.raises(ValueError, match="unknown search space"):
        dx.Genotype.from_json({**good, "space": "mars"})


def test_derive_cell_follows_the_paper_rule():
    names = dx.DARTS_SPACE.op_names
    w = np.full((14, 8), 0.1)
    # node 0 (edges 0, 1): `none` strongest everywhere must be ignored
    w[0, 0], w[0, 4] = 0.9, 0.3
    w[1, 0], w[1, 7] = 0.9, 0.2
    # node 1 (edges 2..4): input 2 strongest (dil_conv_3x3), then input 0 (max_pool)
    w[2, 1] = 0.5
    w[4, 6] = 0.8
    # nodes 2, 3: all equal -> ties go to the lower input index and the lower op index
    gene = derive_cell(w, names, 4)
    assert gene[:2] == (("sep_conv_3x3", 0), ("dil_conv_5x5", 1))
    assert gene[2:4] == (("dil_conv_3x3", 2), ("max_pool_3x3", 0))
    assert gene[4:] == (("max_pool_3x3", 0), ("max_pool_3x3", 1), ("max_pool_3x3", 0), ("max_pool_3x3", 1))
    assert all(isinstance(i, int) for _, i in gene)
    with pytest.raises(ValueError, match="non-finite"):
        derive_cell(np.where(w > 0.85, np.nan, w), names, 4)


def test_genotypes_are_read_without_jax():
    # Reading, checking and printing a genotype (and the published ones) imports neither jax,
    # equinox nor the C++ kernel: a fresh interpreter, so nothing else has imported them.
    script = f"""
import sys
from darts_eqx import GENOTYPES, Genotype, named_genotype
g = Genotype.parse({DARTS_V2!r})
assert Genotype.from_json(g.to_json()) == g and str(g) == {DARTS_V2!r}
assert named_genotype("darts_v2") == g == GENOTYPES["DARTS_V2"]
loaded = [m for m in ("jax", "jaxlib", "equinox", "darts_eqx._native", "darts_eqx._ops") if m in sys.modules]
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)


def test_a_registered_space_makes_its_genotypes_valid():
    def never_built(c, s, norm, key):
        raise AssertionError("a genotype never builds ops")

    def genotype(*pairs):
        return dx.Genotype(pairs, (), (), (), space="genotype_test")

    with pytest.raises(ValueError, match="unknown search space 'genotype_test'"):
        genotype(("scale", 0))
    dx.register_space(dx.SearchSpace("genotype_test", ("none", "scale"), (never_built, never_built)))
    assert genotype(("scale", 0)).normal == (("scale", 0),)
    with pytest.raises(ValueError, match="'none' is not one of \\('scale',\\)"):
        genotype(("none", 0))


def test_the_package_lists_and_resolves_every_public_name():
    # `__all__`, the lazy table and the imports type checkers read name the same things.
    typed = set()
    for node in ast.walk(ast.parse(Path(dx.__file__).read_text())):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "typing.TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom)
                for alias in stmt.names:
                    assert alias.asname == alias.name
                    typed.add(alias.name)
    lazy = set(dx._DEFINED_IN) | set(dx._SUBMODULES)
    assert sorted(dx.__all__) == sorted(lazy | {"__version__"}) and len(set(dx.__all__)) == len(dx.__all__)
    assert typed == lazy
    assert set(dx.__all__) <= set(dir(dx))
    for name in dx.__all__:
        assert getattr(dx, name) is not None
    assert isinstance(dx.nb201, types.ModuleType) and dx.Genotype is dx._genotype.Genotype
    with pytest.raises(AttributeError, match="no attribute 'Genotypes'"):
        getattr(dx, "Genotypes")
