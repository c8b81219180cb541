"""`darts-eqx search --resume` after a SIGKILL mid-epoch: the same genotype, history and supernet,
byte for byte, as a run never interrupted; damaged checkpoints and other runs' folders."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import tiny_arrays

from darts_eqx import _checkpoint

# 512 16x16 images: 256 per half / batch 32 = 8 steps per epoch; checkpoint every 2 steps. A chunk
# of 2 steps takes tens of milliseconds, so a kill right after the first checkpoint lands mid-epoch.
ARGS = ["--space", "seed", "--channels", "8", "--layers", "2", "--epochs", "3", "--batch-size", "32"]
ARGS += ["--checkpoint-every", "2", "--seed", "3"]
OUTPUTS = ("genotype.json", "history.json", "supernet.eqx")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    x, y = tiny_arrays(n=512, size=16)
    path = tmp_path_factory.mktemp("data") / "data.npz"
    np.savez(path, x_train=x, y_train=y)
    return str(path)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def cli(compile_cache):
    # Every run here compiles the same chunk: the first fills the persistent compilation cache,
    # the later ones load its executable (and must still give the same bytes as the first).
    def cli(*args):
        return [sys.executable, "-m", "darts_eqx._cli", "search", "--compile-cache", str(compile_cache), *args]

    return cli


@pytest.fixture(scope="module")
def run(cli):
    def run(*args):
        done = subprocess.run(cli(*args), capture_output=True, text=True, timeout=600)
        return done.returncode, done.stderr

    return run


@pytest.fixture(scope="module")
def uninterrupted(dataset, run, compile_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    code, err = run("--dataset", dataset, *ARGS, "--out", str(out))
    assert code == 0, err
    assert any(compile_cache.iterdir()), "the search compiled nothing into --compile-cache"
    return out


def test_sigkill_mid_epoch_then_resume_is_byte_identical(dataset, uninterrupted, cli, run, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        cli("--dataset", dataset, *ARGS, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not _checkpoint.list_checkpoints(out / "checkpoints"):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "genotype.json").exists()  # killed before the end
    path, manifest = _checkpoint.latest(out / "checkpoints")
    assert manifest["epoch_step"] > 0, f"the kill did not land mid-epoch: newest checkpoint {path}"

    # options not given on the command line come from the run folder's config.json
    code, err = run("--out", str(out), "--resume")
    assert code == 0, err
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name


def test_resume_with_a_damaged_newest_checkpoint_warns_and_falls_back(uninterrupted, run, tmp_path):
    out = tmp_path / "run"
    import shutil

    shutil.copytree(uninterrupted, out)
    newest = _checkpoint.list_checkpoints(out / "checkpoints")[0][1]
    with open(os.path.join(newest, "arrays.eqx"), "r+b") as f:
        f.seek(64)
        f.write(b"\xff" * 16)  # corrupted in place
    code, err = run("--out", str(out), "--resume")
    assert code == 0, err
    assert "darts-eqx: warning: skipping checkpoint" in err and "truncated or corrupted" in err
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name


def test_resume_refuses_another_runs_options_and_new_runs_refuse_used_folders(dataset, uninterrupted, run, tmp_path):
    from darts_eqx._cli import main

    out = tmp_path / "run"
    import shutil

    shutil.copytree(uninterrupted, out)
    config = json.loads((out / "config.json").read_text())
    assert config["space"] == "seed" and config["dataset"] == dataset
    assert "shared_trace" not in config  # how it ran is in execution.json: the form that ran, not None
    assert json.loads((out / "execution.json").read_text())["shared_trace"] is False
    code, err = run("--out", str(out), "--resume", "--space", "darts", "--layers", "2")
    assert code == 2 and err.strip().splitlines()[-1].startswith("darts-eqx: error: cannot resume from")
    assert "layers (checkpoint 2" not in err and "space (checkpoint 'seed', now 'darts')" in err
    assert json.loads((out / "config.json").read_text()) == config  # a refused resume changes nothing
    code = main(["search", "--dataset", dataset, *ARGS, "--out", str(out)])
    assert code == 2
