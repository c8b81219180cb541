"""Image data for search: from Hugging Face `datasets`, local paths, NumPy arrays, or the embedded
scikit-learn digits, into normalised float NHWC arrays (float32; float64 under `jax_enable_x64`) with integer labels.

Everything is checked here, before any compilation: a bad shape, dtype, pixel or label is a
`ValueError` naming it.
"""

import dataclasses
import os
import zipfile
from dataclasses import dataclass
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from ._dtype import float_dtype

# scikit-learn's digits as uint8 arrays `images` [1797, 8, 8] (0..16) and `labels` [1797].
_DIGITS_FILE = os.path.join(os.path.dirname(__file__), "_digits.npz")
_IMAGE_COLUMNS = ("img", "image", "pixel_values", "x")
_LABEL_COLUMNS = ("label", "labels", "fine_label", "y")


class PixelNorm(NamedTuple):
    """The per-channel normalisation of a data set's images: `(pixels - mean) / std`, with the
    mean and standard deviation of its raw training pixels. Called on images of any integer or
    float dtype (`[n, h, w]` or `[n, h, w, c]`, NumPy or JAX, also under `jit`) it returns them as
    the data set's images are: normalised, in JAX's default float."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images):
        x = jnp.asarray(images)
        if not (jnp.issubdtype(x.dtype, jnp.integer) or jnp.issubdtype(x.dtype, jnp.floating)):
            raise ValueError(f"images must be integer or float pixels, got dtype {x.dtype}")
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] != len(self.mean):
            raise ValueError(
                f"images must have shape [n, height, width, {len(self.mean)}] (or [n, height, width] for one "
                f"channel), got shape {x.shape}"
            )
        dtype = float_dtype()
        mean, std = (jnp.asarray(v, dtype).reshape(1, 1, 1, -1) for v in (self.mean, self.std))
        return (x.astype(dtype) - mean) / std


@dataclass(frozen=True, eq=False)
class ImageData:
    """A labelled image data set, normalised per channel with the training set's statistics.

    `x_*` are float32 (float64 under `jax_enable_x64`) `[n, height, width, channels]`, `y_*` int32
    `[n]`; the test split may be absent. `pixel_norm` normalises new images the same way (the
    networks that `search` and `train` return carry it: `network.predict(raw_images)`).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    num_classes: int
    name: str = "arrays"
    pixel_norm: PixelNorm | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def with_num_classes(self, num_classes: int) -> "ImageData":
        """The same data with `num_classes` classes (more than its labels show: classes absent
        from this sample); a `ValueError` if a label does not fit."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes (={num_classes!r}) must be an integer >= 2")
        for y, what in ((self.y_train, "training labels"), (self.y_test, "test labels")):
            if y is not None and y.max() >= num_classes:
                raise ValueError(f"{what} of {self.name!r} hold {int(y.max())}, outside [0, {num_classes})")
        return dataclasses.replace(self, num_classes=num_classes)

    def with_test_split(self, fraction: float, seed: int = 0) -> "ImageData":
        """The same data with a share `fraction` of its training images (shuffled with `seed`, at
        least one) held out as its test split; a `ValueError` if it already has one."""
        if self.x_test is not None:
            raise ValueError(f"data set {self.name!r} already has a test split")
        if not 0 < fraction < 1:
            raise ValueError(f"fraction (={fraction!r}) must lie in (0, 1)")
        order = np.random.default_rng(seed).permutation(len(self.x_train))
        n_test = max(1, round(fraction * len(order)))
        if n_test >= len(order):
            raise ValueError(f"data set {self.name!r} has too few images ({len(order)}) to hold out a test split")
        test, kept = order[:n_test], order[n_test:]
        x, y = self.x_train, self.y_train
        return dataclasses.replace(self, x_train=x[kept], y_train=y[kept], x_test=x[test], y_test=y[test])

    def __repr__(self) -> str:
        test = 0 if self.x_test is None else len(self.x_test)
        return (
            f"ImageData(name={self.name!r}, train={len(self.x_train)}, test={test}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )


def _images(x, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == object or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{what} must be integer or float pixels, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(
            f"{what} must have shape [n, height, width] or [n, height, width, channels], got shape {x.shape}"
        )
    if x.shape[-1] not in (1, 3):
        raise ValueError(f"{what} must have 1 or 3 channels last (NHWC), got shape {x.shape} ({x.shape[-1]} channels)")
    if len(x) == 0:
        raise ValueError(f"{what} is empty")
    x = x.astype(float_dtype())
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise ValueError(f"{what} has {bad} non-finite pixel values (NaN or inf)")
    return x


def _labels(y, n: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{what} must have shape [{n}] to match the images, got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{what} must be integers, got non-integer values such as {y[y != np.round(y)][:3]}")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"{what} has negative label {int(y.min())}")
    return y


def from_arrays(
    x_train, y_train, x_test=None, y_test=None, *, num_classes: int | None = None, name: str = "arrays"
) -> ImageData:
    """Validate and normalise NumPy arrays (`uint8` or float pixels, `[n, h, w]` or `[n, h, w, c]`).

    `num_classes` defaults to the largest training label + 1.
    """
    x_train = _images(x_train, "training images")
    y_train = _labels(y_train, len(x_train), "training labels")
    if (x_test is None) != (y_test is None):
        raise ValueError("give both x_test and y_test, or neither")
    if x_test is not None:
        x_test = _images(x_test, "test images")
        y_test = _labels(y_test, len(x_test), "test labels")
        if x_test.shape[1:] != x_train.shape[1:]:
            raise ValueError(f"test images have shape {x_test.shape[1:]}, training images {x_train.shape[1:]}")
    if len(np.unique(y_train)) < 2:
        raise ValueError(f"training labels hold a single class ({int(y_train[0])}); a classifier needs two or more")
    if num_classes is None:
        num_classes = int(y_train.max()) + 1
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes (={num_classes!r}) must be an integer >= 2")
    for y, what in ((y_train, "training labels"), (y_test, "test labels")):
        if y is not None and y.max() >= num_classes:
            raise ValueError(f"{what} hold {int(y.max())}, outside [0, {num_classes})")
    mean = x_train.mean(axis=(0, 1, 2))
    std = x_train.std(axis=(0, 1, 2))
    if np.any(std == 0):
        raise ValueError(f"training images are constant in channel(s) {np.flatnonzero(std == 0).tolist()}")

    def norm(x: np.ndarray) -> np.ndarray:
        return ((x - mean) / std).astype(float_dtype())

    pixel_norm = PixelNorm(tuple(float(m) for m in mean), tuple(float(s) for s in std))

    return ImageData(
        norm(x_train),
        y_train.astype(np.int32),
        None if x_test is None else norm(x_test),
        None if y_test is None else y_test.astype(np.int32),
        num_classes,
        name,
        pixel_norm,
    )


def digits() -> ImageData:
    """The 8x8 handwritten digits that scikit-learn ships as `load_digits` (1,797 images, 10
    classes; the UCI optdigits test set, CC BY 4.0), in a copy inside this package: no download and
    no scikit-learn. Pixels 0..16 scaled to [0, 1], in scikit-learn's order; the last 297 images
    form the test split. Its `pixel_norm` takes pixels in those [0, 1] units (scikit-learn's
    `load_digits().images / 16`)."""
    with np.load(_DIGITS_FILE) as f:
        x = f["images"].astype(float_dtype()) / 16.0
        y = f["labels"].astype(np.int64)
    return from_arrays(x[:1500], y[:1500], x[1500:], y[1500:], num_classes=10, name="digits")


def _column(ds, preferred, feature_type):
    for column, feature in ds.features.items():
        if isinstance(feature, feature_type):
            return column
    for column in preferred:
        if column in ds.column_names:
            return column
    return None


def _hf_split(ds, image_column, label_column, what):
    import datasets
    from PIL import Image

    image_column = image_column or _column(ds, _IMAGE_COLUMNS, datasets.Image)
    label_column = label_column or _column(ds, _LABEL_COLUMNS, datasets.ClassLabel)
    for role, column in (("image", image_column), ("label", label_column)):
        if column is None or column not in ds.column_names:
            raise ValueError(f"{what}: no {role} column found among {ds.column_names}; name it explicitly")
    images = []
    for item in ds[image_column]:
        if isinstance(item, Image.Image):
            item = item.convert("RGB") if item.mode not in ("L", "RGB") else item
        images.append(np.asarray(item))
    shapes = sorted({im.shape for im in images})
    if len(shapes) > 1:
        raise ValueError(f"{what}: images differ in shape ({shapes[:3]}...); resize them first")
    feature = ds.features[label_column]
    num_classes = (
        # A dataclass InitVar in `datasets`' annotations, but `__post_init__` sets it as an attribute.
        feature.num_classes  # pyright: ignore[reportAttributeAccessIssue]
        if isinstance(feature, datasets.ClassLabel)
        else None
    )
    x = np.stack(images) if images else np.zeros((0,))
    return x, np.asarray(ds[label_column]), num_classes


def from_hf(ds, *, image_column: str | None = None, label_column: str | None = None, name: str = "hf") -> ImageData:
    """A `datasets.Dataset` (train only) or `DatasetDict` (`train`, optional `test`) with an image
    column (an `Image` feature or one named img/image/pixel_values) and a label column (a
    `ClassLabel` or one named label/labels/fine_label)."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"dataset dict has splits {list(ds)}, but no 'train'")
        train, test = ds["train"], ds.get("test")
    elif isinstance(ds, datasets.Dataset):
        train, test = ds, None
    else:
        raise ValueError(f"expected a datasets.Dataset or DatasetDict, got {type(ds).__name__}")
    x, y, num_classes = _hf_split(train, image_column, label_column, f"{name} train split")
    xt = yt = None
    if test is not None:
        xt, yt, _ = _hf_split(test, image_column, label_column, f"{name} test split")
    return from_arrays(x, y, xt, yt, num_classes=num_classes, name=name)


def _from_npz(path: str) -> ImageData:
    # Our own file handle: np.load leaks its handle when the file is not a zip archive.
    with open(path, "rb") as handle:
        try:
            f = np.load(handle, allow_pickle=False)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: a single .npy array, not an .npz archive of x_train and y_train")
        with f:
            for key in ("x_train", "y_train"):
                if key not in f:
                    raise ValueError(f"{path}: .npz must hold x_train and y_train (has {sorted(f.files)})")
            try:
                arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test") if k in f}
            except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:  # e.g. object arrays (need pickle)
                raise ValueError(f"{path}: cannot read its arrays ({type(e).__name__}: {e})") from None
    test = (arrays["x_test"], arrays["y_test"]) if "x_test" in arrays and "y_test" in arrays else (None, None)
    return from_arrays(arrays["x_train"], arrays["y_train"], *test, name=os.path.basename(path))


def load(source=None, **kwargs) -> ImageData:
    """Turn `source` into `ImageData`:

    - `None` or `"digits"`: the embedded scikit-learn digits;
    - an `ImageData`: returned as is;
    - a `datasets.Dataset` / `DatasetDict`;
    - a tuple `(x_train, y_train[, x_test, y_test])` of arrays;
    - a path: an `.npz` with x_train/y_train[/x_test/y_test], a `save_to_disk` folder, or an
      image folder (one subfolder per class);
    - any other string: a Hugging Face hub name for `datasets.load_dataset` (e.g. `cifar10`).

    Keyword arguments go to `from_hf` or `from_arrays`.
    """
    import datasets

    if source is None or (isinstance(source, str) and source == "digits"):
        return digits()
    if isinstance(source, ImageData):
        return source
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return from_hf(source, **kwargs)
    if isinstance(source, tuple):
        if len(source) not in (2, 4):
            raise ValueError(f"an array tuple must be (x, y) or (x, y, x_test, y_test), got {len(source)} items")
        return from_arrays(*source, **kwargs)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isfile(path):
            if not path.endswith(".npz"):
                raise ValueError(f"data file {path!r}: only .npz files are read")
            return _from_npz(path)
        if os.path.isdir(path):
            saved = any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))
            if saved:
                ds = datasets.load_from_disk(path)
            else:
                ds = datasets.load_dataset("imagefolder", data_dir=path)
            return from_hf(ds, name=os.path.basename(os.path.normpath(path)), **kwargs)
        if os.sep in path or path.endswith(".npz"):
            raise ValueError(f"data path {path!r} does not exist")
        try:
            ds = datasets.load_dataset(path)
        except Exception as e:  # the hub's errors vary: name the data set and the cause
            raise ValueError(f"could not load data set {path!r} with datasets.load_dataset: {e}") from None
        return from_hf(ds, name=path, **kwargs)
    raise ValueError(f"cannot read data from a {type(source).__name__}")
