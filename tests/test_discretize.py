"""The test of truth for the discretiser: with softmax(alpha) one-hot on the genotype (and on
`none` for dropped edges), the supernet and the discretised network compute the same logits."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_images, tree_allclose
from test_genotype import DARTS_V2

import darts_eqx as dx
from darts_eqx._darts import one_hot_alpha


def _no_search_parts(model) -> bool:
    leaves = jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, (dx.ArchLogits, dx.MixedOp)))
    return not any(isinstance(x, (dx.ArchLogits, dx.MixedOp)) for x in leaves)


@pytest.mark.parametrize("source", ["derived", "published"])
def test_discretised_darts_network_equals_one_hot_supernet(source):
    net = dx.darts_supernet(4, 3, 5, 1, key=jax.random.key(11))
    net = eqx.tree_at(
        lambda m: (m.arch.alpha["normal"].logits, m.arch.alpha["reduce"].logits),
        net,
        (jax.random.normal(jax.random.key(1), (14, 8)), jax.random.normal(jax.random.key(2), (14, 8))),
    )
    genotype = dx.derive_genotype(net) if source == "derived" else dx.Genotype.parse(DARTS_V2)
    discrete = dx.discretize(net, genotype)
    assert isinstance(discrete, dx.CellNetwork) and discrete.arch is None and _no_search_parts(discrete)
    # kept edges carry the supernet's trained weights: the first kept op of the first cell
    for cell, super_cell in zip(discrete.cells, net.cells):
        gene = genotype.reduce if cell.reduction else genotype.normal
        for k, (op, i) in enumerate(gene):
            want = eqx.filter(super_cell.edge_op(k // 2, i, op), eqx.is_array)
            assert tree_allclose(eqx.filter(cell.ops[k], eqx.is_array), want, rtol=0, atol=0)
    hot = one_hot_alpha(net, genotype)
    assert float(hot.arch.alpha["normal"].weights().max(axis=1).min()) > 1 - 1e-6
    x = random_images(jax.random.key(3), n=16)
    forward = eqx.filter_jit(lambda m, x: m(x))
    # float32 sums in another order: agreement to ~1e-5 relative
    np.testing.assert_allclose(forward(discrete, x), forward(hot, x), rtol=1e-4, atol=1e-5)
    n_discrete = sum(x.size for x in jax.tree.leaves(eqx.filter(discrete, eqx.is_array)))
    n_super = sum(x.size for x in jax.tree.leaves(dx.split_arch(net)[1]))
    assert 0 < n_discrete < n_super


def test_discretised_seed_network_equals_one_hot_supernet(getkey):
    net = dx.layered_supernet(4, 2, 5, 1, key=getkey())
    net = eqx.tree_at(lambda m: m.arch.alpha["cell"].logits, net, jax.random.normal(getkey(), (1, 5)))
    genotype = dx.derive_genotype(net)
    strongest = dx.SEED_SPACE.op_names[int(np.argmax(net.arch.alpha["cell"].logits[0]))]
    assert genotype.space == "seed" and genotype.normal[0][0] == strongest
    discrete = dx.discretize(net)
    assert _no_search_parts(discrete)
    hot = np.zeros((1, 5), np.float32)
    hot[0, dx.SEED_SPACE.op_names.index(strongest)] = 100.0
    hot = eqx.tree_at(lambda m: m.arch.alpha["cell"].logits, net, jnp.asarray(hot))
    x = random_images(getkey(), n=8)
    np.testing.assert_allclose(discrete(x), hot(x), rtol=1e-4, atol=1e-5)


def test_discretised_nb201_network_equals_one_hot_supernet(getkey):
    net = dx.nb201.supernet(3, 2, 4, 1, key=getkey())
    # the strongest op of each edge, `none` among them: a dropped edge
    logits = np.array(jax.random.normal(getkey(), (6, 5)))
    logits[4, 0] = 5.0
    net = eqx.tree_at(lambda m: m.arch.alpha["cell"].logits, net, jnp.asarray(logits))
    genotype = dx.derive_genotype(net)
    assert genotype.ops[4] == "none"
    discrete = dx.discretize(net)
    assert discrete.genotype == genotype and _no_search_parts(discrete)
    hot = np.zeros((6, 5), np.float32)
    hot[np.arange(6), [dx.NB201_SPACE.op_names.index(op) for op in genotype.ops]] = 100.0
    hot = eqx.tree_at(lambda m: m.arch.alpha["cell"].logits, net, jnp.asarray(hot))
    x = random_images(getkey(), n=8)
    np.testing.assert_allclose(discrete(x), hot(x), rtol=1e-4, atol=1e-5)


def test_discretised_partial_channel_network_equals_its_supernet_cells(getkey):
    """A PC-DARTS edge passes the channels it does not mix whatever its op, so no alpha makes the
    supernet drop it: the check is at the cells, with op weights one-hot on the kept ops and edge
    weights one on kept edges and zero on the rest."""
    net = dx.darts_supernet(4, 3, 5, 1, partial_channels=2, key=getkey())
    genotype = dx.Genotype.parse(DARTS_V2)
    discrete = dx.discretize(net, genotype)
    assert _no_search_parts(discrete)
    from darts_eqx._cell import edge_index

    s = dx.darts_supernet(4, 3, 5, 1, key=getkey()).stem(random_images(getkey(), n=4))[0]
    for cell, super_cell in zip(discrete.cells, net.cells):
        gene = genotype.reduce if cell.reduction else genotype.normal
        ops = np.zeros((14, 8), np.float32)
        edges = np.zeros(14, np.float32)
        for k, (op, i) in enumerate(gene):
            ops[edge_index(k // 2, i), dx.DARTS_SPACE.op_names.index(op)] = 1.0
            edges[edge_index(k // 2, i)] = 1.0
        want = super_cell(s, s, (jnp.asarray(ops), jnp.asarray(edges)))[0]
        np.testing.assert_allclose(cell(s, s)[0], want, rtol=1e-4, atol=1e-5)
        break  # the first (normal) cell: the inputs of later cells have other shapes


def test_discretize_rejects_mismatched_genotypes(getkey):
    net = dx.layered_supernet(4, 1, 5, 1, key=getkey())
    with pytest.raises(ValueError, match="a 'seed' supernet cannot take a 'darts'-space genotype"):
        dx.discretize(net, dx.Genotype.parse(DARTS_V2))
