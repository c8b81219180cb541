"""From supernet to plain network: derive the genotype from alpha, then keep on each kept edge the
chosen op module, with the weights it was trained with inside the supernet, and drop the rest."""

from typing import cast

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._cell import OpModule, edge_index
from ._genotype import Genotype, derive_cell
from ._network import Logits, SearchNetwork, SeedNetwork, Stem, classify
from ._ops import Earlier, Images, Output


class DiscreteCell(eqx.Module):
    """A discretised cell: node k is `ops[2k](states[inputs[2k]]) + ops[2k+1](states[inputs[2k+1]])`;
    the output concatenates `states[i]` for `i` in `concat`."""

    preprocess0: OpModule
    preprocess1: OpModule
    ops: tuple[OpModule, ...]
    inputs: tuple[int, ...] = eqx.field(static=True)
    concat: tuple[int, ...] = eqx.field(static=True)
    reduction: bool = eqx.field(static=True)

    def __check_init__(self):
        if len(self.ops) != len(self.inputs) or len(self.ops) % 2:
            raise ValueError(
                f"a discrete cell needs two ops per node, got {len(self.ops)} ops, {len(self.inputs)} inputs"
            )
        for k, i in enumerate(self.inputs):
            if not 0 <= i < k // 2 + 2:
                raise ValueError(f"op {k} of a discrete cell reads state {i}, which node {k // 2} cannot see")

    def __call__(self, s0: Earlier, s1: Images) -> Output:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for k in range(0, len(self.ops), 2):
            a = self.ops[k](states[self.inputs[k]])
            b = self.ops[k + 1](states[self.inputs[k + 1]])
            states.append(a + b)
        return jnp.concatenate([states[i] for i in self.concat], axis=-1)


class DiscreteNetwork(eqx.Module):
    """A DARTS network with one op per kept edge and no architecture parameters."""

    stem: Stem
    cells: tuple[DiscreteCell, ...]
    classifier: eqx.nn.Linear
    genotype: Genotype = eqx.field(static=True)

    def __call__(self, x: Images) -> Logits:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return classify(self.classifier, s1)


class DiscreteSeedNetwork(eqx.Module):
    """The `seed` network with its mixed ops replaced by the chosen op."""

    stem: Stem
    layers: tuple[OpModule, ...]
    classifier: eqx.nn.Linear
    genotype: Genotype = eqx.field(static=True)

    def __call__(self, x: Images) -> Logits:
        h = self.stem(x)
        for layer in self.layers:
            h = layer(h)
        return classify(self.classifier, h)


def derive_genotype(model):
    """The genotype a supernet's alpha selects (the paper's rule; see `derive_cell`; for
    NAS-Bench-201 the strongest op of each edge)."""
    if isinstance(model, SearchNetwork):
        steps, multiplier = model.cells[0].steps, model.cells[0].multiplier
        concat = tuple(range(2 + steps - multiplier, 2 + steps))
        strengths = model.edge_strengths()
        normal = derive_cell(strengths["normal"], model.op_names, steps)
        reduce = derive_cell(strengths["reduce"], model.op_names, steps)
        return Genotype(normal, concat, reduce, concat, space="darts")
    if isinstance(model, SeedNetwork):
        weights = np.asarray(model.alpha.weights()[0])
        if not np.all(np.isfinite(weights)):
            raise ValueError("cannot derive a genotype from non-finite alpha")
        strongest = [i for i in np.argsort(-weights) if model.op_names[i] != "none"][0]
        return Genotype(((model.op_names[int(strongest)], 0),), (1,), (), (), space=model.space_name)
    from .nb201 import NB201Network, derive_nb201_genotype

    if isinstance(model, NB201Network):
        return derive_nb201_genotype(model)
    raise TypeError(f"derive_genotype expects a SearchNetwork, SeedNetwork or NB201Network, got {type(model).__name__}")


def _discretize_cell(cell, gene, concat) -> DiscreteCell:
    steps = len(gene) // 2
    if steps != cell.steps:
        raise ValueError(f"genotype cell has {steps} nodes, the supernet's cells have {cell.steps}")
    if len(concat) != cell.multiplier:
        raise ValueError(
            f"genotype concatenates {len(concat)} nodes, the supernet's cells {cell.multiplier}: "
            "the next cell's input width would not match"
        )
    ops = tuple(cell.edge_op(k // 2, i, op) for k, (op, i) in enumerate(gene))
    return DiscreteCell(
        cell.preprocess0, cell.preprocess1, ops, tuple(i for _, i in gene), tuple(concat), cell.reduction
    )


def discretize(model: SearchNetwork | SeedNetwork, genotype: Genotype | None = None):
    """Turn a supernet into a plain network for `genotype` (default: the one alpha selects).

    Each kept edge becomes the chosen op module with its supernet weights; other edges, mixed ops
    and alpha are gone. The result computes exactly what the supernet computes when softmax(alpha)
    is one-hot on the genotype's ops and on `none` elsewhere.
    """
    if genotype is None:
        # a DARTS or seed supernet's genotype is a `Genotype` (only NB201's is an `NB201Genotype`)
        genotype = cast(Genotype, derive_genotype(model))
    if isinstance(model, SearchNetwork):
        if model.beta_normal is not None:
            raise ValueError(
                "a partial-channel (PC-DARTS) supernet's ops see 1/k of the channels, so its weights do "
                "not fit the full-width network: train the genotype's network from scratch instead (retraining "
                "is not in the library yet)"
            )
        if genotype.space != "darts":
            raise ValueError(f"a DARTS supernet cannot take a {genotype.space!r}-space genotype")
        cells = tuple(
            _discretize_cell(
                cell,
                genotype.reduce if cell.reduction else genotype.normal,
                genotype.reduce_concat if cell.reduction else genotype.normal_concat,
            )
            for cell in model.cells
        )
        return DiscreteNetwork(model.stem, cells, model.classifier, genotype)
    if isinstance(model, SeedNetwork):
        if genotype.space != model.space_name:
            raise ValueError(f"a {model.space_name!r} supernet cannot take a {genotype.space!r}-space genotype")
        index = model.op_names.index(genotype.normal[0][0])
        return DiscreteSeedNetwork(model.stem, tuple(m.ops[index] for m in model.mixed), model.classifier, genotype)
    raise TypeError(f"discretize expects a SearchNetwork or SeedNetwork, got {type(model).__name__}")


def one_hot_alpha(model, genotype: Genotype, scale: float = 100.0):
    """A copy of `model` whose alpha puts softmax weight ~1 on the genotype's op for kept edges
    and on `none` for dropped ones (for checking a discretisation against its supernet)."""
    if isinstance(model, SeedNetwork):
        logits = np.zeros(model.alpha.logits.shape, np.float32)
        logits[0, model.op_names.index(genotype.normal[0][0])] = scale
        return eqx.tree_at(lambda m: m.alpha.logits, model, jnp.asarray(logits))

    def cell_logits(arch, gene):
        logits = np.zeros(arch.logits.shape, np.float32)
        logits[:, model.op_names.index("none")] = scale
        for k, (op, i) in enumerate(gene):
            row = edge_index(k // 2, i)
            logits[row] = 0.0
            logits[row, model.op_names.index(op)] = scale
        return jnp.asarray(logits, dtype=arch.logits.dtype)

    return eqx.tree_at(
        lambda m: (m.alpha_normal.logits, m.alpha_reduce.logits),
        model,
        (cell_logits(model.alpha_normal, genotype.normal), cell_logits(model.alpha_reduce, genotype.reduce)),
    )
