"""What a run reports as it goes: metrics.jsonl (one record per chunk, resumed without duplicates),
TensorBoard event files read back with TensorBoard's own reader, the per-record callback, and the
plain progress lines that replace the bar when stderr is not a terminal."""

import contextlib
import importlib.util
import io
import math
import re
import shutil

import jax
import numpy as np
import pytest
from helpers import tiny_arrays

import darts_eqx as dx
from darts_eqx._cli import main
from darts_eqx._metrics import MetricsLog, ProgressReport, alpha_entropies

# 128 training images: 64 per half / batch 16 = 4 search steps per epoch, checkpointed every 2
# steps, so chunks of 2 steps and checkpoints at steps 2, 4 (epoch end), 6, 8 (epoch end). The
# test split only serves training.
X, Y = tiny_arrays(n=160)
DATA = dx.data.from_arrays(X[:128], Y[:128], X[128:], Y[128:])
SEARCH = dict(space="seed", channels=4, layers=1, epochs=2, batch_size=16, hessian=True, checkpoint_every=2)
SEARCH_FIELDS = {"train_loss", "train_acc", "val_loss", "val_acc", "w_grad_norm", "a_grad_norm", "w_lr", "a_lr"}
# With the `tensorboard` extra (CI installs it) the runs also write TensorBoard files.
TENSORBOARD = importlib.util.find_spec("tensorboardX") is not None
PLAIN_LINE = r"epoch {}/2: train_loss \d+\.\d{{4}}, train_acc \d\.\d{{4}}, {}, \d+\.\d s"


def search(run, *, resume=False, **options):
    return dx.search(
        jax.random.key(3),
        DATA,
        checkpoint_dir=run / "checkpoints",
        metrics_dir=run,
        tensorboard=TENSORBOARD,
        resume=resume,
        **SEARCH,
        **options,
    )


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A search writing metrics and TensorBoard files, with its callback's records and its stderr
    (a StringIO: not a terminal)."""
    run, seen, err = tmp_path_factory.mktemp("search"), [], io.StringIO()
    with contextlib.redirect_stderr(err):
        result = search(run, on_metrics=seen.append, progress=None)
    return result, run, seen, err.getvalue()


def test_one_record_per_chunk_matching_the_history(searched):
    result, run, seen, _ = searched
    records = dx.read_metrics(run)
    assert records == seen == dx.read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6, 8]  # every chunk once, in order
    assert [r["epoch"] for r in records] == [1, 1, 2, 2]
    for epoch, history in enumerate(result.history, start=1):
        chunks = [r for r in records if r["epoch"] == epoch]
        assert all(SEARCH_FIELDS <= set(r) and all(math.isfinite(r[k]) for k in SEARCH_FIELDS) for r in chunks)
        for name in ("train_loss", "train_acc", "val_loss", "val_acc", "w_grad_norm", "a_grad_norm"):
            # equal chunks: the mean of their means is the epoch's mean
            assert np.mean([r[name] for r in chunks]) == pytest.approx(history[name], rel=1e-6)
        assert all(r["w_lr"] == history["lr"] and r["a_lr"] == result.config.a_lr for r in chunks)
        # the Hessian eigenvalue, computed at the epoch's end, is in the epoch's last record only
        assert "hessian_eigenvalue" not in chunks[0]
        assert chunks[-1]["hessian_eigenvalue"] == history["hessian_eigenvalue"]


def test_entropy_of_softmax_alpha(searched):
    result, run, _, _ = searched
    records = dx.read_metrics(run)
    ops = len(dx.get_space("seed").op_names)
    assert all(0.0 <= r["entropy"] <= math.log(ops) for r in records)
    assert records[0]["entropy"] == pytest.approx(math.log(ops), abs=1e-3)  # alpha starts near zero
    p = np.asarray(jax.nn.softmax(result.supernet.arch.alpha["cell"].logits, axis=-1), np.float64)
    assert records[-1]["entropy"] == pytest.approx(float(np.mean(-(p * np.log(p)).sum(-1))), rel=1e-5)
    assert alpha_entropies({"alpha_normal": np.eye(3), "alpha_reduce": np.full((2, 4), 0.25)}) == pytest.approx(
        {"entropy_normal": 0.0, "entropy_reduce": math.log(4)}
    )


def test_plain_progress_lines_when_stderr_is_no_terminal(searched):
    lines = searched[3].splitlines()
    for epoch in (1, 2):
        pattern = PLAIN_LINE.format(epoch, r"val_loss \d+\.\d{4}, val_acc \d\.\d{4}")
        assert sum(bool(re.fullmatch(pattern, line)) for line in lines) == 1, lines
    assert "step/s" not in searched[3] and "it/s" not in searched[3]  # no bar


def test_tensorboard_reader_sees_the_records(searched):
    assert_tensorboard_matches(searched[1])


def assert_tensorboard_matches(run):
    pytest.importorskip("tensorboardX")
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    accumulator = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    records = dx.read_metrics(run)
    tags = {name for r in records for name in r} - {"step", "epoch"}
    assert set(accumulator.Tags()["scalars"]) == tags
    for tag in tags:
        want = [(r["step"], r[tag]) for r in records if tag in r]
        got = [(e.step, e.value) for e in accumulator.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6, err_msg=tag)


def test_resume_drops_records_past_the_checkpoint_and_appends(searched, tmp_path):
    _, done, _, _ = searched
    run = tmp_path / "run"
    shutil.copytree(done, run)
    shutil.rmtree(run / "checkpoints" / "step-000000008")  # killed after writing step 8's record
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "epoch"')  # and halfway through a record no checkpoint holds
    resumed = []
    search(run, resume=True, on_metrics=resumed.append, progress=False)
    assert [r["step"] for r in resumed] == [8]
    assert (run / "metrics.jsonl").read_bytes() == (done / "metrics.jsonl").read_bytes()
    assert_tensorboard_matches(run)  # step 8 of the first run's file is hidden by the resumed one


def test_training_records_and_plain_progress(searched, tmp_path, capsys):
    genotype, run, seen = searched[0].genotype, tmp_path / "train", []
    (run / "metrics.jsonl").parent.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "epoch": 1}\n')  # an older run's: replaced
    # 128 images / batch 16 = 8 steps per epoch, in chunks of 4
    options = dict(channels=4, layers=1, epochs=2, batch_size=16, execution=dx.Execution(steps_per_chunk=4))
    result = dx.train(jax.random.key(1), genotype, DATA, metrics_dir=run, on_metrics=seen.append, **options)
    records = dx.read_metrics(run)
    assert records == seen and [(r["step"], r["epoch"]) for r in records] == [(4, 1), (8, 1), (12, 2), (16, 2)]
    for epoch, history in enumerate(result.history, start=1):
        chunks = [r for r in records if r["epoch"] == epoch]
        assert all(math.isfinite(r["train_loss"]) and r["lr"] == history["lr"] for r in chunks)
        assert np.mean([r["train_loss"] for r in chunks]) == pytest.approx(history["train_loss"], rel=1e-6)
        assert np.mean([r["train_acc"] for r in chunks]) == pytest.approx(history["train_acc"], rel=1e-6)
        assert "test_acc" not in chunks[0] and chunks[-1]["test_acc"] == history["test_acc"]
    err = capsys.readouterr().err.splitlines()
    for epoch in (1, 2):
        pattern = PLAIN_LINE.format(epoch, r"test_acc \d\.\d{4}")
        assert sum(bool(re.fullmatch(pattern, line)) for line in err) == 1, err


def test_cli_search_writes_metrics_and_tensorboard(searched, tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x_train=X[:128], y_train=Y[:128])
    out = tmp_path / "run"
    args = ["--space", "seed", "--channels", "4", "--layers", "1", "--epochs", "1", "--batch-size", "16"]
    args += ["--tensorboard"] if TENSORBOARD else []
    assert main(["search", "--dataset", str(tmp_path / "d.npz"), *args, "--out", str(out)]) == 0
    records = dx.read_metrics(out)
    assert [r["step"] for r in records] == [4] and records[0]["train_loss"] > 0
    assert_tensorboard_matches(out)
    assert re.search(r"^epoch 1/1: train_loss .* s$", capsys.readouterr().err, re.MULTILINE)


def test_metrics_log_keeps_records_up_to_the_start_step(tmp_path):
    log = MetricsLog(tmp_path)
    log.open(0)
    for step in (2, 4, 6):
        log.write({"step": step, "epoch": 1, "train_loss": 1.0 / step})
    log.close()
    assert [r["step"] for r in dx.read_metrics(tmp_path)] == [2, 4, 6]
    log.open(4)  # a resume from step 4
    log.close()
    assert [r["step"] for r in dx.read_metrics(tmp_path)] == [2, 4]
    log.open(0)  # a new run in the same folder
    log.close()
    assert dx.read_metrics(tmp_path) == []
    with pytest.raises(ValueError, match="tensorboard=True needs a metrics_dir"):
        MetricsLog(None, tensorboard=True)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_nothing_when_off(monkeypatch):
    for stream, enabled in ((_Terminal(), None), (io.StringIO(), True), (io.StringIO(), False)):
        monkeypatch.setattr("sys.stderr", stream)
        report = ProgressReport(4, 0, 2, enabled, ("train_acc",))
        report.update(2)
        report.epoch({"epoch": 1, "train_acc": 0.5}, 1.0)
        report.close()
        text = stream.getvalue()
        assert "epoch 1/2:" not in text
        assert ("2/4" in text and "train_acc=0.500" in text) == (enabled is not False), text
        assert (text == "") == (enabled is False)
