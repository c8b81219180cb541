import os

# The suite's shapes are tiny, so XLA's compile time is nearly all of it: compile with most of
# XLA's optimisations off (about a fifth less time; the same programs, rounded the same way up to
# the order of operations). Set before JAX starts, and inherited by the suite's subprocesses.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

# In-process CLI runs must not switch on the persistent compilation cache for the rest of the
# session (tests that check the cache pass --compile-cache DIR to a subprocess).
os.environ["DARTS_EQX_COMPILE_CACHE"] = "off"

# Each pytest-xdist worker is a JAX process of its own, with its own compiles and up to 4.2 GB of
# memory (seen on 2 cores): four of them fit a 24 GB machine, and with four the longest test
# files already take a fair share of the wall time.
MAX_WORKERS = 4


@pytest.hookimpl(optionalhook=True, wrapper=True)
def pytest_xdist_auto_num_workers(config):
    """xdist's own count for `-n auto` (its cores), capped, unless PYTEST_XDIST_AUTO_NUM_WORKERS chose it."""
    workers = yield
    return workers if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS") else min(workers, MAX_WORKERS)


# Implicit rank promotion hides shape bugs; make it an error in the tests.
jax.config.update("jax_numpy_rank_promotion", "raise")

# The tests switch on float64 with `jax.enable_x64(...)`, which JAX added in 0.8; the oldest JAX
# darts_eqx supports (pyproject.toml) has the same context manager in `jax.experimental`.
if not hasattr(jax, "enable_x64"):
    from jax.experimental import enable_x64

    jax.enable_x64 = enable_x64


@pytest.fixture
def getkey():
    """Deterministic fresh keys: `getkey()` returns a new key each call."""
    keys = iter(jax.random.split(jax.random.key(1234), 1000))
    return lambda: next(keys)
