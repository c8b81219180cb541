"""Checkpoints and resume: atomic writes, bit-exact resume mid-epoch, fallback from a damaged
checkpoint, clear errors for a checkpoint of another search, and the NaN guard keeping the last
good checkpoint."""

import hashlib
import json
import os
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_arrays

import darts_eqx as dx
from darts_eqx import _checkpoint, _step
from darts_eqx._fused import per_source_view
from darts_eqx._optim import arch_optimizer, weight_optimizer
from darts_eqx._state import initial_state, saved as saved_state
from darts_eqx._supernet import build_supernet

# 64 images per half / batch 16 = 4 steps per epoch; checkpoint_every=2 gives chunks of 2 steps, so
# checkpoints fall mid-epoch (steps 2, 6, 10) and at epoch ends (4, 8, 12).
DATA = dx.data.from_arrays(*tiny_arrays(n=128))
OPTIONS = dict(space="seed", channels=4, layers=1, epochs=3, batch_size=16, progress=False)
KEY = 7


def assert_same_search(a, b):
    assert a.history == b.history
    assert a.genotype == b.genotype
    la, ta = jax.tree.flatten(eqx.filter(a.supernet, eqx.is_array))
    lb, tb = jax.tree.flatten(eqx.filter(b.supernet, eqx.is_array))
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.array_equal(np.asarray(x), np.asarray(y))  # bit for bit, not close


@pytest.fixture(scope="module")
def plain():
    return dx.search(jax.random.key(KEY), DATA, **OPTIONS)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("run") / "checkpoints"
    result = dx.search(jax.random.key(KEY), DATA, checkpoint_dir=directory, checkpoint_every=2, **OPTIONS)
    return result, directory


@pytest.fixture
def run_dir(checkpointed, tmp_path):
    """A private copy of the finished run's checkpoints."""
    shutil.copytree(checkpointed[1], tmp_path / "checkpoints")
    return tmp_path / "checkpoints"


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_checkpointing_does_not_change_the_search(plain, checkpointed):
    result, directory = checkpointed
    assert_same_search(plain, result)
    kept = _checkpoint.list_checkpoints(directory)
    assert [step for step, _ in kept] == [12, 10]  # the two newest
    mid = manifest(directory / "step-000000010")
    assert (mid["epoch"], mid["epoch_step"], len(mid["history"])) == (2, 2, 2)
    assert len(mid["epoch_metrics"][0]) == 2 and mid["config"]["channels"] == 4


def test_resume_mid_epoch_is_bit_exact(plain, run_dir):
    shutil.rmtree(run_dir / "step-000000012")  # as if killed during step 11 or 12
    resumed = dx.search(jax.random.key(KEY), DATA, checkpoint_dir=run_dir, checkpoint_every=2, resume=True, **OPTIONS)
    assert_same_search(plain, resumed)
    assert len(resumed.epoch_seconds) == 1  # only the last epoch ran


def test_resume_with_other_chunking_is_bit_exact(plain, run_dir):
    shutil.rmtree(run_dir / "step-000000012")  # step 10: 2 steps into epoch 3; chunks of 4 would skip it
    resumed = dx.search(jax.random.key(KEY), DATA, checkpoint_dir=run_dir, checkpoint_every=4, resume=True, **OPTIONS)
    assert_same_search(plain, resumed)


def test_a_checkpoint_recording_how_it_ran_resumes(plain, run_dir):
    # Checkpoints written when the config held execution options (chunk length, trace form) record
    # them in their config: how a search ran is not what it is, so they resume all the same.
    shutil.rmtree(run_dir / "step-000000012")
    path = run_dir / "step-000000010" / "manifest.json"
    saved = manifest(path.parent)
    saved["config"].update(shared_trace=True, steps_per_chunk=3)
    saved["manifest_sha256"] = _checkpoint._manifest_digest(saved)
    path.write_text(json.dumps(saved))
    resumed = dx.search(jax.random.key(KEY), DATA, checkpoint_dir=run_dir, checkpoint_every=2, resume=True, **OPTIONS)
    assert_same_search(plain, resumed)


def test_a_checkpoint_from_before_the_config_named_its_method_resumes(plain, run_dir):
    # Older checkpoints have neither `method` nor `select` in their config; selection never
    # changes the search's steps, so it is not compared either.
    shutil.rmtree(run_dir / "step-000000012")
    path = run_dir / "step-000000010" / "manifest.json"
    saved = manifest(path.parent)
    del saved["config"]["method"], saved["config"]["select"]
    saved["manifest_sha256"] = _checkpoint._manifest_digest(saved)
    path.write_text(json.dumps(saved))
    resumed = dx.search(jax.random.key(KEY), DATA, checkpoint_dir=run_dir, checkpoint_every=2, resume=True, **OPTIONS)
    assert_same_search(plain, resumed)


def test_a_checkpoint_from_before_searches_augmented_does_not_resume_as_an_augmented_search(plain, run_dir):
    # Without `augment` in its config a checkpoint was written by a search that did not augment.
    path = run_dir / "step-000000010" / "manifest.json"
    saved = manifest(path.parent)
    del saved["config"]["augment"]
    saved["manifest_sha256"] = _checkpoint._manifest_digest(saved)
    path.write_text(json.dumps(saved))
    shutil.rmtree(run_dir / "step-000000012")
    with pytest.raises(dx.CheckpointError, match="augment"):
        dx.search(jax.random.key(KEY), DATA, checkpoint_dir=run_dir, checkpoint_every=2, resume=True, **OPTIONS)


def test_a_checkpoint_resumes_under_another_execution(tmp_path):
    # Written with the shared trace: resumed under the same execution it is the same search bit for
    # bit; under separate traces (another execution) it resumes too, the same search up to rounding.
    options = dict(checkpoint_dir=tmp_path / "checkpoints", checkpoint_every=2, **OPTIONS)
    shared = dx.Execution(shared_trace=True)
    full = dx.search(jax.random.key(KEY), DATA, execution=shared, **options)
    assert "shared_trace" not in manifest(tmp_path / "checkpoints" / "step-000000010")["config"]
    backup = tmp_path / "backup"
    shutil.copytree(tmp_path / "checkpoints", backup)
    shutil.rmtree(tmp_path / "checkpoints" / "step-000000012")
    resumed = dx.search(jax.random.key(KEY), DATA, resume=True, execution=shared, **options)
    assert resumed.execution.shared_trace is True
    assert_same_search(full, resumed)
    shutil.rmtree(tmp_path / "checkpoints")
    shutil.copytree(backup, tmp_path / "checkpoints")
    shutil.rmtree(tmp_path / "checkpoints" / "step-000000012")
    other = dx.search(jax.random.key(KEY), DATA, resume=True, execution=dx.Execution(shared_trace=False), **options)
    assert other.execution.shared_trace is False and len(other.history) == len(full.history)
    np.testing.assert_allclose(
        other.supernet.arch.alpha["cell"].logits, full.supernet.arch.alpha["cell"].logits, rtol=1e-4, atol=1e-6
    )
    for a, b in zip(other.history, full.history):
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-4)


def test_resuming_a_finished_search_returns_it(plain, run_dir):
    resumed = dx.search(jax.random.key(KEY), DATA, checkpoint_dir=run_dir, checkpoint_every=2, resume=True, **OPTIONS)
    assert_same_search(plain, resumed)
    assert resumed.epoch_seconds == []


def test_damaged_newest_checkpoint_falls_back_to_the_previous(plain, run_dir):
    arrays = run_dir / "step-000000012" / "arrays.eqx"
    arrays.write_bytes(arrays.read_bytes()[:100])  # truncated
    with pytest.warns(dx.CheckpointWarning, match=r"step-000000012.*truncated or corrupted"):
        resumed = dx.search(
            jax.random.key(KEY), DATA, checkpoint_dir=run_dir, checkpoint_every=2, resume=True, **OPTIONS
        )
    assert_same_search(plain, resumed)
    assert [step for step, _ in _checkpoint.list_checkpoints(run_dir)] == [12, 10]  # rewritten, intact
    assert _checkpoint.latest(str(run_dir))[0].endswith("step-000000012")


def test_no_loadable_checkpoint_is_an_error_naming_each(run_dir):
    (run_dir / "step-000000012" / "manifest.json").write_text("{not json")
    (run_dir / "step-000000010" / "arrays.eqx").write_bytes(b"")
    with pytest.warns(dx.CheckpointWarning), pytest.raises(dx.CheckpointError) as e:
        dx.search(jax.random.key(KEY), DATA, checkpoint_dir=run_dir, checkpoint_every=2, resume=True, **OPTIONS)
    message = str(e.value)
    assert "no loadable checkpoint" in message and "unreadable manifest" in message and "checksum" in message


@pytest.mark.parametrize(
    "key,data,changes,message",
    [
        (KEY, DATA, dict(channels=8), r"config differs in channels \(checkpoint 4, now 8\)$"),
        (KEY, DATA, dict(space="darts", layers=2), r"layers \(checkpoint 1, now 2\), space \(checkpoint 'seed'"),
        (KEY, DATA, dict(epochs=5), r"epochs \(checkpoint 3, now 5\); to change \['epochs'\] on purpose, allow"),
        (KEY, dx.data.from_arrays(*tiny_arrays(n=128, seed=1)), {}, r"the data set differs"),
        (KEY + 1, DATA, {}, r"the key \(seed\) differs"),
    ],
)
def test_resume_of_another_search_names_the_difference(run_dir, key, data, changes, message):
    with pytest.raises(dx.CheckpointError, match=message):
        dx.search(
            jax.random.key(key),
            data,
            checkpoint_dir=run_dir,
            checkpoint_every=2,
            resume=True,
            **{**OPTIONS, **changes},
        )


def test_more_epochs_when_allowed_continue_the_search(plain, run_dir):
    longer = dx.search(
        jax.random.key(KEY),
        DATA,
        checkpoint_dir=run_dir,
        checkpoint_every=2,
        resume=True,
        allow_changes=("epochs",),
        **{**OPTIONS, "epochs": 4},
    )
    assert longer.history[:3] == plain.history and [h["epoch"] for h in longer.history] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"allow_changes \['channels'\]: only \['epochs'\]"):
        dx.search(jax.random.key(KEY), DATA, checkpoint_dir=run_dir, resume=True, allow_changes=["channels"], **OPTIONS)


def test_a_new_search_refuses_a_directory_with_checkpoints(run_dir):
    with pytest.raises(ValueError, match="holds checkpoints of a search: continue it with resume=True"):
        dx.search(jax.random.key(KEY), DATA, checkpoint_dir=run_dir, **OPTIONS)


def test_resume_without_checkpoints_starts_fresh(plain, tmp_path):
    with pytest.warns(dx.CheckpointWarning, match="no checkpoint"):
        result = dx.search(jax.random.key(KEY), DATA, checkpoint_dir=tmp_path / "new", resume=True, **OPTIONS)
    assert_same_search(plain, result)


def test_divergence_names_the_step_and_keeps_the_last_good_checkpoint(monkeypatch, tmp_path, plain):
    original = _step.search_step

    def poisoned(state, *args):  # the weights become NaN after step 5
        new, metrics = original(state, *args)
        nan = lambda w: jnp.where(new.step == 5, jnp.nan, w) if eqx.is_inexact_array(w) else w  # noqa: E731
        return eqx.tree_at(lambda s: s.weights, new, jax.tree.map(nan, new.weights)), metrics

    monkeypatch.setattr(_step, "search_step", poisoned)
    directory = tmp_path / "checkpoints"
    with pytest.raises(dx.SearchDiverged, match=r"train_loss became non-finite \(nan\) at step 6 \(epoch 2\)") as e:
        dx.search(jax.random.key(KEY), DATA, checkpoint_dir=directory, checkpoint_every=2, **OPTIONS)
    assert "step-000000004 is kept" in str(e.value)
    assert [step for step, _ in _checkpoint.list_checkpoints(directory)] == [4, 2]
    monkeypatch.setattr(_step, "search_step", original)
    resumed = dx.search(jax.random.key(KEY), DATA, checkpoint_dir=directory, checkpoint_every=2, resume=True, **OPTIONS)
    assert_same_search(plain, resumed)


def test_save_is_atomic_and_load_checks_shapes(tmp_path):
    tree = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2), jnp.int32)}
    _checkpoint.save(str(tmp_path), 1, tree, {"note": "x"})
    # a write killed before its rename leaves only a hidden temporary folder: never picked up
    os.makedirs(tmp_path / ".tmp-step-000000002-999")
    (tmp_path / ".tmp-step-000000002-999" / "manifest.json").write_text("{")
    path, found = _checkpoint.latest(str(tmp_path))
    assert path.endswith("step-000000001") and found["note"] == "x" and found["step"] == 1
    loaded = _checkpoint.load_arrays(path, tree)
    assert np.array_equal(loaded["a"], tree["a"]) and loaded["b"].dtype == jnp.int32
    with pytest.raises(dx.CheckpointError, match=r"array \['a'\] is float32\[3\], this search expects float32\[4\]"):
        _checkpoint.load_arrays(path, {"a": jnp.zeros(4), "b": tree["b"]})
    for step in (2, 3, 4):
        _checkpoint.save(str(tmp_path), step, tree, {}, keep=2)
    assert [s for s, _ in _checkpoint.list_checkpoints(str(tmp_path))] == [4, 3]


def test_a_format_1_checkpoint_of_per_source_cells_resumes_bit_exact(tmp_path):
    # Before checkpoint format 2 the DARTS cells stored one `SourceOps` per source; such a
    # checkpoint is read through `per_source_view` and resumes the same search bit for bit.
    options = dict(space="darts", channels=4, layers=1, epochs=1, batch_size=16, progress=False)
    directory = tmp_path / "checkpoints"
    full = dx.search(jax.random.key(KEY), DATA, checkpoint_dir=directory, checkpoint_every=2, **options)
    shutil.rmtree(directory / "step-000000004")
    path = directory / "step-000000002"
    config = full.config
    model = build_supernet(config, DATA.image_shape, DATA.num_classes, key=jax.random.key(0))
    arch, weights, _ = dx.split_arch(model)
    w_opt, a_opt = weight_optimizer(config, 4), arch_optimizer(config)
    like = saved_state(initial_state(weights, arch, w_opt, a_opt, jax.random.key(0)))
    legacy = per_source_view(_checkpoint.load_arrays(str(path), like))
    edges = [len(jax.tree.leaves(s)[0]) for s in legacy.weights.cells[0].sources]
    assert edges == [4, 4, 3, 2, 1]  # each source's own edges, no padding
    data = _checkpoint.serialised(legacy)
    (path / "arrays.eqx").write_bytes(data)
    saved = manifest(path)
    saved.update(format=1, arrays_sha256=hashlib.sha256(data).hexdigest())
    saved["manifest_sha256"] = _checkpoint._manifest_digest(saved)
    (path / "manifest.json").write_text(json.dumps(saved))
    resumed = dx.search(jax.random.key(KEY), DATA, checkpoint_dir=directory, checkpoint_every=2, resume=True, **options)
    assert_same_search(full, resumed)
