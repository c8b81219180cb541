"""Bad input, answered clearly: property-based tests (hypothesis) feed the data layer and the CLI
malformed inputs; each must end in a one-line error naming the problem (exit status 2 from the CLI,
no traceback), before anything is compiled."""

import contextlib
import io
import json
import os
import pathlib
import tempfile

import jax
import numpy as np
import pytest
from helpers import tiny_arrays
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import darts_eqx as dx
from darts_eqx._cli import main

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def valid(n, size, channels, classes, rng):
    x = rng.uniform(0, 255, (n, size, size, channels)).astype(np.float32)
    y = np.arange(n) % classes
    return x, y


@st.composite
def malformed_data(draw):
    """`(x, y, num_classes, expected message)` for one kind of malformation, at random sizes."""
    n = draw(st.integers(4, 40))
    size = draw(st.integers(1, 9))
    channels = draw(st.sampled_from([1, 3]))
    classes = draw(st.integers(2, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x, y = valid(n, size, channels, classes, rng)
    kind = draw(
        st.sampled_from(
            ["rank", "channels", "dtype", "nan", "negative", "too_large", "empty", "single", "length", "fraction"]
        )
    )
    num_classes = None
    if kind == "rank":
        rank = draw(st.sampled_from([1, 2, 5]))
        x = x.reshape((n, -1)) if rank == 2 else x.reshape(-1) if rank == 1 else x[..., None]
        expect = r"training images must have shape \[n, height, width\]"
    elif kind == "channels":
        c = draw(st.sampled_from([2, 4, 5]))
        x = np.repeat(x[..., :1], c, axis=-1)
        expect = rf"training images must have 1 or 3 channels last \(NHWC\), got shape .*\({c} channels\)"
    elif kind == "dtype":
        dtype = draw(st.sampled_from(["bool", "complex64", "str", "object"]))
        x = x.astype(dtype) if dtype != "object" else x.astype(object)
        expect = r"training images must be integer or float pixels, got dtype"
    elif kind == "nan":
        count = draw(st.integers(1, 3))
        flat = x.reshape(-1)
        flat[rng.choice(flat.size, size=min(count, flat.size), replace=False)] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf])
        )
        expect = r"training images has \d+ non-finite pixel values"
    elif kind == "negative":
        y = y.copy()
        y[draw(st.integers(0, n - 1))] = -draw(st.integers(1, 5))
        expect = r"training labels has negative label -\d+"
    elif kind == "too_large":
        num_classes = classes
        y = y.copy()
        y[draw(st.integers(0, n - 1))] = classes + draw(st.integers(0, 5))
        expect = rf"training labels hold \d+, outside \[0, {classes}\)"
    elif kind == "empty":
        x, y = x[:0], y[:0]
        expect = r"training images is empty"
    elif kind == "single":
        y = np.full(n, draw(st.integers(0, 3)))
        expect = r"training labels hold a single class"
    elif kind == "length":
        y = y[: draw(st.integers(0, n - 1))]
        expect = rf"training labels must have shape \[{n}\] to match the images"
    else:
        y = y.astype(np.float64) + 0.5
        expect = r"training labels must be integers"
    return x, y, num_classes, expect


@FAST
@given(malformed_data())
def test_malformed_data_is_a_one_line_error_naming_it(case):
    x, y, num_classes, expect = case
    with pytest.raises(ValueError, match=expect) as e:
        dx.data.from_arrays(x, y, num_classes=num_classes)
    assert "\n" not in str(e.value)


@FAST
@given(st.integers(8, 64), st.integers(1, 300))
def test_batch_larger_than_the_split_fails_before_compiling(n, batch):
    x, y = tiny_arrays(n=n)
    n_train = round(n * 0.5)
    if min(n_train, n - n_train) >= batch:
        return  # a valid batch size: nothing to check here without running a search
    with pytest.raises(ValueError, match=rf"batch_size \(={batch}\) is larger than the search split: {n} training"):
        dx.search(jax.random.key(0), (x, y), space="seed", channels=4, layers=1, epochs=1, batch_size=batch)


def run_cli(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def assert_one_line_error(code, err, pattern):
    import re

    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("darts-eqx: error: "), err
    assert "Traceback" not in err and re.search(pattern, lines[-1]), err


@FAST
@given(malformed_data())
def test_cli_rejects_malformed_npz_data(case):
    x, y, num_classes, expect = case
    assume(num_classes is None)  # an .npz carries no class count: a larger label is just another class
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npz")
        try:
            np.savez(path, x_train=x, y_train=y)
        except ValueError:
            return  # NumPy cannot store object arrays without pickle; nothing reaches us
        code, err = run_cli(["search", "--dataset", path, "--out", os.path.join(tmp, "run")])
    if "dtype" in expect and x.dtype == object:
        expect = r"data\.npz: cannot read its arrays \(ValueError: Object arrays cannot be loaded"
    assert_one_line_error(code, err, expect)


BAD_ARGUMENTS = [
    (["--space", "transformers"], r"unknown search space 'transformers'; known: \('darts', 'seed', 'nb201'"),
    (["--epochs", "x"], r"argument --epochs: invalid int value: 'x'"),
    (["--epochs", "0"], r"`epochs` \(=0\) must be a positive integer"),
    (["--channels", "-3"], r"`channels` \(=-3\) must be a positive integer"),
    (["--batch-size", "100000"], r"batch_size \(=100000\) is larger than the search split"),
    (["--partial-channels", "3"], r"`partial_channels` \(=3\) must be a positive divisor of `channels` \(=8\)"),
    (["--checkpoint-every", "0"], r"checkpoint_every \(=0\) must be a positive integer"),
    (["--dataset", "missing/data.npz"], r"data path 'missing/data.npz' does not exist"),
    (["--allow-change", "channels"], r"argument --allow-change: invalid choice: 'channels'"),
    (["--resume"], r"--resume needs --out DIR"),
    (["--compile-cache", os.path.abspath(__file__)], r"--compile-cache '.*test_bad_input\.py' is not a directory"),
    (["--colour", "red"], r"unrecognized arguments: --colour red"),
    (["--devices", "3"], r"devices \(=3\) must lie in \[1, 1\]: this run sees 1 cpu device\(s\)"),
    (["--coordinator", "localhost:1"], r"--coordinator, --num-processes and --process-id go together"),
    (
        ["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
        r"coordinator \(='localhost'\) must be HOST:PORT",
    ),
    (
        ["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
        r"process_id \(=2\) must lie in \[0, num_processes=2\)",
    ),
]


@pytest.mark.parametrize("args,pattern", BAD_ARGUMENTS)
def test_cli_bad_arguments_are_one_line_exit_2(args, pattern):
    with tempfile.TemporaryDirectory() as tmp:
        out = [] if "--resume" in args else ["--out", os.path.join(tmp, "run")]
        code, err = run_cli(["search", *args, *out])
    assert_one_line_error(code, err, pattern)


def test_cli_data_file_of_another_kind(tmp_path):
    (tmp_path / "data.csv").write_text("1,2,3\n")
    assert_one_line_error(*run_cli(["search", "--dataset", str(tmp_path / "data.csv")]), r"only \.npz files are read")
    np.savez(tmp_path / "keys.npz", images=np.zeros((4, 8, 8)), labels=np.zeros(4))
    assert_one_line_error(
        *run_cli(["search", "--dataset", str(tmp_path / "keys.npz"), "--out", str(tmp_path / "r")]),
        r"\.npz must hold x_train and y_train \(has \['images', 'labels'\]\)",
    )
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not a zip")
    code, err = run_cli(["search", "--dataset", str(tmp_path / "broken.npz"), "--out", str(tmp_path / "r2")])
    assert_one_line_error(code, err, r"broken\.npz: not a readable \.npz file \(BadZipFile")


def test_cli_bad_config_json_on_resume(tmp_path):
    (tmp_path / "config.json").write_text("{truncated")
    assert_one_line_error(*run_cli(["search", "--out", str(tmp_path), "--resume"]), r"config\.json is not valid JSON")
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    assert_one_line_error(
        *run_cli(["search", "--out", str(tmp_path), "--resume"]), r"config\.json holds a list, not the run's options"
    )
    (tmp_path / "config.json").write_text(json.dumps({"dataset": "digits", "seed": 0, "colour": "red"}))
    assert_one_line_error(
        *run_cli(["search", "--out", str(tmp_path), "--resume"]), r"unknown search option\(s\) \['colour'\]"
    )


@FAST
@given(
    st.sampled_from(["arrays.eqx", "manifest.json"]),
    st.sampled_from(["truncate", "flip", "empty", "delete"]),
    st.floats(0.0, 1.0),
    st.integers(1, 255),
)
def test_any_damage_to_a_checkpoint_is_detected_and_the_previous_one_used(name, damage, where, xor):
    from darts_eqx import _checkpoint

    tree = {"w": np.arange(20, dtype=np.float32), "step": np.int32(3)}
    with tempfile.TemporaryDirectory() as tmp:
        _checkpoint.save(tmp, 1, tree, {"epoch": 0, "history": [{"loss": 0.5}]})
        _checkpoint.save(tmp, 2, tree, {"epoch": 1, "history": [{"loss": 0.25}]})
        target = pathlib.Path(tmp, "step-000000002", name)
        data = bytearray(target.read_bytes())
        at = min(int(where * len(data)), len(data) - 1)
        if damage == "truncate":
            data = data[:at]
        elif damage == "flip":
            data[at] ^= xor
        elif damage == "empty":
            data = bytearray()
        if damage == "delete":
            os.remove(target)
        else:
            target.write_bytes(bytes(data))
        with pytest.warns(dx.CheckpointWarning, match=r"skipping checkpoint .*step-000000002"):
            path, manifest = _checkpoint.latest(tmp)
        assert path.endswith("step-000000001") and manifest["history"] == [{"loss": 0.5}]
