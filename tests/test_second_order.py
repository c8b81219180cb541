"""The second-order architecture gradient: exact against a central finite difference of the
unrolled objective (float64), the paper's finite-difference estimator against the exact one, the
virtual step against the weight optimiser's real step, and order-2 searches."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_arrays

import darts_eqx as dx
from darts_eqx import SearchConfig
from darts_eqx._loss import supernet_loss
from darts_eqx._optim import weight_optimizer
from darts_eqx._second_order import momentum_buffer, virtual_step
from darts_eqx._supernet import build_supernet

XI, MOMENTUM, DECAY = 0.2, 0.9, 3e-4


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def tiny_problem(dtype):
    config = SearchConfig(space="seed", channels=3, layers=1)
    model = build_supernet(config, (6, 6, 1), 3, key=jax.random.key(0))
    model = jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model)
    # alpha away from uniform, so that the ops' weights differ
    model = eqx.tree_at(lambda m: m.arch.alpha["cell"].logits, model, jnp.asarray([[0.3, -0.2, 0.5, 0.1, -0.4]], dtype))
    arch, weights, static = dx.split_arch(model)
    x, y = tiny_arrays(n=16, size=6)
    train = jnp.asarray(x[:8], dtype), jnp.asarray(y[:8])
    val = jnp.asarray(x[8:], dtype), jnp.asarray(y[8:])
    keys = iter(jax.random.split(jax.random.key(1), 100))
    buffer = jax.tree.map(lambda w: 0.1 * jax.random.normal(next(keys), w.shape, dtype), weights)
    return arch, weights, static, train, val, buffer


def test_exact_estimator_matches_a_central_difference_of_the_unrolled_objective():
    with jax.enable_x64(True):
        arch, weights, static, train, val, buffer = tiny_problem(jnp.float64)
        step = dict(xi=XI, momentum=MOMENTUM, weight_decay=DECAY, buffer=buffer)

        @jax.jit
        def unrolled(logits):
            a = eqx.tree_at(lambda t: t.arch.alpha["cell"].logits, arch, logits)
            return supernet_loss(a, virtual_step(weights, a, static, train, **step), static, *val)[0]

        _, exact = jax.jit(lambda a: dx.arch_gradient(a, weights, static, train, val, **step))(arch)
        exact = np.asarray(exact.arch.alpha["cell"].logits).ravel()
        logits, h = arch.arch.alpha["cell"].logits, 1e-4
        central = np.array(
            [
                (unrolled(logits.at[0, i].add(h)) - unrolled(logits.at[0, i].add(-h))) / (2 * h)
                for i in range(logits.shape[1])
            ]
        )
        assert np.linalg.norm(exact - central) <= 1e-6 * np.linalg.norm(central)
        # and the second-order term is not negligible here: dropping it is far off
        _, first = jax.value_and_grad(supernet_loss, has_aux=True)(
            arch, virtual_step(weights, arch, static, train, **step), static, *val
        )
        first = np.asarray(first.arch.alpha["cell"].logits).ravel()
        assert np.linalg.norm(first - exact) > 1e-3 * np.linalg.norm(exact)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_finite_difference_estimator_agrees_with_the_exact_one(dtype):
    with jax.enable_x64(dtype == "float64"):
        arch, weights, static, train, val, buffer = tiny_problem(jnp.dtype(dtype))
        step = dict(xi=XI, momentum=MOMENTUM, weight_decay=DECAY, buffer=buffer)

        def estimate(estimator):
            run = jax.jit(lambda a: dx.arch_gradient(a, weights, static, train, val, estimator=estimator, **step))
            return flat(run(arch)[1])

        a, b = estimate("exact"), estimate("finite_difference")
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
        # closer than that: the second-order term is ~30% of this gradient, so a wrongly scaled
        # Hessian term (2 xi, or none) would be off by ~0.3
        assert np.linalg.norm(a - b) < 0.02 * np.linalg.norm(a)


def test_virtual_step_is_the_weight_optimisers_own_step():
    arch, weights, static, train, _, _ = tiny_problem(jnp.float32)
    config = SearchConfig(space="seed", w_lr=XI, grad_clip=1e6)  # no clipping, as the virtual step
    w_opt = weight_optimizer(config, 100)
    opt_state = w_opt.init(weights)
    grad = eqx.filter_jit(eqx.filter_grad(lambda w: supernet_loss(arch, w, static, *train)[0]))
    for _ in range(2):  # two real steps, so that the momentum buffer is not zero
        updates, opt_state = w_opt.update(grad(weights), opt_state, weights)
        before, weights = weights, eqx.apply_updates(weights, updates)
    buffer = momentum_buffer(opt_state)
    assert buffer is not None and np.abs(flat(buffer)).max() > 0
    updates, _ = w_opt.update(grad(weights), opt_state, weights)
    real = eqx.apply_updates(weights, updates)
    virtual = virtual_step(
        weights, arch, static, train, xi=XI, momentum=config.w_momentum, weight_decay=config.w_weight_decay,
        buffer=buffer,
    )  # fmt: skip
    np.testing.assert_allclose(flat(virtual), flat(real), rtol=1e-5, atol=1e-7)
    assert momentum_buffer(optax.sgd(0.1).init(weights)) is None
    with pytest.raises(ValueError, match=r"estimator \(='newton'\) must be one of"):
        dx.arch_gradient(arch, weights, static, train, train, xi=0.1, estimator="newton")
    del before


def test_exact_estimator_second_pass_keeps_fewer_residuals_than_a_single_checkpoint(monkeypatch):
    # Reverse over reverse through the fused DARTS cell's scans: `remat` checkpoints the
    # checkpointed source and edge functions, so that the exact step's own backward pass recomputes
    # each source's backward pass instead of stacking its intermediates. Traced only (eval_shape):
    # the residuals that jax.vjp of the unrolled objective keeps, against one plain checkpoint.
    from darts_eqx import _source_ops

    config = SearchConfig(space="darts", channels=4, layers=1)
    model = build_supernet(config, (8, 8, 1), 3, key=jax.random.key(0))
    arch, weights, static = dx.split_arch(model)
    x, y = (jnp.asarray(a) for a in tiny_arrays(n=16, size=8))
    train, val = (x[:8], y[:8]), (x[8:], y[8:])

    def unrolled(a):
        w = virtual_step(weights, a, static, train, xi=XI, momentum=MOMENTUM, weight_decay=DECAY)
        return supernet_loss(a, w, static, *val)[0]

    def residual_bytes():
        residuals = jax.eval_shape(lambda a: jax.vjp(unrolled, a)[1], arch)
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(residuals))

    nested = residual_bytes()
    monkeypatch.setattr(_source_ops, "remat", lambda fn: jax.checkpoint(fn, policy=_source_ops.REMAT))
    single = residual_bytes()
    assert nested < 0.75 * single, (nested, single)


def test_second_order_search_runs_in_one_compiled_chunk():
    data = dx.data.from_arrays(*tiny_arrays())
    options = dict(space="seed", channels=4, layers=1, epochs=2, batch_size=16, progress=False)
    options["execution"] = dx.Execution(steps_per_chunk=1)
    first = dx.search(jax.random.key(5), data, **options)
    second = dx.search(jax.random.key(5), data, order=2, **options)  # 3 chunks x 2 epochs, one trace
    assert all(np.isfinite(h["val_loss"]) and np.isfinite(h["a_grad_norm"]) for h in second.history)
    assert not np.allclose(
        first.supernet.arch.alpha["cell"].logits, second.supernet.arch.alpha["cell"].logits, rtol=0, atol=1e-7
    )


def test_shared_trace_second_order_step_equals_the_separately_traced_step():
    # shared_trace with finite differences: one traced gradient for the virtual step, the gradient
    # at w', the two at w+- (kernel gradients gated off) and the weight step, as a five-phase scan.
    # From a state with a momentum buffer, with an alpha regulariser and a view of alpha for the
    # weight step: the same step as four traces.
    from darts_eqx import SearchState, search_step
    from darts_eqx._optim import arch_optimizer
    from darts_eqx._step import second_order_gradient

    # xi = 1 so that the Hessian term is large against the tolerances (an error in it shows)
    config = SearchConfig(
        space="seed", channels=4, layers=1, batch_size=8, order=2, estimator="finite_difference", xi=1.0
    )
    x, y = (jnp.asarray(a) for a in tiny_arrays(n=16, size=8))
    model = build_supernet(config, x.shape[1:], 10, key=jax.random.key(2))
    arch, weights, static = dx.split_arch(model)
    w_opt, a_opt = weight_optimizer(config, 4), arch_optimizer(config)
    train, val = (x[:8], y[:8]), (x[8:], y[8:])
    unrolled = second_order_gradient(config, 4)

    def reg(arch, step):
        return 0.5 * sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(arch))

    def view(arch, step, key):  # as DARTS-'s auxiliary skip: alpha as the weight step sees it
        return jax.tree.map(lambda a: 2.0 * a, arch)

    @eqx.filter_jit
    def step(state, shared):
        return search_step(
            state, static, w_opt, a_opt, train, val, unrolled, arch_reg=reg, arch_view=view, shared_trace=shared
        )

    state = SearchState(
        weights, arch, w_opt.init(weights), a_opt.init(arch), jnp.zeros((), jnp.int32), jax.random.key(3)
    )
    state, _ = step(state, False)  # a momentum buffer for the virtual step
    got, got_metrics = step(state, True)
    want, want_metrics = step(state, False)
    np.testing.assert_allclose(flat(got.arch), flat(want.arch), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(flat(got.weights), flat(want.weights), rtol=1e-5, atol=1e-6)
    for a, b in zip(got_metrics, want_metrics):
        np.testing.assert_allclose(a, b, rtol=1e-4)
    assert int(got.step) == 2
    exact = second_order_gradient(config.replace(estimator="exact"), 4)
    with pytest.raises(ValueError, match="shared_trace with a second-order gradient needs .* 'finite_difference'"):
        search_step(state, static, w_opt, a_opt, train, val, exact, shared_trace=True)
