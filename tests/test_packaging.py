"""What a plain install relies on: the embedded digits without scikit-learn, and a search path that
needs no C++ compiler."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import darts_eqx as dx
from darts_eqx import _data


def test_embedded_digits_are_scikit_learns():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    bunch = sklearn_datasets.load_digits()
    with np.load(_data._DIGITS_FILE) as f:
        images, labels = f["images"], f["labels"]
    assert images.dtype == np.uint8 and labels.dtype == np.uint8
    np.testing.assert_array_equal(images.astype(bunch.images.dtype), bunch.images)
    np.testing.assert_array_equal(labels.astype(bunch.target.dtype), bunch.target)
    # The loader's outputs are those of scikit-learn's arrays put through the same steps.
    x, y = bunch.images.astype(np.float32) / 16.0, bunch.target
    want = dx.data.from_arrays(x[:1500], y[:1500], x[1500:], y[1500:], num_classes=10, name="digits")
    got = dx.data.digits()
    for field in ("x_train", "y_train", "x_test", "y_test"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert (got.num_classes, got.name) == (want.num_classes, want.name)


def test_digits_load_without_scikit_learn():
    # A plain install has no scikit-learn: hide it and load the digits.
    script = textwrap.dedent(
        """
        import sys
        sys.modules["sklearn"] = None  # any import of it fails
        import darts_eqx as dx
        d = dx.data.load("digits")
        print(d.x_train.shape, d.x_test.shape, d.num_classes)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1500, 8, 8, 1) (297, 8, 8, 1) 10"


def test_no_compiler_runs_on_xla_after_one_warning(tmp_path):
    # CXX=false: a compiler that fails; an empty kernel cache, so the build is attempted. A
    # separable convolution through the kernel's path must fall back to XLA's convolutions, give
    # the composed formulation's result, and say so in one warning line.
    script = textwrap.dedent(
        """
        import jax, numpy as np
        from darts_eqx._conv import separable_conv2d, uses_depthwise_kernel, without_depthwise_kernel

        key_x, key_d, key_p = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(key_x, (2, 8, 8, 3))
        depthwise, pointwise = jax.random.normal(key_d, (3, 3, 3)), jax.random.normal(key_p, (3, 4))
        conv = jax.jit(lambda x, d, p: separable_conv2d(x, d, p, 1, 1, 1))
        y = conv(x, depthwise, pointwise)
        y2 = conv(x + 1, depthwise, pointwise)  # a second trace: no second warning
        assert not uses_depthwise_kernel(x)
        with without_depthwise_kernel():
            want = separable_conv2d(x, depthwise, pointwise, 1, 1, 1)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        print("ok", y.shape, y2.shape)
        """
    )
    env = dict(
        os.environ,
        CXX="false",
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        DARTS_EQX_DEPTHWISE="auto",
        DARTS_EQX_CONV="canonical",
        JAX_PLATFORMS="cpu",
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "ok"
    warnings = [line for line in done.stderr.splitlines() if "depthwise kernel could not be built" in line]
    assert len(warnings) == 1, done.stderr
    assert "composed kernels instead" in warnings[0] and "false" in warnings[0]
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1, done.stderr
    assert not [f for f in (tmp_path / "cache").rglob("*") if f.is_file()]  # no half-built library left
