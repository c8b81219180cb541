import os

import jax
import pytest

# In-process CLI runs must not switch on the persistent compilation cache for the rest of the
# session (tests that check the cache pass --compile-cache DIR to a subprocess).
os.environ["DARTS_EQX_COMPILE_CACHE"] = "off"

# Implicit rank promotion hides shape bugs; make it an error in the tests.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """Deterministic fresh keys: `getkey()` returns a new key each call."""
    keys = iter(jax.random.split(jax.random.key(1234), 1000))
    return lambda: next(keys)
