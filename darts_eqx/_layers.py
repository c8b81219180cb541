"""The layered topology: a stack of mixed ops that keep the image size and width, all sharing one
alpha [1, ops]; and the `seed` space on it (identity, ReLU-conv-BN 3x3 and 5x5, average and max
pool), the smallest composable example. A space given without a topology gets this one.
"""

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PRNGKeyArray

from ._cell import OpModule
from ._dtype import float_dtype
from ._genotype import Genotype
from ._mixed import ArchLogits, MixedOp
from ._norm import EVAL_NORM, SEARCH_NORM
from ._op_names import SEED_OPS
from ._ops import pool, relu_conv_bn, skip
from ._skeleton import CellNetwork, DropPath, Head, Stem, check_sizes
from ._spaces import SearchSpace, Topology, register_space, space
from ._supernet import Architecture


class MixedLayer(eqx.Module):
    """A layer of the layered supernet: one mixed op on the previous layer's output."""

    mixed: MixedOp

    def __call__(self, s0, s1, weights, state=None, drop: DropPath | None = None):
        return self.mixed(s1, weights[0][0]), state


class OpLayer(eqx.Module):
    """A layer of a discrete layered network: one op on the previous layer's output."""

    op: OpModule

    def __call__(self, s0, s1, weights=None, state=None, drop: DropPath | None = None):
        return self.op(s1, state)


class LayerTopology(Topology):
    """stem -> `layers` mixed ops (stride 1, same width) sharing alpha [1, ops] -> pool, linear.
    Its genotype is the one op kept (never `none`), used by every layer."""

    genotype_form = "single"

    def supernet(self, space, config, image_shape, num_classes, *, key):
        model = layered_supernet(config.channels, config.layers, num_classes, image_shape[2], space=space, key=key)
        _check_op_shapes(model, space, image_shape[0], image_shape[1])
        return model

    def derive(self, space, supernet):
        weights = np.asarray(supernet.arch.alpha["cell"].weights()[0])
        if not np.all(np.isfinite(weights)):
            raise ValueError("cannot derive a genotype from non-finite alpha")
        strongest = [i for i in np.argsort(-weights) if space.op_names[i] != space.droppable][0]
        return Genotype(((space.op_names[int(strongest)], 0),), (1,), (), (), space=space.name)

    def discretize(self, space, supernet, genotype):
        index = space.op_names.index(genotype.normal[0][0])
        layers = tuple(OpLayer(cell.mixed.ops[index]) for cell in supernet.cells)
        return CellNetwork(
            supernet.stem, layers, supernet.head, None, None, space.name, (None,) * len(layers), genotype=genotype
        )

    def network(self, space, genotype, channels, layers, num_classes, in_channels, auxiliary, *, key):
        # no auxiliary head in this topology: `auxiliary` is ignored
        check_sizes(channels, layers, in_channels, num_classes)

        def build(*, key):
            k_stem, k_ops, k_cls = jax.random.split(key, 3)
            op = genotype.normal[0][0]
            cells = tuple(
                OpLayer(space.make_op(op, channels, 1, EVAL_NORM, key=k)) for k in jax.random.split(k_ops, layers)
            )
            return CellNetwork(
                Stem(in_channels, channels, EVAL_NORM, key=k_stem),
                cells,
                Head(channels, num_classes, key=k_cls),
                None,
                None,
                space.name,
                (None,) * layers,
                genotype=genotype,
            )

        return eqx.nn.make_with_state(build)(key=key)


SEED_SPACE = register_space(
    space(
        "seed",
        SEED_OPS,
        {
            "skip_connect": skip,
            "conv_3x3": relu_conv_bn(3),
            "conv_5x5": relu_conv_bn(5),
            "avg_pool_3x3": pool("avg", normalised_in_search=True),
            "max_pool_3x3": pool("max", normalised_in_search=True),
        },
        LayerTopology(),
    )
)


def layered_supernet(
    channels: int = 16,
    layers: int = 2,
    num_classes: int = 10,
    in_channels: int = 3,
    *,
    key: PRNGKeyArray,
    space: SearchSpace = SEED_SPACE,
) -> CellNetwork:
    """stem, then `layers` mixed ops over `space` (default the `seed` space) all sharing one alpha
    [1, ops], then global pool and linear."""
    check_sizes(channels, layers, in_channels, num_classes)
    k_stem, k_mixed, k_cls, k_alpha = jax.random.split(key, 4)
    cells = tuple(MixedLayer(MixedOp(space, channels, 1, key=k)) for k in jax.random.split(k_mixed, layers))
    return CellNetwork(
        Stem(in_channels, channels, SEARCH_NORM, key=k_stem),
        cells,
        Head(channels, num_classes, key=k_cls),
        None,
        Architecture({"cell": ArchLogits.init(1, len(space.op_names), key=k_alpha)}),
        space.name,
        ("cell",) * layers,
    )


def _check_op_shapes(model: CellNetwork, space: SearchSpace, height: int, width: int) -> None:
    """Every op of a (custom) space must keep an NHWC batch's shape: checked abstractly, before
    anything is compiled, naming the op that does not."""
    x = jax.ShapeDtypeStruct((2, height, width, model.stem.norm.channels), float_dtype())
    for name, op in zip(space.op_names, model.cells[0].mixed.ops):
        try:
            out = eqx.filter_eval_shape(op, x, None)
        except Exception as e:  # a user's op may fail in any way: name it
            raise ValueError(f"op {name!r} of space {space.name!r} fails on a {x.shape} batch: {e}") from None
        shape = getattr(out[0], "shape", None) if isinstance(out, tuple) and len(out) == 2 else None
        if shape != x.shape:
            raise ValueError(
                f"op {name!r} of space {space.name!r} maps a {x.shape} batch to "
                f"{shape or type(out).__name__}: ops must return `(y, state)` with y of the input's shape"
            )
