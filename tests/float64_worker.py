"""Run by test_float64.py in a fresh interpreter with `JAX_ENABLE_X64=1` (x64 is process-wide):
tiny searches, discretising and training, all in float64. `quick`: the seed space and a DARTS
training; `full`: every space, order and estimator, and PC-DARTS. Prints one JSON line: per run,
the dtypes of every floating leaf and whether all is finite."""

import json
import os
import sys

os.environ["JAX_ENABLE_X64"] = "1"
os.environ["JAX_PLATFORMS"] = "cpu"

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from helpers import tiny_arrays  # noqa: E402

import darts_eqx as dx  # noqa: E402
from darts_eqx._supernet import build_supernet  # noqa: E402

DATA = dx.data.from_arrays(*tiny_arrays(n=64), *tiny_arrays(n=16, seed=1))
TINY = dict(channels=4, epochs=1, batch_size=16, progress=False)


def float_dtypes(tree) -> list[str]:
    return sorted({str(x.dtype) for x in jax.tree.leaves(tree) if eqx.is_inexact_array(x)})


def finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(tree) if eqx.is_inexact_array(x))


def searched(**options) -> dict:
    r = dx.search(jax.random.key(0), DATA, **{**TINY, **options})
    x = jnp.asarray(DATA.x_test[:4])
    logits = r.network(x)
    return {
        "dtypes": float_dtypes((r.supernet, r.network)),
        "logits": str(logits.dtype),
        "finite": finite((r.supernet, logits)) and bool(np.isfinite(r.history[-1]["val_loss"])),
        "genotype": str(r.genotype),
    }


out = {"x_train": str(DATA.x_train.dtype)}
if sys.argv[1] == "quick":
    initial = build_supernet(dx.SearchConfig(channels=4, layers=2), (8, 8, 1), 3, key=jax.random.key(0))
    out["initial"] = [np.asarray(x).tolist() for x in jax.tree.leaves(initial) if eqx.is_inexact_array(x)]
    out["seed, order 1, beta-DARTS"] = searched(space="seed", layers=1, beta_reg=1.0)
    tiny_training = dict(channels=4, layers=2, epochs=1, batch_size=16, auxiliary=False, progress=False)
    trained = dx.train(jax.random.key(1), dx.GENOTYPES["DARTS_V2"], DATA, **tiny_training)
    out["train DARTS_V2"] = {
        "dtypes": float_dtypes((trained.model, trained.state)),
        "finite": finite(trained.model) and bool(np.isfinite(trained.history[-1]["train_loss"])),
    }
else:  # every space, order and estimator, and PC-DARTS: minutes of float64 compiles
    out["darts, order 1"] = searched(layers=2)
    exact_pc = dict(layers=2, order=2, estimator="exact", partial_channels=2)
    out["darts, order 2, exact, partial channels 2"] = searched(**exact_pc)
    out["darts, order 2, finite difference"] = searched(layers=2, order=2, estimator="finite_difference")
    out["nb201, order 1"] = searched(space="nb201", layers=1)
print(json.dumps(out))
