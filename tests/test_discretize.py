"""The test of truth for the discretiser: with softmax(alpha) one-hot on the genotype (and on
`none` for dropped edges), the supernet and the discretised network compute the same logits."""

import equinox as eqx
import jax
import numpy as np
import pytest
from helpers import random_images, tree_allclose
from test_genotype import DARTS_V2

import darts_eqx as dx
from darts_eqx._discretize import one_hot_alpha


def _no_search_parts(model) -> bool:
    leaves = jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, (dx.ArchLogits, dx.MixedOp)))
    return not any(isinstance(x, (dx.ArchLogits, dx.MixedOp)) for x in leaves)


@pytest.mark.parametrize("source", ["derived", "published"])
def test_discretised_darts_network_equals_one_hot_supernet(source):
    net = dx.SearchNetwork(4, 3, 5, 1, key=jax.random.key(11))
    net = eqx.tree_at(
        lambda m: (m.alpha_normal.logits, m.alpha_reduce.logits),
        net,
        (jax.random.normal(jax.random.key(1), (14, 8)), jax.random.normal(jax.random.key(2), (14, 8))),
    )
    genotype = dx.derive_genotype(net) if source == "derived" else dx.Genotype.parse(DARTS_V2)
    discrete = dx.discretize(net, genotype)
    assert isinstance(discrete, dx.DiscreteNetwork) and _no_search_parts(discrete)
    # kept edges carry the supernet's trained weights: the first kept op of the first cell
    for cell, super_cell in zip(discrete.cells, net.cells):
        gene = genotype.reduce if cell.reduction else genotype.normal
        for k, (op, i) in enumerate(gene):
            want = eqx.filter(super_cell.edge_op(k // 2, i, op), eqx.is_array)
            assert tree_allclose(eqx.filter(cell.ops[k], eqx.is_array), want, rtol=0, atol=0)
    hot = one_hot_alpha(net, genotype)
    assert float(hot.alpha_normal.weights().max(axis=1).min()) > 1 - 1e-6
    x = random_images(jax.random.key(3), n=16)
    forward = eqx.filter_jit(lambda m, x: m(x))
    # float32 sums in another order: agreement to ~1e-5 relative
    np.testing.assert_allclose(forward(discrete, x), forward(hot, x), rtol=1e-4, atol=1e-5)
    n_discrete = sum(x.size for x in jax.tree.leaves(eqx.filter(discrete, eqx.is_array)))
    n_super = sum(x.size for x in jax.tree.leaves(dx.split_arch(net)[1]))
    assert 0 < n_discrete < n_super


def test_discretised_seed_network_equals_one_hot_supernet(getkey):
    net = dx.SeedNetwork(4, 2, 5, 1, key=getkey())
    net = eqx.tree_at(lambda m: m.alpha.logits, net, jax.random.normal(getkey(), (1, 5)))
    genotype = dx.derive_genotype(net)
    assert genotype.space == "seed" and genotype.normal[0][0] == net.op_names[int(np.argmax(net.alpha.logits[0]))]
    discrete = dx.discretize(net)
    assert _no_search_parts(discrete)
    x = random_images(getkey(), n=8)
    np.testing.assert_allclose(discrete(x), one_hot_alpha(net, genotype)(x), rtol=1e-4, atol=1e-5)


def test_discretize_rejects_mismatched_genotypes(getkey):
    net = dx.SeedNetwork(4, 1, 5, 1, key=getkey())
    with pytest.raises(ValueError, match="a 'seed' supernet cannot take a 'darts'-space genotype"):
        dx.discretize(net, dx.Genotype.parse(DARTS_V2))
