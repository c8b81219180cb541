"""The `darts-eqx` command line: run folder contents and clear one-line errors (exit 2)."""

import json

import numpy as np
import pytest
from helpers import tiny_arrays

import darts_eqx as dx
from darts_eqx._cli import _parser, main
from darts_eqx._commands import _run_settings, _train_config


def test_search_writes_genotype_and_history(tmp_path, capsys):
    x, y = tiny_arrays()
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y)
    out = tmp_path / "run"
    code = main(
        [
            "search",
            "--dataset",
            str(tmp_path / "d.npz"),
            "--space",
            "seed",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--channels",
            "4",
            "--layers",
            "1",
            "--method",
            "drnas",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert json.loads((out / "config.json").read_text())["method"] == "drnas"
    genotype = json.loads((out / "genotype.json").read_text())
    assert set(genotype) == {"space", "normal", "normal_concat", "reduce", "reduce_concat"}
    assert genotype["space"] == "seed" and len(genotype["normal"]) == 1
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(history[0])
    assert (out / "supernet.eqx").stat().st_size > 0
    assert capsys.readouterr().out.startswith("Genotype(normal=[(")


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    code = main(["search", "--dataset", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("darts-eqx: error:") and "nope.npz" in err and "Traceback" not in err
    code = main(["search", "--batch-size", "5000", "--out", str(tmp_path / "r")])
    assert code == 2 and "batch_size (=5000)" in capsys.readouterr().err
    code = main(["search", "--method", "snas", "--out", str(tmp_path / "r")])
    assert code == 2 and "invalid choice: 'snas'" in capsys.readouterr().err


def test_resume_of_a_missing_folder_and_too_few_classes_are_errors(tmp_path, capsys):
    # a typo in --out must not silently start a new search
    code = main(["search", "--resume", "--out", str(tmp_path / "typo")])
    err = capsys.readouterr().err
    assert code == 2 and "there is no run folder" in err and "typo" in err
    assert not (tmp_path / "typo").exists()
    for command in (["search"], ["train", "--genotype", "DARTS_V2"]):
        code = main([*command, "--num-classes", "5", "--out", str(tmp_path / "r")])
        assert code == 2 and "training labels of 'digits' hold 9, outside [0, 5)" in capsys.readouterr().err


def test_train_does_not_mirror_digits_unless_asked():
    digits, images = dx.data.load("digits"), dx.data.from_arrays(*tiny_arrays(n=8))

    def config(data, *options):
        return _train_config(_parser().parse_args(["train", "--genotype", "DARTS_V2", *options]), data)

    assert config(digits).flip is False and config(images).flip is True  # a mirrored digit changes label
    assert config(digits, "--flip").flip is True and config(images, "--no-flip").flip is False
    assert config(digits, "--no-cutout").cutout is False and config(digits).layers == 5


def test_resuming_a_run_folder_from_before_searches_augmented_keeps_it_unaugmented(tmp_path):
    def resumed_options(config: dict) -> dict:
        (tmp_path / "config.json").write_text(json.dumps(config))
        return _run_settings(_parser().parse_args(["search", "--resume", "--out", str(tmp_path)]))[3]

    old = {"dataset": "digits", "seed": 0, "channels": 4, "epochs": 2}  # no "augment": it did not
    assert resumed_options(old) == {"channels": 4, "epochs": 2, "augment": False}
    assert resumed_options({**old, "augment": True})["augment"] is True


def test_num_classes_beyond_the_labels():
    data = dx.data.load("digits")
    assert data.with_num_classes(12).num_classes == 12 and data.num_classes == 10
    with pytest.raises(ValueError, match=r"num_classes \(=1\) must be an integer >= 2"):
        data.with_num_classes(1)


def test_darts_search_with_shared_trace_draws_its_cells_and_alphas(tmp_path):
    x, y = tiny_arrays(n=64)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y)
    out = tmp_path / "run"
    args = ["search", "--dataset", str(tmp_path / "d.npz"), "--space", "darts", "--epochs", "1", "--batch-size", "16"]
    # one (reduction) cell: cheap; with the one-traced-gradient step, which runs the gated
    # kernel gradients of the fused darts cell
    assert main([*args, "--channels", "2", "--layers", "1", "--shared-trace", "--out", str(out)]) == 0
    for name in ("normal.png", "reduce.png", "alphas.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), name
    assert json.loads((out / "execution.json").read_text())["shared_trace"] is True
    assert all(np.isfinite(h["train_loss"]) for h in json.loads((out / "history.json").read_text()))
