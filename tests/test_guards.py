"""Collapse guards: beta-DARTS regularisation, the Hessian eigenvalue diagnostic against a dense
Hessian, and DARTS-ES early stopping."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_arrays

import darts_eqx as dx
from darts_eqx import SearchConfig
from darts_eqx._guards import beta_regularizer, grew, hessian_eigenvalue, ramp
from darts_eqx._loss import supernet_loss
from darts_eqx._supernet import build_supernet, with_recorded_alpha


def test_beta_regularizer_is_the_mean_logsumexp_over_all_edges(getkey):
    model = dx.darts_supernet(4, 2, 3, 1, key=getkey())
    model = eqx.tree_at(lambda m: m.arch.alpha["normal"].logits, model, jax.random.normal(getkey(), (14, 8)))
    arch, _, _ = dx.split_arch(model)
    rows = [
        np.log(np.exp(np.asarray(a.logits, np.float64)).sum(axis=1))
        for a in (model.arch.alpha["normal"], model.arch.alpha["reduce"])
    ]
    assert float(beta_regularizer(arch)) == pytest.approx(np.concatenate(rows).mean(), rel=1e-5)
    assert [ramp(2.0, e, 5) for e in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_power_iteration_finds_the_dominant_hessian_eigenvalue():
    with jax.enable_x64(True):
        config = SearchConfig(space="seed", channels=3, layers=1)
        model = build_supernet(config, (6, 6, 1), 3, key=jax.random.key(0))
        model = jax.tree.map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model)
        model = eqx.tree_at(lambda m: m.arch.alpha["cell"].logits, model, jnp.asarray([[0.3, -0.2, 0.5, 0.1, -0.4]]))
        arch, weights, static = dx.split_arch(model)
        x, y = tiny_arrays(n=8, size=6)
        batch = jnp.asarray(x, jnp.float64), jnp.asarray(y)

        def loss_of_logits(logits):
            return supernet_loss(
                eqx.tree_at(lambda a: a.arch.alpha["cell"].logits, arch, logits), weights, static, *batch
            )[0]

        dense = jax.jacrev(jax.jacrev(loss_of_logits))(arch.arch.alpha["cell"].logits).reshape(5, 5)
        eigenvalues = np.linalg.eigvalsh(np.asarray(dense))
        dominant = eigenvalues[np.argmax(np.abs(eigenvalues))]
        found = jax.jit(
            lambda a: hessian_eigenvalue(
                lambda a: supernet_loss(a, weights, static, *batch)[0], a, key=jax.random.key(1), iterations=200
            )  # fmt: skip
        )(arch)
        assert float(found) == pytest.approx(dominant, rel=1e-4)


def test_darts_es_rule_and_the_recorded_architecture(getkey):
    assert not grew([1.0, 1.2, 1.3], 1.5, 2)
    assert grew([1.0, 1.2, 1.6], 1.5, 2)
    assert not grew([1.0, 9.0], 1.5, 2)  # not a full window yet
    model = dx.darts_supernet(4, 2, 3, 1, key=getkey())
    record = {
        "alpha_normal": np.eye(14, 8)[:, ::-1].clip(0.01, None).tolist(),
        "alpha_reduce": np.full((14, 8), 1 / 8).tolist(),
    }
    restored = with_recorded_alpha(model, record)
    normal = np.asarray(record["alpha_normal"])
    np.testing.assert_allclose(
        restored.arch.alpha["normal"].weights(), normal / normal.sum(axis=1, keepdims=True), rtol=1e-5
    )
    assert dx.derive_genotype(restored).normal[0][0] == dx.DARTS_SPACE.op_names[7]  # the recorded favourite


@pytest.fixture(scope="module")
def guarded():
    data = dx.data.from_arrays(*tiny_arrays(n=128))
    options = dict(space="seed", channels=4, layers=1, epochs=4, batch_size=16, progress=False)
    plain = dx.search(jax.random.key(2), data, **options)
    regularised = dx.search(jax.random.key(2), data, beta_reg=20.0, **options)
    watched = dx.search(jax.random.key(2), data, hessian=True, early_stop_factor=1.0001, early_stop_window=1, **options)
    return plain, regularised, watched


def test_beta_regularisation_lowers_and_evens_the_logits(guarded):
    plain, regularised, _ = guarded
    assert (
        float(jnp.mean(regularised.supernet.arch.alpha["cell"].logits))
        < float(jnp.mean(plain.supernet.arch.alpha["cell"].logits)) - 1e-3
    )


def test_hessian_eigenvalue_is_recorded_and_early_stop_keeps_the_earlier_genotype(guarded):
    plain, _, watched = guarded
    eigenvalues = [h["hessian_eigenvalue"] for h in watched.history]
    assert all(np.isfinite(eigenvalues)) and "hessian_eigenvalue" not in plain.history[0]
    if watched.stopped_at is None:  # it never grew: the full search ran
        assert len(watched.history) == 4
    else:
        assert watched.stopped_at == len(watched.history) >= 2
        assert eigenvalues[-1] > 1.0001 * eigenvalues[-2]
        earlier = with_recorded_alpha(watched.supernet, watched.history[watched.stopped_at - 2])
        assert watched.genotype == dx.derive_genotype(earlier)


def test_darts_minus_sees_an_extra_decaying_identity(getkey):
    from darts_eqx._methods import aux_skip_view

    model = dx.layered_supernet(4, 1, 3, 1, key=getkey())
    arch, _, _ = dx.split_arch(model)
    view = aux_skip_view(dx.SEED_SPACE.op_names, 1.0, epochs=3, steps_per_epoch=10)
    base = np.asarray(model.arch.alpha["cell"].weights())
    skip = dx.SEED_SPACE.op_names.index("skip_connect")
    for step, beta in ((0, 1.0), (15, 0.5), (29, 0.0)):
        seen = np.asarray(view(arch, jnp.int32(step), getkey()).arch.alpha["cell"].weights())
        expected = base.copy()
        expected[:, skip] += beta
        np.testing.assert_allclose(seen, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="aux_skip needs a skip_connect op"):
        aux_skip_view(("conv_3x3",), 1.0, 3, 10)
    with pytest.raises(ValueError, match=r"`aux_skip` \(=1.0\) is implemented for first-order"):
        SearchConfig(aux_skip=1.0, order=2)


def test_darts_minus_search_trains_alpha_through_the_extra_skip(guarded):
    plain = guarded[0]
    data = dx.data.from_arrays(*tiny_arrays(n=128))
    minus = dx.search(
        jax.random.key(2), data, space="seed", channels=4, layers=1, epochs=4, batch_size=16, aux_skip=1.0,
        progress=False,
    )  # fmt: skip
    assert not np.allclose(
        minus.supernet.arch.alpha["cell"].logits, plain.supernet.arch.alpha["cell"].logits, atol=1e-6
    )
    assert minus.genotype == dx.derive_genotype(minus.supernet)  # from alpha alone, not the extra skip
