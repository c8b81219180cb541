"""End-to-end first-order search: scan-fused chunks with no retracing, history, genotype,
determinism, divergence guard, and config errors raised before any compilation."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_arrays

import darts_eqx as dx
from darts_eqx import SearchConfig, SearchState
from darts_eqx._augment import search_augmentation
from darts_eqx._fused import per_source_view
from darts_eqx._optim import arch_optimizer, weight_optimizer
from darts_eqx._state import augmentation_keys
from darts_eqx._step import make_chunk_fn
from darts_eqx._supernet import build_supernet

DIGITS = dx.data.load("digits")


@pytest.fixture(scope="module")
def darts_result():
    # 2 epochs x 2 chunks of 2 steps: the same compiled chunk runs four times.
    return dx.search(
        jax.random.key(0),
        DIGITS,
        space="darts",
        channels=4,
        layers=2,
        epochs=2,
        batch_size=64,
        execution=dx.Execution(steps_per_chunk=2),
        progress=False,
    )


def test_darts_search_returns_genotype_supernet_network_history(darts_result):
    r = darts_result
    assert [h["epoch"] for h in r.history] == [1, 2]
    for record in r.history:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "w_grad_norm", "a_grad_norm"):
            assert np.isfinite(record[key])
        assert record["w_grad_norm"] > 0 and record["a_grad_norm"] > 0
        assert "seconds" not in record  # the history is deterministic; times are in epoch_seconds
        w = np.asarray(record["alpha_normal"])
        assert w.shape == (14, 8) and np.allclose(w.sum(axis=1), 1.0, atol=1e-5)
    assert len(r.epoch_seconds) == 2 and all(s > 0 for s in r.epoch_seconds)
    # the cosine schedule is stepped per epoch: epoch 1 uses the initial lr
    assert r.history[0]["lr"] == pytest.approx(r.config.w_lr)
    assert r.history[1]["lr"] < r.history[0]["lr"]
    # 4 steps of alpha Adam moved alpha away from its 1e-3-scale init
    assert float(jnp.abs(r.supernet.arch.alpha["reduce"].logits).max()) > 1e-3
    assert r.genotype == dx.derive_genotype(r.supernet)
    # the cells' zero-padded edges (stored stacked) stay zero through the steps: their outputs
    # have zero mixing weights, so their gradients, decay and momentum are zero too
    weights = dx.split_arch(r.supernet)[1]
    nonzero = [int(jnp.count_nonzero(x)) for x in jax.tree.leaves(weights)]
    own = [int(jnp.count_nonzero(x)) for x in jax.tree.leaves(per_source_view(weights))]
    stored, unpadded = (sum(x.size for x in jax.tree.leaves(t)) for t in (weights, per_source_view(weights)))
    assert sum(nonzero) == sum(own) and stored > unpadded
    assert len(r.genotype.normal) == 8 and all(op != "none" for op, _ in r.genotype.normal + r.genotype.reduce)
    assert isinstance(r.network, dx.CellNetwork) and r.network.arch is None and r.network.genotype == r.genotype
    # digits, 10 classes: after 8 steps the alpha-step batches are classified far above chance
    assert r.history[-1]["val_acc"] > 0.2


def test_chunk_is_compiled_once_and_retraces_are_errors(getkey):
    config = SearchConfig(space="seed", channels=4, layers=1, epochs=1, batch_size=8)
    x, y = tiny_arrays()
    model = build_supernet(config, (8, 8, 1), 3, key=getkey())
    arch, weights, static = dx.split_arch(model)
    w_opt, a_opt = weight_optimizer(config, 4), arch_optimizer(config)
    state = SearchState(weights, arch, w_opt.init(weights), a_opt.init(arch), jnp.zeros((), jnp.int32), getkey())
    chunk = make_chunk_fn(static, w_opt, a_opt, dx.Execution().resolve(config))
    data = (jnp.asarray(x), jnp.asarray(y))
    idx = jnp.arange(32).reshape(4, 8)
    for _ in range(3):  # same shapes, new values: one trace only
        state, metrics = chunk((*data, idx, idx + 32), state)
    assert int(state.step) == 12 and metrics.train_loss.shape == (4,)
    with pytest.raises(RuntimeError, match="traced"):
        chunk((*data, idx[:2], idx[:2] + 32), state)


def test_search_batches_are_cropped_and_flipped_with_each_steps_keys(getkey):
    # A chunk that augments its batches equals a chunk without augmentation fed, step by step,
    # the batches augmented outside with `augmentation_keys` of that step's state.
    config = SearchConfig(space="seed", channels=4, layers=1, epochs=1, batch_size=8)
    x, y = (jnp.asarray(a) for a in tiny_arrays())
    arch, weights, static = dx.split_arch(build_supernet(config, (8, 8, 1), 3, key=getkey()))
    w_opt, a_opt = weight_optimizer(config, 4), arch_optimizer(config)
    start = SearchState(weights, arch, w_opt.init(weights), a_opt.init(arch), jnp.zeros((), jnp.int32), getkey())
    augment = search_augmentation(config)
    train_idx, val_idx = jnp.arange(32).reshape(4, 8), jnp.arange(32, 64).reshape(4, 8)
    inside = make_chunk_fn(static, w_opt, a_opt, dx.Execution().resolve(config), augment=augment)
    ended, metrics = inside((x, y, train_idx, val_idx), jax.tree.map(jnp.copy, start))

    seen, labels = [], []
    for step in range(4):
        k_train, k_val = augmentation_keys(eqx.tree_at(lambda s: s.step, start, jnp.asarray(step, jnp.int32)))
        seen += [augment(k_train, x[train_idx[step]]), augment(k_val, x[val_idx[step]])]
        labels += [y[train_idx[step]], y[val_idx[step]]]
    seen, labels = jnp.concatenate(seen), jnp.concatenate(labels)
    assert not np.array_equal(np.asarray(seen[:8]), np.asarray(x[train_idx[0]]))  # it does change them
    outside = make_chunk_fn(static, w_opt, a_opt, dx.Execution().resolve(config))
    order = jnp.arange(64).reshape(4, 2, 8)
    ended_b, metrics_b = outside((seen, labels, order[:, 0], order[:, 1]), start)
    np.testing.assert_allclose(metrics.val_loss, metrics_b.val_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(ended.arch), jax.tree.leaves(ended_b.arch)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_same_key_same_search_and_other_key_differs():
    data = dx.data.from_arrays(*tiny_arrays())
    options = dict(space="seed", channels=4, layers=1, epochs=2, batch_size=16, progress=False)
    np.random.seed(1)
    a = dx.search(jax.random.key(5), data, **options)
    np.random.seed(2)  # the data order comes from the key, not from NumPy's global state
    b = dx.search(jax.random.key(5), data, **options)
    c = dx.search(jax.random.key(6), data, **options)
    assert np.array_equal(a.supernet.arch.alpha["cell"].logits, b.supernet.arch.alpha["cell"].logits)
    assert a.history == b.history and a.genotype == b.genotype
    assert not np.array_equal(a.supernet.arch.alpha["cell"].logits, c.supernet.arch.alpha["cell"].logits)


def test_divergence_stops_the_search_with_a_message():
    data = dx.data.from_arrays(*tiny_arrays())
    with pytest.raises(dx.SearchDiverged, match=r"non-finite .* at step \d+ \(epoch 1\)"):
        dx.search(
            jax.random.key(0),
            data,
            space="seed",
            channels=4,
            layers=1,
            epochs=1,
            batch_size=16,
            w_lr=1e30,
            grad_clip=0.0,
            progress=False,
        )


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(batch_size=100), r"batch_size \(=100\) is larger than the search split"),
        (dict(space="transformers"), "unknown search space 'transformers'"),
        (dict(channels=0), r"`channels` \(=0\)"),
        (dict(train_portion=1.0), "train_portion"),
        (dict(colour="red"), r"unknown search option\(s\) \['colour'\]"),
        (dict(order=3), r"`order` \(=3\) must be 1 \(first order\) or 2"),
        (dict(order=2, estimator="newton"), r"`estimator` \(=.newton.\) must be one of"),
        (dict(layers=3), "divisible by 4"),
        (dict(execution=dx.Execution(shared_trace=True), order=2), r"`shared_trace` with order 2 needs estimator"),
        (dict(steps_per_chunk=2), r"unknown search option\(s\) \['steps_per_chunk'\]"),
    ],
)
def test_bad_options_fail_before_compiling(options, message):
    x, y = tiny_arrays(n=96, size=6)
    with pytest.raises(ValueError, match=message):
        dx.search(jax.random.key(0), (x, y), **{"channels": 4, "layers": 1, "epochs": 1, "batch_size": 16, **options})


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(steps_per_chunk=0), r"`steps_per_chunk` \(=0\) must be a positive integer"),
        (dict(depthwise="fast"), r"`depthwise` \(='fast'\) must be one of"),
        (dict(conv="fast"), r"`conv` \(='fast'\) must be 'canonical' or 'native'"),
    ],
)
def test_bad_execution_options_are_errors_naming_them(options, message):
    with pytest.raises(ValueError, match=message):
        dx.Execution(**options)


def test_non_bool_switch_is_an_error():
    # The suite's runtime type checker rejects it at the annotation; without one (as users run it)
    # `__post_init__` must, or a truthy string would switch the option on.
    for value, name in ((SearchConfig(), "hessian"), (SearchConfig(), "augment"), (dx.Execution(), "shared_trace")):
        object.__setattr__(value, name, "yes")
        with pytest.raises(ValueError, match=rf"`{name}` \(='yes'\) must be True(,| or) False"):
            value.__post_init__()


def test_execution_is_not_part_of_the_config():
    # What a search computes and how it runs are apart: the config has no execution fields.
    import dataclasses

    config_fields = {f.name for f in dataclasses.fields(SearchConfig)}
    execution_fields = {f.name for f in dataclasses.fields(dx.Execution)}
    assert not config_fields & execution_fields
    assert {"steps_per_chunk", "shared_trace", "devices", "depthwise"} <= execution_fields


def test_the_trace_form_is_chosen_per_search(monkeypatch):
    # None (default) picks the shared trace where it is the better trade (on CPU, second order
    # with finite differences: half the compile, two-thirds of the memory), separate traces for
    # the exact estimator (which cannot share); an explicit choice always wins.
    fd = SearchConfig(order=2, estimator="finite_difference")
    exact = SearchConfig(order=2)
    first = SearchConfig()
    default = dx.Execution()
    assert default.resolve(fd).shared_trace is True
    assert default.resolve(exact).shared_trace is False
    assert default.resolve(first).shared_trace is False
    assert dx.Execution(shared_trace=False).resolve(fd).shared_trace is False
    assert dx.Execution(shared_trace=True).resolve(first).shared_trace is True
    with pytest.raises(ValueError, match="needs estimator 'finite_difference'"):
        dx.Execution(shared_trace=True).resolve(exact)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # not measured there: separate traces
    assert default.resolve(fd).shared_trace is False


def test_donated_state_is_not_reused():
    # Donation must not break the returned supernet: it is readable after the search.
    r = dx.search(
        jax.random.key(1),
        dx.data.from_arrays(*tiny_arrays()),
        space="seed",
        channels=4,
        layers=1,
        epochs=1,
        batch_size=16,
        progress=False,
    )
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(eqx.filter(r.supernet, eqx.is_array)))


def test_shared_trace_search_is_the_same_search(monkeypatch):
    # The execution option reaches the step (the shared trace of its phases is what gets traced)
    # and gives the same search up to rounding.
    from darts_eqx import _phases

    traced = []
    gated = _phases._shared
    monkeypatch.setattr(_phases, "_shared", lambda *a: traced.append(1) or gated(*a))
    data = dx.data.from_arrays(*tiny_arrays())
    options = dict(space="seed", channels=4, layers=1, epochs=2, batch_size=16, progress=False)
    plain = dx.search(jax.random.key(3), data, **options)
    assert not traced
    shared = dx.search(jax.random.key(3), data, execution=dx.Execution(shared_trace=True), **options)
    assert traced and shared.execution.shared_trace
    np.testing.assert_allclose(
        shared.supernet.arch.alpha["cell"].logits, plain.supernet.arch.alpha["cell"].logits, rtol=1e-4, atol=1e-6
    )
    assert len(shared.history) == len(plain.history) == 2
    for a, b in zip(shared.history, plain.history):
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-4)


def test_shared_trace_step_equals_the_two_trace_step(getkey):
    # shared_trace: one traced gradient of (weights, alpha) for both phases with the kernel
    # gradients gated off in the alpha phase: same step as two separately traced gradients
    # (with an alpha regulariser, whose gradient joins alpha's).
    from darts_eqx import search_step

    config = SearchConfig(space="seed", channels=4, layers=1, batch_size=8)
    model = build_supernet(config, (8, 8, 3), 10, key=getkey())
    arch, weights, static = dx.split_arch(model)
    w_opt, a_opt = weight_optimizer(config, 4), arch_optimizer(config)
    state = SearchState(weights, arch, w_opt.init(weights), a_opt.init(arch), jnp.zeros((), jnp.int32), getkey())
    x = jax.random.normal(getkey(), (16, 8, 8, 3))
    y = jax.random.randint(getkey(), (16,), 0, 10)

    def reg(arch, step):
        return 0.5 * sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(arch))

    @eqx.filter_jit
    def two_steps(state, shared):
        for _ in range(2):
            state, metrics = search_step(
                state, static, w_opt, a_opt, (x[:8], y[:8]), (x[8:], y[8:]), arch_reg=reg, shared_trace=shared
            )
        return state, metrics

    got, got_metrics = two_steps(state, True)
    want, want_metrics = two_steps(state, False)
    for a, b in zip(jax.tree.leaves((got.weights, got.arch)), jax.tree.leaves((want.weights, want.arch))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_metrics, want_metrics):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    assert int(got.step) == 2


def test_first_order_step_is_the_papers_alternation_with_one_traced_gradient(getkey):
    # The two-trace first-order step against plain JAX: alpha's gradient on the validation batch
    # through the view (DARTS-'s auxiliary skip) plus the regulariser's, alpha's Adam step, then
    # the weights' gradient on the training batch at the new alpha, and their SGD step. Its two
    # gradients come from one jitted function, traced once and called twice.
    from darts_eqx import search_step
    from darts_eqx._loss import supernet_loss
    from darts_eqx._methods import aux_skip_view
    from darts_eqx._state import forward_key

    config = SearchConfig(space="seed", channels=4, layers=1, batch_size=8)
    model = build_supernet(config, (8, 8, 3), 10, key=getkey())
    arch, weights, static = dx.split_arch(model)
    w_opt, a_opt = weight_optimizer(config, 4), arch_optimizer(config)
    state = SearchState(weights, arch, w_opt.init(weights), a_opt.init(arch), jnp.array(1, jnp.int32), getkey())
    x = jax.random.normal(getkey(), (16, 8, 8, 3))
    y = jax.random.randint(getkey(), (16,), 0, 10)
    train, val = (x[:8], y[:8]), (x[8:], y[8:])
    view = aux_skip_view(dx.SEED_SPACE.op_names, 1.0, epochs=4, steps_per_epoch=1)

    def reg(arch, step):
        return 0.5 * sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(arch))

    def step(state):
        return search_step(state, static, w_opt, a_opt, train, val, arch_reg=reg, arch_view=view)

    got, metrics = jax.jit(step)(state)

    alpha_pass, weight_pass = forward_key(state, 0), forward_key(state, 1)  # each pass's relaxation key
    a_grads = jax.grad(lambda a: supernet_loss(view(a, state.step, alpha_pass), weights, static, *val)[0] + reg(a, 0))(
        arch
    )
    a_updates, _ = a_opt.update(a_grads, state.a_opt_state, arch)
    new_arch = eqx.apply_updates(arch, a_updates)
    w_grads = jax.grad(lambda w: supernet_loss(view(new_arch, state.step, weight_pass), w, static, *train)[0])(weights)
    w_updates, _ = w_opt.update(w_grads, state.w_opt_state, weights)
    for a, b in zip(jax.tree.leaves(got.arch), jax.tree.leaves(new_arch)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(got.weights), jax.tree.leaves(eqx.apply_updates(weights, w_updates))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics.a_grad_norm, optax.tree.norm(a_grads), rtol=1e-5)
    np.testing.assert_allclose(metrics.w_grad_norm, optax.tree.norm(w_grads), rtol=1e-5)

    eqns = jax.make_jaxpr(step)(state).eqns
    calls = [e for e in eqns if e.primitive.name in ("pjit", "jit") and e.params["name"] == "loss_gradient"]
    assert len(calls) == 2
    assert calls[0].params["jaxpr"] is calls[1].params["jaxpr"]
