import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np


def tree_allclose(a, b, *, rtol: float, atol: float) -> bool:
    """Same structure and every leaf close within the given tolerances."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False
    return all(np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol) for x, y in zip(la, lb))


def random_images(key, n=32, size=8, channels=1):
    return jax.random.normal(key, (n, size, size, channels), jnp.float32)


def tiny_arrays(n=96, size=8, classes=3, seed=0):
    """A small learnable data set: the class sets the brightness of one quadrant."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(0.0, 0.3, (n, size, size, 1)).astype(np.float32)
    half = size // 2
    for c in range(classes):
        r, q = divmod(c, 2)
        x[y == c, r * half : (r + 1) * half, q * half : (q + 1) * half] += 2.0
    return x, y


@contextlib.contextmanager
def conv_impl(name: str):
    """Trace convolutions with formulation `name` inside the block (`DARTS_EQX_CONV`); `native` is
    the plain reference: XLA's own (grouped) convolutions and JAX's own gradients."""
    old = os.environ.get("DARTS_EQX_CONV")
    os.environ["DARTS_EQX_CONV"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["DARTS_EQX_CONV"]
        else:
            os.environ["DARTS_EQX_CONV"] = old
