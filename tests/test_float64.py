"""float64 end to end under `JAX_ENABLE_X64=1` (in a subprocess: x64 is process-wide): data,
every space, both orders and estimators, PC-DARTS, discretising and training keep float64
throughout; and the same key starts the same network in both precisions."""

import json
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import darts_eqx as dx
from darts_eqx._supernet import build_supernet

WORKER = os.path.join(os.path.dirname(__file__), "float64_worker.py")


def run_worker(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    done = subprocess.run([sys.executable, WORKER, mode], capture_output=True, text=True, timeout=1800, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs():
    return run_worker("quick")


def check_run(run: dict):
    assert run["dtypes"] == ["float64"], run
    assert run["finite"]
    if "logits" in run:
        assert run["logits"] == "float64"


def test_data_is_float64(runs):
    assert runs["x_train"] == "float64"


@pytest.mark.parametrize("run", ["seed, order 1, beta-DARTS", "train DARTS_V2"])
def test_a_search_and_a_training_stay_float64(runs, run):
    check_run(runs[run])


@pytest.mark.slow
def test_every_space_order_and_estimator_stays_float64():
    runs = run_worker("full")
    names = [
        "darts, order 1",
        "darts, order 2, exact, partial channels 2",
        "darts, order 2, finite difference",
        "nb201, order 1",
    ]
    for name in names:
        check_run(runs[name])


def test_the_same_key_starts_the_same_network_in_both_precisions(runs):
    net = build_supernet(dx.SearchConfig(channels=4, layers=2), (8, 8, 1), 3, key=jax.random.key(0))
    leaves = [x for x in jax.tree.leaves(net) if eqx.is_inexact_array(x)]
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}
    assert len(leaves) == len(runs["initial"])
    for x32, x64 in zip(leaves, runs["initial"]):
        np.testing.assert_array_equal(np.asarray(x32, np.float64), np.asarray(x64))
