"""The DARTS variants (GDAS, DrNAS, SDARTS, FairDARTS): each one's defining maths on a hand-computed
case, one op per edge evaluated under GDAS, and each resuming bit for bit like plain DARTS."""

import math
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_arrays

import darts_eqx as dx
from darts_eqx import _variants as v
from darts_eqx._methods import MethodContext, parts
from darts_eqx._mixed import MixedOp, SampledWeights
from darts_eqx._optim import arch_optimizer
from darts_eqx._supernet import build_supernet

CONFIG = dx.SearchConfig(space="seed", epochs=3)
CONTEXT = MethodContext(CONFIG, dx.SEED_SPACE.op_names, steps_per_epoch=10)


def test_gdas_weights_are_one_hot_in_value_and_gumbel_softmax_in_gradient():
    logits = jnp.array([[0.3, -0.2, 1.0, 0.0]])
    key, tau = jax.random.key(3), 2.0
    g = jax.random.gumbel(key, logits.shape)
    soft = jax.nn.softmax((jax.nn.log_softmax(logits) + g) / tau)
    sampled = v.gumbel_straight_through(logits, tau, key)
    assert int(sampled.index[0]) == int(jnp.argmax(soft[0]))
    expected = np.zeros((1, 4))
    expected[0, int(sampled.index[0])] = 1.0
    np.testing.assert_allclose(sampled.weights, expected, atol=1e-7)
    c = jnp.array([[1.0, -2.0, 0.5, 3.0]])
    straight = jax.grad(lambda a: jnp.sum(c * v.gumbel_straight_through(a, tau, key).weights))(logits)
    relaxed = jax.grad(lambda a: jnp.sum(c * jax.nn.softmax((jax.nn.log_softmax(a) + g) / tau)))(logits)
    np.testing.assert_allclose(straight, relaxed, rtol=1e-5)


def test_gdas_temperature_falls_linearly_from_10_to_0_1():
    assert [v.gdas_temperature(e, 3, 10.0, 0.1) for e in (0, 1, 2)] == [10.0, 5.05, pytest.approx(0.1)]


def test_a_sampled_edge_evaluates_its_sampled_op_alone():
    mixed = MixedOp(dx.SEED_SPACE, 2, 1, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 2))
    weights, index = jnp.array([0.0, 0.0, 0.9, 0.0, 0.0]), jnp.int32(2)
    out = mixed(x, SampledWeights(weights, index))
    np.testing.assert_allclose(out, 0.9 * mixed.ops[2](x)[0], rtol=1e-6)
    # lax.switch: one branch runs; gradients reach every op's weight (unsampled: the output's sum)
    assert "cond" in str(jax.make_jaxpr(lambda w: mixed(x, SampledWeights(w, index)))(weights))
    grads = jax.grad(lambda w: jnp.sum(jnp.sin(mixed(x, SampledWeights(w, index)))))(weights)
    dout = jnp.cos(out)
    np.testing.assert_allclose(grads[2], jnp.sum(dout * mixed.ops[2](x)[0]), rtol=1e-5)
    for j in (0, 1, 3, 4):
        np.testing.assert_allclose(grads[j], jnp.sum(dout), rtol=1e-5)


def test_the_fused_darts_cell_takes_sampled_weights_through_its_per_edge_form():
    net = dx.darts_supernet(channels=4, layers=1, num_classes=3, in_channels=1, key=jax.random.key(0))
    cell = net.cells[0]
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 12))
    index = jnp.arange(14) % 8
    sampled = SampledWeights(jax.nn.one_hot(index, 8), index)
    out, _ = cell(x, x, (sampled, None))
    dense, _ = cell(x, x, (jax.nn.one_hot(index, 8), None))
    np.testing.assert_allclose(out, dense, rtol=1e-4, atol=1e-5)


def test_drnas_kl_to_the_uniform_dirichlet_by_hand():
    # KL(Dir(2, 1) || Dir(1, 1)) = log G(3) - log G(2) - log G(1) - log G(2) + (psi(2) - psi(3)) = log 2 - 1/2
    np.testing.assert_allclose(v.dirichlet_kl_to_uniform(jnp.array([2.0, 1.0])), math.log(2) - 0.5, rtol=1e-6)
    np.testing.assert_allclose(v.dirichlet_kl_to_uniform(jnp.ones(5)), 0.0, atol=1e-5)  # log 24 in float32
    np.testing.assert_allclose(v.dirichlet_concentration(jnp.array([0.0, 1.5, -50.0])), [1.0, 2.5, 0.0], atol=1e-6)
    config = CONFIG.replace(a_weight_decay=0.0)
    arch_loss = parts(v.drnas("kl", scale=0.5), CONTEXT._replace(config=config)).arch_reg
    alpha = jnp.array([[1.0, 0.0], [0.0, 0.0]])  # concentrations (2, 1) and (1, 1)
    np.testing.assert_allclose(arch_loss({"a": dx.ArchLogits(alpha)}, 0), 0.5 * (math.log(2) - 0.5), rtol=1e-5)
    assert parts(v.drnas(), CONTEXT).arch_reg is None  # "l2": alpha's own weight decay


def test_drnas_samples_dirichlet_weights_with_pathwise_gradients():
    view = parts(v.drnas(), CONTEXT).arch_view
    logits = jnp.array([[1.0, 0.0, -0.5]])
    samples = jax.vmap(lambda k: view({"a": dx.ArchLogits(logits)}, jnp.int32(0), k)["a"].weights())(
        jax.random.split(jax.random.key(0), 4000)
    )
    np.testing.assert_allclose(samples.sum(-1), 1.0, rtol=1e-5)
    c = np.asarray(v.dirichlet_concentration(logits))
    np.testing.assert_allclose(samples.mean(0), c / c.sum(), atol=0.02)  # E[Dir(c)] = c / sum c
    grad = jax.grad(lambda a: view({"a": dx.ArchLogits(a)}, jnp.int32(0), jax.random.key(5))["a"].weights()[0, 0])(
        logits
    )
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_sdarts_clips_each_edge_onto_the_simplex():
    w = jnp.array([[0.5, -0.2, 0.9], [-0.1, -0.3, -0.2]])
    np.testing.assert_allclose(v.onto_simplex(w), [[0.5 / 1.4, 0.0, 0.9 / 1.4], [1.0, 0.0, 0.0]], rtol=1e-6)


def test_sdarts_perturbations_stay_near_the_weights_and_pgd_raises_the_loss():
    weights = [jnp.full((2, 4), 0.25)]
    eps = 0.1
    noisy = v.random_perturbation(weights, eps, jax.random.key(0))[0]
    np.testing.assert_allclose(noisy.sum(-1), 1.0, rtol=1e-6)
    assert np.abs(np.asarray(noisy) - 0.25).max() < 3 * eps
    c = jnp.array([[1.0, 0.0, 0.0, -1.0], [0.0, 2.0, 0.0, 0.0]])

    def loss(ws):
        return jnp.sum(c * ws[0])

    attacked = v.pgd_perturbation(weights, eps, jax.random.key(1), loss, steps=7)[0]
    assert loss([attacked]) > loss(weights) + eps  # pushed up along c, each weight moved up to eps
    assert attacked[0, 0] > 0.25 and attacked[0, 3] < 0.25 and attacked[1, 1] > 0.25
    # eps grows from 0.03 at epoch 0 towards `epsilon`: the weight step's view, not alpha's
    method = parts(v.sdarts("random", epsilon=0.3), CONTEXT)
    assert method.arch_view is None and method.weight_view is not None


def test_fairdarts_sigmoid_weights_zero_one_loss_and_selection():
    method = parts(v.fairdarts(), CONTEXT)
    alpha = jnp.array([[0.0, math.log(3.0)]])  # sigmoids 0.5 and 0.75
    arch = {"a": dx.ArchLogits(alpha)}
    np.testing.assert_allclose(
        method.arch_view(arch, jnp.int32(0), jax.random.key(0))["a"].weights(), [[0.5, 0.75]], rtol=1e-6
    )
    np.testing.assert_allclose(method.arch_reg(arch, 0), -10.0 * (0 + 0.25**2) / 2, rtol=1e-6)
    # Node 0 of a DARTS cell has edges 0 and 1 and keeps both; node 1 picks 2 of edges 2, 3, 4.
    # Edge 2's ops compete (softmax weight of its best op low), but its sigmoid is the highest.
    net = dx.darts_supernet(channels=4, layers=1, num_classes=3, in_channels=1, key=jax.random.key(0))
    logits = np.full((14, 8), -6.0, np.float32)
    conv = dx.DARTS_SPACE.op_names.index("sep_conv_3x3")
    logits[2, 1:] = 3.0  # every op at 3: softmax 1/7 each, sigmoid 0.95
    logits[3, conv] = 1.0  # one op at 1: softmax ~1, sigmoid 0.73
    logits[4, conv] = 0.5
    net = eqx.tree_at(lambda n: n.arch.alpha["normal"].logits, net, jnp.asarray(logits))
    fair = method.select(net).normal
    plain = dx.derive_genotype(net).normal
    assert {j for _, j in plain[2:4]} == {1, 2}  # softmax strengths 0.99, 0.99 beat 1/7
    assert {j for _, j in fair[2:4]} == {0, 1}  # sigmoid strengths 0.95, 0.73 beat 0.62


def test_fairdarts_has_no_none_op_as_its_authors_code():
    # NAS-Bench-201's `none` would get no task-loss gradient under independent sigmoids: weight 0,
    # left out of L_01, never selected, even with the largest alpha.
    config = dx.SearchConfig(space="nb201", epochs=3)
    method = parts(v.fairdarts(), MethodContext(config, dx.NB201_SPACE.op_names, 10))
    alpha = jnp.array([[5.0, 0.0, math.log(3.0), -5.0, 0.0]])  # none, skip, conv1x1 (0.75), conv3x3, pool
    arch = {"a": dx.ArchLogits(alpha)}
    weights = method.arch_view(arch, jnp.int32(0), jax.random.key(0))["a"].weights()
    np.testing.assert_allclose(weights[0, :3], [0.0, 0.5, 0.75], rtol=1e-6)
    low = 1 / (1 + math.exp(5.0))
    np.testing.assert_allclose(method.arch_reg(arch, 0), -10.0 * (0.25**2 + (low - 0.5) ** 2) / 4, rtol=1e-6)
    net = dx.nb201.supernet(channels=4, cells=1, num_classes=3, in_channels=1, key=jax.random.key(0))
    net = eqx.tree_at(lambda n: n.arch.alpha["cell"].logits, net, jnp.tile(alpha, (6, 1)))
    assert method.select(net).ops == ("nor_conv_1x1",) * 6


DATA = dx.data.from_arrays(*tiny_arrays(n=128))
OPTIONS = dict(space="seed", channels=4, layers=1, epochs=2, batch_size=16, progress=False)


@pytest.mark.parametrize("name", ["gdas", "drnas", "sdarts-rs", "sdarts-adv", "fairdarts"])
def test_each_method_searches_and_resumes_bit_for_bit(name, tmp_path):
    run = tmp_path / "checkpoints"
    # DrNAS over 5 epochs of 4 steps: alpha still for the first (its warm-up), and the search
    # resumes from step 2, inside the warm-up; the others resume for their last two steps.
    options = {**OPTIONS, "epochs": 5} if name == "drnas" else OPTIONS

    def keep_early(history, supernet):  # the checkpoints as they were after the first epoch
        if len(history) == 1:
            shutil.copytree(run, tmp_path / "early")

    whole = dx.search(
        jax.random.key(2), DATA, method=name, checkpoint_dir=run, checkpoint_every=2, callback=keep_early, **options
    )
    assert whole.config.method == name and len(whole.history) == options["epochs"]
    assert all(np.isfinite(h["val_loss"]) for h in whole.history)
    if name == "drnas":  # as if killed after step 2
        shutil.rmtree(run)
        shutil.copytree(tmp_path / "early", run)
        shutil.rmtree(run / "step-000000004")
        assert [d.name for d in run.glob("step-*")] == ["step-000000002"]
    else:
        shutil.rmtree(run / "step-000000008")  # as if killed during the last two steps
    resumed = dx.search(
        jax.random.key(2), DATA, method=name, checkpoint_dir=run, checkpoint_every=2, resume=True, **options
    )
    assert resumed.history == whole.history and resumed.genotype == whole.genotype
    for a, b in zip(
        jax.tree.leaves(eqx.filter(whole.supernet, eqx.is_array)),
        jax.tree.leaves(eqx.filter(resumed.supernet, eqx.is_array)),
    ):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_drnas_warms_the_weights_up_before_alpha_steps():
    fifty = CONTEXT._replace(config=CONFIG.replace(epochs=50))
    assert parts(v.drnas(), fifty).arch_warmup == 10 and parts(v.drnas(warmup=0.0), fifty).arch_warmup == 0
    with pytest.raises(ValueError, match=r"drnas `warmup` \(=1.0\) must be a share"):
        v.drnas(warmup=1.0)
    with pytest.raises(ValueError, match=r"`arch_warmup` \(=3\) must be a whole number of epochs in \[0, 3\)"):
        parts(lambda context: dx.methods.Method(arch_warmup=3), CONTEXT)
    assert parts(lambda context: dx.methods.Method(arch_warmup=np.int64(2)), CONTEXT).arch_warmup == 2
    # no warm-up sets none: it composes with a plug-in that sets one
    assert parts(dx.methods.chain(v.drnas(warmup=0.0), lambda c: dx.methods.Method(arch_warmup=1)), CONTEXT)[5] == 1

    # alpha's optimiser during a warm-up of 2 steps: no update and no state change, then Adam's first step
    frozen, adam = arch_optimizer(CONFIG, frozen_steps=2), arch_optimizer(CONFIG)
    alpha, grads = {"a": jnp.arange(3.0)}, {"a": jnp.asarray([0.5, -1.0, 2.0])}
    state = start = frozen.init(alpha)
    for _ in range(2):
        updates, state = frozen.update(grads, state, alpha)
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(start.inner_state))
    )
    warm, _ = frozen.update(grads, state, alpha)
    first, _ = adam.update(grads, adam.init(alpha), alpha)
    np.testing.assert_array_equal(warm["a"], first["a"])

    def logits(supernet):
        leaves = jax.tree.leaves(supernet.arch, is_leaf=dx.is_arch)
        return np.concatenate([np.asarray(a.logits).ravel() for a in leaves])

    seen = []
    dx.search(
        jax.random.key(2),
        DATA,
        method=dx.methods.drnas(warmup=0.5),
        callback=lambda history, supernet: seen.append(logits(supernet)),
        **{**OPTIONS, "epochs": 2},
    )
    config = dx.SearchConfig(**{k: OPTIONS[k] for k in ("space", "channels", "layers", "batch_size")})
    start = build_supernet(config, DATA.image_shape, DATA.num_classes, key=jax.random.split(jax.random.key(2), 3)[0])
    assert np.array_equal(seen[0], logits(start))  # epoch 1 of 2: the weights alone
    assert np.abs(seen[1] - seen[0]).max() > 1e-5  # then alpha steps


def test_perturbation_selection_keeps_the_ops_and_edges_whose_removal_costs_most(monkeypatch):
    # A stand-in for the supernet's accuracy: the op weights on column `conv` (weighted by the
    # edge's row, so later edges matter more). Removing `conv` from an edge costs most; removing a
    # node's later incoming edges costs most. DARTS-PT must keep exactly those.
    from darts_eqx import _perturbation

    conv = dx.DARTS_SPACE.op_names.index("sep_conv_5x5")

    def accuracy(state, static, op_weights, batches):
        return float(sum(jnp.sum(w[:, conv] * (1.0 + jnp.arange(w.shape[0]) / 100)) for w in op_weights.values()))

    monkeypatch.setattr(_perturbation, "_accuracy", accuracy)
    config = dx.SearchConfig(channels=4, layers=3, batch_size=8, epochs=1)
    data = dx.data.from_arrays(*tiny_arrays(n=32, size=8))
    supernet = dx.darts_supernet(4, 3, 3, 1, key=jax.random.key(0))
    schedule = dx._loop.Schedule(jnp.arange(16), jnp.arange(16, 32), jax.random.key(1), 8, 2, 2)
    images, labels = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    genotype, _ = _perturbation.perturbation_select(
        supernet, config, images, labels, schedule, key=jax.random.key(2), execution=dx.Execution(), tune_epochs=0
    )
    for cell in (genotype.normal, genotype.reduce):
        assert all(op == "sep_conv_5x5" for op, _ in cell)
        assert [j for _, j in cell] == [0, 1, 1, 2, 2, 3, 3, 4]  # each node's two latest inputs


def test_a_search_selects_by_perturbation():
    data = dx.data.from_arrays(*tiny_arrays(n=64))
    options = dict(space="nb201", channels=4, layers=1, epochs=1, batch_size=16, progress=False)
    pt = dx.search(jax.random.key(0), data, select="pt", **options)  # 6 edges decided, 5 epochs between
    assert isinstance(pt.genotype, dx.nb201.NB201Genotype) and pt.config.select == "pt"
    assert pt.network.genotype == pt.genotype and len(pt.history) == 1  # the search itself unchanged


def test_method_combinations_that_cannot_mean_what_they_say_are_errors():
    with pytest.raises(ValueError, match="'gdas' is implemented for first-order search"):
        dx.SearchConfig(method="gdas", order=2)
    with pytest.raises(ValueError, match="'gdas' evaluates one sampled op per edge"):
        dx.SearchConfig(method="gdas", aux_skip=1.0)
    with pytest.raises(ValueError, match="do not keep FairDARTS' sigmoids"):
        dx.SearchConfig(method="fairdarts", early_stop_factor=1.3)
    with pytest.raises(ValueError, match=r"`method` \(='snas'\) must be one of"):
        dx.SearchConfig(method="snas")
    with pytest.raises(ValueError, match=r"`select` \(='best'\) must be 'argmax' or 'pt'"):
        dx.SearchConfig(select="best")
    with pytest.raises(ValueError, match=r"sdarts `steps` \(=0\) must be a positive integer"):
        v.sdarts("adversarial", steps=0)
    with pytest.raises(ValueError, match="0 < tau_min <= tau_max"):
        v.gdas(tau_min=0.0)
    dx.SearchConfig(method="sdarts-adv", order=2)  # the exact estimator: the weight step is plain
