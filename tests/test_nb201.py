"""The NAS-Bench-201 space: architecture strings, genotype from alpha, the stacked-cell scan
against a per-cell loop, ground-truth lookup, the `--space nb201 --nb201-table` command; and a
custom space through the same search machinery."""

import csv
import itertools
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_arrays

import darts_eqx as dx
from darts_eqx import nb201
from darts_eqx._cli import main
from darts_eqx._commands import read_genotype

BEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"


def test_architecture_strings_round_trip_and_bad_ones_are_named():
    genotype = nb201.NB201Genotype.parse(BEST)
    assert str(genotype) == BEST and genotype.ops[2] == "nor_conv_3x3" and genotype.ops[3] == "skip_connect"
    as_text, as_dict = genotype.to_json(), genotype.to_dict()
    assert nb201.NB201Genotype.from_json(as_text) == genotype == nb201.NB201Genotype.from_json(as_dict)
    assert genotype.to_dict() == {"space": "nb201", "arch": BEST} == json.loads(genotype.to_json())
    for bad, message in [
        ("|none~0|+|none~0|none~1|", "must have 3 '\\+'-separated nodes"),
        ("|none~0|+|none~0|+|none~0|none~1|none~2|", "node 2 must be"),
        ("|none~0|+|none~1|none~0|+|none~0|none~1|none~2|", "should come from node 0"),
        ("|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|", "NB201 op 'conv' is not one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            nb201.NB201Genotype.parse(bad)


def test_genotype_is_the_argmax_of_each_edge_none_included(getkey):
    model = nb201.supernet(2, 1, 3, 1, key=getkey())
    logits = np.zeros((6, 5), np.float32)
    for edge, op in enumerate(["none", "nor_conv_3x3", "skip_connect", "avg_pool_3x3", "nor_conv_1x1", "none"]):
        logits[edge, dx.NB201_SPACE.op_names.index(op)] = 1.0
    model = eqx.tree_at(lambda m: m.arch.alpha["cell"].logits, model, jnp.asarray(logits))
    genotype = dx.derive_genotype(model)
    assert str(genotype) == "|none~0|+|nor_conv_3x3~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|none~2|"


def test_stage_scan_equals_applying_each_cell(getkey):
    model = nb201.supernet(3, 2, 4, 1, key=getkey())
    x = jax.random.normal(getkey(), (4, 8, 8, 1))
    weights = model.arch.alpha["cell"].weights()
    h, _ = model.stem(x)
    for block in model.cells:
        if not isinstance(block, nb201.NB201Stage):
            h, _ = block(None, h)
            continue
        for c in range(2):  # the c-th cell, unstacked
            h = jax.tree.map(lambda leaf: leaf[c] if eqx.is_array(leaf) else leaf, block.cells)(h, weights)
    logits, _ = model.head(h)
    np.testing.assert_allclose(model(x), logits, rtol=1e-5, atol=1e-5)
    assert model(x).shape == (4, 4)


def write_table(path, accuracy):
    """A NAS-Bench-201-shaped table of all 5^6 cells, with made-up accuracies."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["CIFAR10TestAccuracy200Epochs", "CIFAR100TestAccuracy200Epochs", "ArchitectureString"])
        for ops in itertools.product(dx.NB201_SPACE.op_names, repeat=6):
            arch = str(nb201.NB201Genotype(ops))
            out.writerow([accuracy(arch), accuracy(arch) - 20, arch])


def score(arch: str) -> float:
    return 50.0 + arch.count("nor_conv_3x3") * 7.0


def test_lookup_reads_the_table(tmp_path):
    write_table(tmp_path / "t.csv", score)
    assert nb201.lookup(BEST, tmp_path / "t.csv") == {"cifar10": 78.0, "cifar100": 58.0}
    assert nb201.lookup(nb201.NB201Genotype.parse(BEST), tmp_path / "t.csv")["cifar10"] == 78.0
    (tmp_path / "small.csv").write_text("ArchitectureString,CIFAR10TestAccuracy200Epochs\n|none~0|+x,1\n")
    with pytest.raises(ValueError, match="is not in"):
        nb201.lookup(BEST, tmp_path / "small.csv")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no ArchitectureString column"):
        nb201.lookup(BEST, tmp_path / "other.csv")
    with pytest.raises(ValueError, match="cannot read the NAS-Bench-201 table"):
        nb201.lookup(BEST, tmp_path / "missing.csv")


def test_nb201_search_command_reports_the_benchmark_accuracy(tmp_path, capsys):
    write_table(tmp_path / "t.csv", score)
    x, y = tiny_arrays(n=64)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y)
    out = tmp_path / "run"
    args = ["search", "--dataset", str(tmp_path / "d.npz"), "--space", "nb201", "--layers", "1", "--channels", "4"]
    args += ["--epochs", "2", "--batch-size", "16", "--nb201-table", str(tmp_path / "t.csv"), "--out", str(out)]
    assert main(args) == 0
    genotype = json.loads((out / "genotype.json").read_text())
    assert genotype["space"] == "nb201" and nb201.NB201Genotype.from_json(genotype)
    scores = json.loads((out / "nb201.json").read_text())
    assert scores["arch"] == genotype["arch"] and scores["cifar10"] == score(genotype["arch"])
    assert "NAS-Bench-201: cifar10" in capsys.readouterr().out
    assert (out / "alphas.png").exists()
    # anytime: each epoch's record scores the cell alpha selected at that epoch
    history = json.loads((out / "history.json").read_text())
    for record in history:
        ops = [dx.NB201_SPACE.op_names[i] for i in np.argmax(record["alpha"], axis=-1)]
        arch = str(nb201.NB201Genotype(tuple(ops)))
        assert record["nb201"] == {"cifar10": score(arch), "cifar100": score(arch) - 20}
    assert history[-1]["nb201"]["cifar10"] == scores["cifar10"] and (out / "nb201.png").exists()
    assert main(["search", "--space", "darts", "--nb201-table", str(tmp_path / "t.csv")]) == 2
    # the run folder's genotype reads back for `show` and `train`, as its own space's genotype
    capsys.readouterr()
    assert read_genotype(str(out / "genotype.json")) == nb201.NB201Genotype.parse(genotype["arch"])
    assert main(["show", str(out / "genotype.json")]) == 0 and capsys.readouterr().out.strip() == genotype["arch"]


class Scale(eqx.Module):
    """A user's own op: a learned per-channel scale."""

    weight: jax.Array

    def __call__(self, x, state=None):
        return x * self.weight[None, None, None, :], state


def test_a_custom_space_searches_with_the_same_machinery(getkey):
    space = dx.register_space(
        dx.SearchSpace(
            "scale_or_pool",
            ("none", "scale", "avg_pool_3x3"),
            (
                lambda c, s, norm, key: dx.DARTS_SPACE.make_op("none", c, s, norm, key=key),
                lambda c, s, norm, key: Scale(jnp.full((c,), 0.5)),
                lambda c, s, norm, key: dx.SEED_SPACE.make_op("avg_pool_3x3", c, s, norm, key=key),
            ),
        )
    )
    assert dx.register_space(space) is space  # idempotent
    with pytest.raises(ValueError, match="already registered as 'darts'"):
        dx.register_space(dx.SearchSpace("darts", ("scale",), (lambda c, s, a, k: Scale(jnp.ones(c)),)))
    result = dx.search(
        jax.random.key(0), tiny_arrays(n=64), space="scale_or_pool", channels=4, layers=2, epochs=1, batch_size=16,
        progress=False,
    )  # fmt: skip
    assert result.genotype.space == "scale_or_pool" and result.genotype.normal[0][0] in ("scale", "avg_pool_3x3")
    assert np.asarray(result.supernet.arch.alpha["cell"].logits).shape == (1, 3)
    x = jnp.asarray(tiny_arrays(n=8)[0])
    np.testing.assert_allclose(result.network(x), dx.discretize(result.supernet)(x), rtol=1e-6)


class Widen(eqx.Module):
    def __call__(self, x, state=None):
        return jnp.concatenate([x, x], axis=-1), state


def test_a_custom_op_that_changes_the_shape_is_named_before_compiling():
    dx.register_space(
        dx.SearchSpace(
            "widening",
            ("skip_connect", "widen"),
            (
                lambda c, s, norm, key: dx.SEED_SPACE.make_op("skip_connect", c, s, norm, key=key),
                lambda c, s, norm, key: Widen(),
            ),
        )
    )
    with pytest.raises(
        ValueError, match=r"op 'widen' of space 'widening' maps a \(2, 8, 8, 4\) batch to \(2, 8, 8, 8\)"
    ):
        dx.search(jax.random.key(0), tiny_arrays(n=64), space="widening", channels=4, layers=1, epochs=1, batch_size=16)
