"""The floating-point dtype of data, weights and alpha: JAX's default, float32, or float64 when
`jax_enable_x64` is on (`JAX_ENABLE_X64=1`). Initial values are drawn in float32 and cast, so a key
gives the same initial network in both precisions."""

import jax
import numpy as np


def float_dtype() -> np.dtype:
    """float64 under `jax_enable_x64`, else float32."""
    return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))
