"""Supernets: their architecture parameters (`Architecture`), and what the search asks of a space
(build the supernet of a config, select its genotype, discretise it), dispatched to the space's
topology so that nothing here names a space."""

import dataclasses

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from . import _parallel
from ._dtype import float_dtype
from ._mixed import ArchLogits, EdgeLogits
from ._spaces import check_image_size, get_space, space_of


class Architecture(eqx.Module):
    """A supernet's architecture parameters: alpha per cell kind (DARTS: `normal` and `reduce`;
    spaces with one kind of cell: `cell`), and with partial channels (PC-DARTS) the
    edge-normalisation logits beta per kind. `weights()` gives each kind's `(softmax(alpha),
    softmax(beta) or None)`, as the skeleton hands them to its cells."""

    alpha: dict[str, ArchLogits]
    beta: dict[str, EdgeLogits] | None = None

    def weights(self) -> dict:
        return {
            kind: (logits.weights(), None if self.beta is None else self.beta[kind].weights())
            for kind, logits in self.alpha.items()
        }


def record_name(part: str, kind: str, kinds: int) -> str:
    """The history record's name of `part` (`alpha`, `beta`) of cell kind `kind`: `alpha` with a
    single kind, `alpha_normal` etc. with several."""
    return part if kinds == 1 else f"{part}_{kind}"


def build_supernet(config, image_shape, num_classes: int, *, key: PRNGKeyArray):
    """The supernet of `config.space` for images of `image_shape` (height, width, channels)."""
    space = get_space(config.space)
    check_image_size(space, config, image_shape[0], image_shape[1])
    return space.topology.supernet(space, config, image_shape, num_classes, key=key)


def derive_genotype(model):
    """The genotype a supernet's architecture parameters select (its space's rule: for the DARTS
    cell, the paper's strongest two edges per node and strongest op per edge, never `none`)."""
    space = space_of(model)
    return space.topology.derive(space, model)


def discretize(model, genotype=None):
    """Turn a supernet into a plain network for `genotype` (default: the one alpha selects).

    Each kept edge becomes the chosen op module with its supernet weights; other edges, mixed ops
    and the architecture parameters are gone. The result computes what the supernet computes when
    the op weights are one-hot on the genotype's ops and zero elsewhere. It still normalises with
    batch statistics; `darts_eqx.train` fine-tunes it (and makes them running statistics).
    """
    space = space_of(model)
    if model.arch is None:
        raise ValueError("discretize expects a supernet; this network has no architecture parameters")
    if genotype is None:
        genotype = space.topology.derive(space, model)
    if getattr(genotype, "space", None) != space.name:
        raise ValueError(
            f"a {space.name!r} supernet cannot take a {getattr(genotype, 'space', type(genotype).__name__)!r}-space "
            "genotype"
        )
    network = space.topology.discretize(space, model, genotype)
    return dataclasses.replace(network, pixel_norm=model.pixel_norm)


def arch_weights(model) -> dict[str, np.ndarray]:
    """softmax(alpha) (and softmax(beta)) of each cell kind, by record name."""
    arch: Architecture = model.arch
    out = {}
    for kind, logits in arch.alpha.items():
        out[record_name("alpha", kind, len(arch.alpha))] = _parallel.fetch(logits.weights())
    for kind, logits in (arch.beta or {}).items():
        out[record_name("beta", kind, len(arch.alpha))] = _parallel.fetch(logits.weights())
    return out


def with_recorded_alpha(supernet, record: dict):
    """`supernet` with the alpha (and beta) whose softmax a history record holds."""
    arch: Architecture = supernet.arch
    for part in ("alpha", "beta"):
        for kind in getattr(arch, part) or {}:
            name = record_name(part, kind, len(arch.alpha))
            if name in record:
                logits = jnp.log(jnp.asarray(record[name], float_dtype()))
                supernet = eqx.tree_at(
                    lambda m, part=part, kind=kind: getattr(m.arch, part)[kind].logits, supernet, logits
                )
    return supernet
