"""PC-DARTS partial channel connections: the shuffle and bypass as PC-DARTS defines them, the
fused cell against per-edge cells, edge normalisation in the genotype, and config errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import conv_impl, random_images

import darts_eqx as dx
from darts_eqx._cell import PartialChannelOp
from darts_eqx._mixed import EdgeLogits, channel_shuffle, partial_channel_bypass


def test_channel_shuffle_is_pc_darts_shuffle():
    # PC-DARTS (NCHW): x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w).
    x = np.arange(2 * 12 * 3 * 3, dtype=np.float32).reshape(2, 12, 3, 3)
    want = x.reshape(2, 4, 3, 3, 3).transpose(0, 2, 1, 3, 4).reshape(2, 12, 3, 3)
    got = channel_shuffle(jnp.asarray(x.transpose(0, 2, 3, 1)), 4)
    np.testing.assert_array_equal(np.asarray(got).transpose(0, 3, 1, 2), want)


def test_bypass_keeps_the_rest_and_max_pools_2x2_at_stride_2(getkey):
    x = random_images(getkey(), n=2, size=4, channels=6)
    np.testing.assert_array_equal(partial_channel_bypass(x, 2, 1), x[..., 2:])
    pooled = partial_channel_bypass(x, 2, 2)
    assert pooled.shape == (2, 2, 2, 4)
    np.testing.assert_array_equal(pooled[:, 1, 0], x[:, 2:4, 0:2, 2:].max(axis=(1, 2)))


def test_edge_weights_normalise_per_node(getkey):
    beta = EdgeLogits.init(4, key=getkey(), scale=1.0)
    w = np.asarray(beta.weights())
    assert w.shape == (14,)
    np.testing.assert_allclose([w[0:2].sum(), w[2:5].sum(), w[5:9].sum(), w[9:14].sum()], 1.0, rtol=1e-6)


@pytest.fixture(scope="module")
def pc_pair():
    net = dx.darts_supernet(4, 3, 5, 1, partial_channels=2, key=jax.random.key(7))
    keys = jax.random.split(jax.random.key(8), 4)
    net = eqx.tree_at(
        lambda m: (
            m.arch.alpha["normal"].logits,
            m.arch.alpha["reduce"].logits,
            m.arch.beta["normal"].logits,
            m.arch.beta["reduce"].logits,
        ),
        net,
        (
            jax.random.normal(keys[0], (14, 8)),
            jax.random.normal(keys[1], (14, 8)),
            jax.random.normal(keys[2], (14,)),
            jax.random.normal(keys[3], (14,)),
        ),
    )
    ref = eqx.tree_at(lambda m: m.cells, net, tuple(c.reference() for c in net.cells))
    return net, ref


def test_partial_channel_supernet_shapes_and_arch_leaves(pc_pair):
    net, _ = pc_pair
    arch, weights, _ = dx.split_arch(net)
    assert sorted(x.shape for x in jax.tree.leaves(arch)) == [(14,), (14,), (14, 8), (14, 8)]
    # ops are 1/2 as wide: far fewer weights than the plain supernet of the same size
    plain = dx.darts_supernet(4, 3, 5, 1, key=jax.random.key(7))
    n_pc = sum(x.size for x in jax.tree.leaves(weights))
    n_plain = sum(x.size for x in jax.tree.leaves(dx.split_arch(plain)[1]))
    assert n_pc < 0.6 * n_plain
    assert net.cells[0].inputs.channels == 2


def test_fused_partial_channel_cells_compute_the_per_edge_cells(pc_pair):
    net, ref = pc_pair
    x = random_images(jax.random.key(3), n=16)
    forward = eqx.filter_jit(lambda m, x: m(x))
    got = forward(net, x)
    with conv_impl("native"):
        want = forward(ref, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the edge weights matter: other betas give another function
    other = eqx.tree_at(lambda m: m.arch.beta["normal"].logits, net, -net.arch.beta["normal"].logits)
    assert float(jnp.abs(forward(other, x) - got).max()) > 1e-4


def test_genotype_ranks_edges_by_alpha_times_beta(pc_pair):
    net, _ = pc_pair
    # equal alpha rows: only beta decides which two inputs node 0 (edges 0, 1) and node 1 keep
    alpha = np.zeros((14, 8), np.float32)
    alpha[:, dx.DARTS_SPACE.op_names.index("sep_conv_3x3")] = 5.0
    beta = np.zeros(14, np.float32)
    beta[4] = 3.0  # node 1: edge from node 0 (state 2) is strongest
    beta[3] = -3.0  # node 1: edge from state 1 is weakest
    net = eqx.tree_at(
        lambda m: (m.arch.alpha["normal"].logits, m.arch.beta["normal"].logits),
        net,
        (jnp.asarray(alpha), jnp.asarray(beta)),
    )
    g = dx.derive_genotype(net)
    assert [i for _, i in g.normal[2:4]] == [2, 0]
    # discretised, each kept edge keeps its narrow op and the channels that bypass it
    discrete = dx.discretize(net, g)
    assert all(isinstance(op, PartialChannelOp) and op.partial_channels == 2 for op in discrete.cells[0].ops)


def test_partial_channel_config_errors():
    with pytest.raises(ValueError, match=r"`partial_channels` \(=3\) must be a positive divisor of `channels` \(=8\)"):
        dx.SearchConfig(channels=8, partial_channels=3)
    with pytest.raises(ValueError, match="needs a space whose cells take partial channels"):
        dx.SearchConfig(space="seed", partial_channels=2)
    with pytest.raises(ValueError, match=r"`partial_channels` \(=0\) must be a positive divisor"):
        dx.SearchConfig(partial_channels=0)
    with pytest.raises(ValueError, match="must divide"):
        dx.darts_supernet(6, 3, 5, 1, partial_channels=4, key=jax.random.key(0))


def test_partial_channel_search_runs_and_records_edge_weights():
    r = dx.search(
        jax.random.key(0),
        "digits",
        channels=4,
        layers=2,
        epochs=3,
        batch_size=64,
        execution=dx.Execution(steps_per_chunk=7),
        partial_channels=2,
        augment=False,  # a mirrored digit is another digit or none
        progress=False,
    )
    assert r.network.genotype == r.genotype == dx.derive_genotype(r.supernet)
    x = jnp.zeros((2, 8, 8, 1))
    assert np.all(np.isfinite(r.network(x))) and r.network(x).shape == (2, 10)
    beta = np.asarray(r.history[0]["beta_normal"])
    assert beta.shape == (14,) and np.isclose(beta[:2].sum(), 1.0, atol=1e-5)
    # beta is trained: its weights move between epochs
    assert not np.allclose(r.history[0]["beta_reduce"], r.history[-1]["beta_reduce"], rtol=0, atol=1e-6)
    # it learns (slower than plain DARTS at this toy width: its ops are 2 channels wide)
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"] - 0.1
