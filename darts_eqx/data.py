"""Data loading for darts_eqx: `load(source)` accepts a Hugging Face `datasets` object or hub name,
a local path (.npz, `save_to_disk` folder, image folder), NumPy arrays, or nothing (the embedded
scikit-learn digits)."""

from ._data import (
    ImageData as ImageData,
    PixelNorm as PixelNorm,
    digits as digits,
    from_arrays as from_arrays,
    from_hf as from_hf,
    load as load,
)

__all__ = ["ImageData", "PixelNorm", "digits", "from_arrays", "from_hf", "load"]
