"""Data-parallel search: 4 CPU devices (XLA_FLAGS, in a subprocess) compute the same search as one
device with the same global batch; an uneven batch is a clear error; two jax.distributed processes
on localhost agree with one device too."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import tiny_arrays

import darts_eqx as dx
from darts_eqx import _native

WORKER = os.path.join(os.path.dirname(__file__), "multidevice_worker.py")
# Sums over the batch run in another order when split over devices: float32 rounding only.
RTOL, ATOL = 1e-4, 1e-7
OPTIONS_EPOCHS = 2  # multidevice_worker.OPTIONS


def worker(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_same_search(a, b):
    np.testing.assert_allclose(a["alpha"], b["alpha"], rtol=RTOL, atol=ATOL)
    assert a["genotype"] == b["genotype"]
    assert len(a["history"]) == len(b["history"])
    for x, y in zip(a["history"], b["history"]):
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert x[key] == pytest.approx(y[key], rel=RTOL, abs=1e-6), key


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return worker("local", str(tmp_path_factory.mktemp("checkpoints")))


def test_four_devices_compute_the_one_device_search(local):
    assert local["devices"] == 4
    assert_same_search(local["one"], local["four"])
    assert local["all_reduce"]  # the batch really is split: the step all-reduces across devices
    # the C++ depthwise kernel runs on one device and on each device's part of the batch
    if _native._compiler() is not None:
        assert local["kernel_calls"]["1"] > 0 and local["kernel_calls"]["4"] > 0
    assert not local["darts_all_gather"]
    # not trivially equal: alpha moved from its init during the 8 steps
    assert np.abs(np.asarray(local["one"]["alpha"])).max() > 2e-3


def test_four_devices_give_one_devices_gradients_in_float32(local):
    # both run the C++ depthwise kernel (four on their parts of the batch): float32 rounding only
    one, four = local["gradients"]["1"], local["gradients"]["4"]
    assert len(one) == len(four) > 0
    for a, b in zip(one, four):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def assert_float64_search_agrees(run: dict, space: str):
    """Batch-norm statistics, losses and gradients over the global batch, the same random draws
    and data order: in float64 the searches agree to the order of the sums over the batch."""
    assert run["dtype"] == "float64"
    one, four = run[space]["1"], run[space]["4"]
    assert one["genotype"] == four["genotype"]
    assert len(one["history"]) == len(four["history"]) == OPTIONS_EPOCHS
    for x, y in zip(one["history"], four["history"]):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_allclose(np.asarray(y[key]), np.asarray(x[key]), rtol=1e-9, atol=1e-12, err_msg=key)
    for a, b in zip(one["alpha"], four["alpha"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-9, atol=1e-12)
    # not trivially equal: alpha moved from its init
    assert max(np.abs(np.asarray(a)).max() for a in one["alpha"]) > 2e-3


def test_four_devices_compute_the_one_device_search_in_float64():
    assert_float64_search_agrees(worker("float64", "seed"), "seed")


@pytest.mark.slow
def test_four_devices_compute_the_one_device_darts_and_nb201_searches_in_float64():
    run = worker("float64", "darts", "nb201", timeout=1800)
    for space in ("darts", "nb201"):
        assert_float64_search_agrees(run, space)


def test_four_device_checkpoint_resumes_on_one_device(local):
    assert_same_search(local["four"], local["resumed_on_one"])


def test_bad_device_requests_are_clear_errors(local):
    uneven, too_many, zero = local["errors"]
    assert uneven == "batch_size (=18) must divide evenly over 4 devices; use a multiple of 4 or fewer devices"
    assert too_many.startswith("devices (=5) must lie in [1, 4]: this run sees 4 cpu device(s)")
    assert zero.startswith("devices (=0) must lie in [1, 4]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost_compute_the_one_device_search(tmp_path):
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, "process", str(i), "2", port, str(tmp_path / f"checkpoints{i}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert [(o["devices"], o["local"]) for o in outputs] == [(4, 2), (4, 2)]
    single = dx.search(
        jax.random.key(3),
        dx.data.from_arrays(*tiny_arrays(n=128)),
        space="seed",
        channels=4,
        layers=1,
        epochs=2,
        batch_size=16,
        progress=False,
    )
    reference = {
        "alpha": [np.asarray(single.supernet.arch.alpha["cell"].logits).tolist()],
        "history": single.history,
        "genotype": single.genotype.to_dict(),
    }
    for o in outputs:
        assert_same_search(reference, o)
    # only process 0 writes checkpoints
    assert os.listdir(tmp_path / "checkpoints0") and not (tmp_path / "checkpoints1").exists()
