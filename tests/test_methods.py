"""Methods as plug-ins: each part's defining maths on a hand-computed case, composition, and a
user's own method plugged into `search`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_arrays

import darts_eqx as dx
from darts_eqx import methods
from darts_eqx._methods import parts
from darts_eqx._supernet import build_supernet

CONFIG = dx.SearchConfig(space="seed", epochs=3)
CONTEXT = methods.MethodContext(CONFIG, dx.SEED_SPACE.op_names, steps_per_epoch=10)


def tempered(temperature: float):
    """A user's relaxation: softmax(alpha / T) under whatever comes after it."""

    def tempered(context):
        return methods.Method(relax=lambda logits, step, inner, key: inner(logits / temperature, step, key))

    return tempered


def test_relaxations_stack_and_loss_terms_add():
    logits = jnp.array([[0.0, 1.0, 2.0, 0.5, -1.0]])
    plugin = methods.chain(tempered(2.0), methods.auxiliary_skip(1.0), methods.beta_regularisation(4.0))
    estimator, arch_loss, view, select, _, _ = parts(plugin, CONTEXT)
    assert estimator is None and select is None
    arch = {"alpha": dx.ArchLogits(logits)}
    skip = dx.SEED_SPACE.op_names.index("skip_connect")
    for step, beta in ((0, 1.0), (15, 0.5), (25, 0.0)):
        expected = np.exp(np.asarray(logits) / 2.0)
        expected /= expected.sum()
        expected[0, skip] += beta  # the auxiliary skip on top of the tempered softmax
        seen = view(arch, jnp.int32(step), jax.random.key(step))["alpha"].weights()
        np.testing.assert_allclose(seen, expected, rtol=1e-6)
    # beta-DARTS: 4 * epoch / (epochs - 1) * mean logsumexp; at step 25 (epoch 2 of 3): 4 * lse
    lse = np.log(np.exp(np.asarray(logits)).sum())
    np.testing.assert_allclose(arch_loss(arch, jnp.int32(25)), 4.0 * lse, rtol=1e-6)
    doubled = parts(methods.chain(methods.beta_regularisation(4.0), methods.beta_regularisation(1.0)), CONTEXT)[1]
    np.testing.assert_allclose(doubled(arch, jnp.int32(25)), 5.0 * lse, rtol=1e-6)


def test_a_method_has_one_estimator_and_one_selection():
    two = methods.chain(methods.unrolled(), methods.unrolled())
    with pytest.raises(ValueError, match=r"plug-ins \['.*unrolled', '.*unrolled'\] each set the estimator"):
        parts(two, CONTEXT.__class__(CONFIG.replace(order=2), CONTEXT.op_names, 10))
    with pytest.raises(ValueError, match="returned dict, not a darts_eqx.Method"):
        parts(methods.chain(lambda context: {}), CONTEXT)


def test_the_config_names_its_plugins():
    estimator, arch_loss, view, _, _, _ = parts(methods.from_config(CONFIG), CONTEXT)
    assert estimator is None and arch_loss is None and view is None  # plain first-order DARTS
    config = CONFIG.replace(order=2, beta_reg=2.0)
    estimator, arch_loss, view, _, _, _ = parts(methods.from_config(config), CONTEXT._replace(config=config))
    assert estimator is not None and arch_loss is not None and view is None


def test_a_users_method_runs_in_search_and_selects_the_genotype():
    # A relaxation, a loss term and a selection of the user's own, chained: the loss term pushes
    # alpha's second column down (Adam moves it by about a_lr per step), the selection decides.
    data = dx.data.from_arrays(*tiny_arrays(n=64))
    options = dict(space="seed", channels=4, layers=1, epochs=1, batch_size=16, progress=False)
    chosen = dx.Genotype((("conv_5x5", 0),), (1,), (), (), space="seed")

    def push_down(context):
        def arch_loss(arch, step):
            return 100.0 * sum(jnp.sum(a.logits[:, 1]) for a in jax.tree.leaves(arch, is_leaf=dx.is_arch))

        return methods.Method(arch_loss=arch_loss, select=lambda supernet: chosen)

    mine = dx.search(jax.random.key(0), data, method=methods.chain(tempered(0.5), push_down), **options)
    assert mine.genotype == chosen and mine.network.genotype == chosen
    # the search's alpha at step 0 (its model key is the first of three split from its key)
    config = mine.config
    start = build_supernet(config, data.image_shape, data.num_classes, key=jax.random.split(jax.random.key(0), 3)[0])
    steps = len(mine.history) * 2  # 64 images, half for alpha, batch 16: 2 steps
    moved = np.asarray(start.arch.alpha["cell"].logits - mine.supernet.arch.alpha["cell"].logits)[0, 1]
    assert 0.5 * steps * config.a_lr < moved < 1.5 * steps * config.a_lr


def recorded_keys(seen: dict):
    """A user's relaxation that records, per step, the PRNG keys its forward passes draw from."""

    def record(step, key_data):
        seen.setdefault(int(step), set()).add(tuple(np.asarray(key_data).ravel().tolist()))

    def recorded_keys(context):
        def relax(logits, step, inner, key):
            jax.debug.callback(record, step, jax.random.key_data(key))
            return inner(logits, step, key)

        return methods.Method(relax=relax)

    return recorded_keys


def test_a_relaxation_draws_from_a_fresh_key_each_step_and_the_same_on_a_rerun():
    data = dx.data.from_arrays(*tiny_arrays(n=64))
    options = dict(space="seed", channels=4, layers=1, epochs=2, batch_size=16, progress=False)
    runs = []
    for shared in (False, False, True):
        seen: dict = {}
        dx.search(
            jax.random.key(0), data, method=recorded_keys(seen), execution=dx.Execution(shared_trace=shared), **options
        )
        runs.append(seen)
    first, rerun, shared = runs
    assert sorted(first) == [0, 1, 2, 3]  # 2 epochs of 2 steps
    assert all(len(keys) == 2 for keys in first.values())  # alpha's pass and the weights' pass
    assert len(set().union(*first.values())) == 8  # no key twice
    assert rerun == first and shared == first  # the same keys again, however the step is traced
