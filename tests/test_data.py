"""The data layer: every accepted source, and bad input answered with an error naming it."""

import numpy as np
import pytest
from helpers import tiny_arrays
from PIL import Image

import darts_eqx as dx


def test_embedded_digits():
    d = dx.data.load()
    assert d.name == "digits" and d.x_train.shape == (1500, 8, 8, 1) and d.x_test.shape == (297, 8, 8, 1)
    assert d.num_classes == 10 and d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    np.testing.assert_allclose(d.x_train.mean(), 0.0, atol=1e-4)
    np.testing.assert_allclose(d.x_train.std(), 1.0, atol=1e-3)


def test_arrays_uint8_and_grayscale_rank3():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 4, 4), dtype=np.uint8)
    d = dx.data.load((x, np.arange(20) % 4))
    assert d.x_train.shape == (20, 4, 4, 1) and d.num_classes == 4
    # new images of any integer or float dtype are normalised as the data set's were
    np.testing.assert_allclose(d.pixel_norm(x), d.x_train, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d.pixel_norm(x.astype(np.int64)[..., None]), d.x_train, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d.pixel_norm(x.astype(np.float16)), d.x_train, rtol=1e-6, atol=1e-6)
    mean, std = x.mean(), x.std()
    np.testing.assert_allclose(d.pixel_norm(x[:1])[0, 0, 0, 0], (x[0, 0, 0] - mean) / std, rtol=1e-5)
    with pytest.raises(ValueError, match="integer or float pixels, got dtype bool"):
        d.pixel_norm(x > 3)
    with pytest.raises(ValueError, match=r"shape \[n, height, width, 1\]"):
        d.pixel_norm(np.zeros((2, 4, 4, 3)))


def _hf_dataset(n=12, size=8, mode="RGB"):
    import datasets

    rng = np.random.default_rng(0)
    channels = 3 if mode == "RGB" else 1
    images = [
        Image.fromarray(rng.integers(0, 256, (size, size, channels)[: 2 if mode == "L" else 3], dtype=np.uint8), mode)
        for _ in range(n)
    ]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    return datasets.Dataset.from_dict({"img": images, "label": [i % 3 for i in range(n)]}, features=features)


def test_hf_dataset_in_memory_and_dict():
    import datasets

    d = dx.data.load(_hf_dataset())
    assert d.x_train.shape == (12, 8, 8, 3) and d.num_classes == 3 and d.x_test is None
    dd = datasets.DatasetDict({"train": _hf_dataset(), "test": _hf_dataset(6)})
    d = dx.data.load(dd)
    assert d.x_test.shape == (6, 8, 8, 3)
    with pytest.raises(ValueError, match=r"no 'train'"):
        dx.data.load(datasets.DatasetDict({"validation": _hf_dataset()}))


def test_hf_save_to_disk_folder(tmp_path):
    _hf_dataset(mode="L").save_to_disk(str(tmp_path / "saved"))
    d = dx.data.load(str(tmp_path / "saved"))
    assert d.x_train.shape == (12, 8, 8, 1)


def test_image_folder_of_pngs(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                tmp_path / "train" / label / f"{i}.png"
            )
    d = dx.data.load(str(tmp_path))
    assert d.x_train.shape == (8, 8, 8, 3) and d.num_classes == 2 and sorted(set(d.y_train)) == [0, 1]


def test_npz_path(tmp_path):
    x, y = tiny_arrays()
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    d = dx.data.load(str(tmp_path / "d.npz"))
    assert d.x_train.shape == x.shape and d.x_test.shape == (10, 8, 8, 1)
    np.savez(tmp_path / "bad.npz", images=x)
    with pytest.raises(ValueError, match="must hold x_train and y_train"):
        dx.data.load(str(tmp_path / "bad.npz"))


X, Y = tiny_arrays(n=12)


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((X[:, :, :, 0, None, None], Y), {}, r"got shape \(12, 8, 8, 1, 1\)"),
        ((np.repeat(X, 2, axis=3), Y), {}, "1 or 3 channels"),
        ((X.astype(object), Y), {}, "dtype object"),
        ((np.where(X > 2, np.nan, X), Y), {}, "non-finite pixel"),
        ((X, -Y - 1), {}, "negative label -3"),
        ((X, Y), {"num_classes": 2}, r"hold 2, outside \[0, 2\)"),
        ((X[:0], Y[:0]), {}, "training images is empty"),
        ((X, np.zeros_like(Y)), {}, "single class"),
        ((X, Y[:5]), {}, r"shape \[12\]"),
        ((X, Y + 0.5), {}, "must be integers"),
        ((X, Y, X[:, :4], Y), {}, "test images have shape"),
        ((np.ones_like(X), Y), {}, "constant in channel"),
    ],
)
def test_bad_arrays_are_clear_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        dx.data.from_arrays(*args, **kwargs)


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        dx.data.load(str(tmp_path / "missing.npz"))
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match="only .npz"):
        dx.data.load(str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="cannot read data from a int"):
        dx.data.load(3)
