"""Data loading for darts_eqx: `load(source)` accepts a Hugging Face `datasets` object or hub name,
a local path (.npz, `save_to_disk` folder, image folder), NumPy arrays, or nothing (the embedded
scikit-learn digits)."""

from ._data import ImageData as ImageData
from ._data import digits as digits
from ._data import from_arrays as from_arrays
from ._data import from_hf as from_hf
from ._data import load as load
