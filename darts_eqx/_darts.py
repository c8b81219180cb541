"""The DARTS CNN search space (Liu et al., ICLR 2019): its eight ops and its cell topology.

The macro network (Sec. 3, App. A.1-A.2): a 3x3 stem to `stem_multiplier * C` channels, `layers`
cells with reductions (stride 2, channels doubled) at layers//3 and 2*layers//3, global pooling and
a linear classifier; the evaluation network adds the auxiliary head after the 2*layers//3 cell.
Every normal cell shares alpha [14, 8], every reduction cell its own.
"""

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PRNGKeyArray

from ._cell import DiscreteCell, PartialChannelOp, SearchCell, edge_index, num_edges, preprocess
from ._genotype import Genotype, derive_cell
from ._mixed import ArchLogits, EdgeLogits
from ._norm import EVAL_NORM, SEARCH_NORM, Normalisation
from ._op_names import DARTS_OPS
from ._ops import dil_conv, pool, sep_conv, skip, zero
from ._skeleton import AuxiliaryHead, CellNetwork, Head, Stem, check_sizes, reduction_layers
from ._spaces import SearchSpace, Topology, get_space, register_space, space
from ._supernet import Architecture


def _cell_plan(channels: int, layers: int, stem_multiplier: int, multiplier: int):
    """`(stem width, [(c_prev_prev, c_prev, c, reduction, reduction_prev)] per cell, last width)`."""
    c_stem = stem_multiplier * channels
    c_prev_prev, c_prev, c_curr = c_stem, c_stem, channels
    reductions = reduction_layers(layers)
    plan, reduction_prev = [], False
    for i in range(layers):
        reduction = i in reductions
        if reduction:
            c_curr *= 2
        plan.append((c_prev_prev, c_prev, c_curr, reduction, reduction_prev))
        reduction_prev = reduction
        c_prev_prev, c_prev = c_prev, multiplier * c_curr
    return c_stem, plan, c_prev


def _kinds(cells) -> tuple[str, ...]:
    return tuple("reduce" if cell.reduction else "normal" for cell in cells)


class DartsTopology(Topology):
    """The DARTS cell: two inputs, `steps` nodes each summing edges from every earlier state,
    output the concatenation of the last `multiplier` nodes. The supernet of the DARTS ops is
    computed by the source-fused cell (`fused=True`); other op sets use the per-edge cell."""

    supports_partial_channels = True
    genotype_form = "cell"

    def reductions(self, config) -> int:
        return len(reduction_layers(config.layers))

    def supernet(self, space, config, image_shape, num_classes, *, key):
        return darts_supernet(
            config.channels,
            config.layers,
            num_classes,
            image_shape[2],
            partial_channels=config.partial_channels,
            space=space,
            key=key,
        )

    def edge_groups(self, supernet):
        steps = supernet.cells[0].steps
        return [
            (kind, [edge_index(node, source) for source in range(node + 2)], 2)
            for kind in ("normal", "reduce")
            for node in range(steps)
        ]

    def derive(self, space, supernet):
        cell = supernet.cells[0]
        concat = tuple(range(2 + cell.steps - cell.multiplier, 2 + cell.steps))
        strengths = edge_strengths(supernet)
        normal = derive_cell(strengths["normal"], space.op_names, cell.steps)
        reduce = derive_cell(strengths["reduce"], space.op_names, cell.steps)
        return Genotype(normal, concat, reduce, concat, space=space.name)

    def discretize(self, space, supernet, genotype):
        cells = tuple(_discretize_cell(cell, genotype) for cell in supernet.cells)
        return CellNetwork(
            supernet.stem, cells, supernet.head, None, None, space.name, (None,) * len(cells), genotype=genotype
        )

    def network(self, space, genotype, channels, layers, num_classes, in_channels, auxiliary, *, key):
        return darts_network(genotype, channels, layers, num_classes, in_channels, auxiliary, space=space, key=key)


DARTS_SPACE = register_space(
    space(
        "darts",
        DARTS_OPS,
        {
            "none": zero,
            "max_pool_3x3": pool("max", normalised_in_search=True),
            "avg_pool_3x3": pool("avg", normalised_in_search=True),
            "skip_connect": skip,
            "sep_conv_3x3": sep_conv(3),
            "sep_conv_5x5": sep_conv(5),
            "dil_conv_3x3": dil_conv(3),
            "dil_conv_5x5": dil_conv(5),
        },
        DartsTopology(),
    )
)


def darts_supernet(
    channels: int = 16,
    layers: int = 8,
    num_classes: int = 10,
    in_channels: int = 3,
    steps: int = 4,
    multiplier: int = 4,
    stem_multiplier: int = 3,
    fused: bool = True,
    partial_channels: int = 1,
    *,
    key: PRNGKeyArray,
    space: SearchSpace = DARTS_SPACE,
) -> CellNetwork:
    """The DARTS CIFAR search network (Liu et al., ICLR 2019, Sec. 3 and App. A.1) over `space`'s
    ops (the DARTS ops by default). With C=16, layers=8, 10 classes and RGB input it has
    1,930,618 weights besides alpha, as the original implementation.

    `fused=True` (default) computes each cell of the DARTS ops source by source (`FusedCell`,
    fast to compile and run); `fused=False`, or another op set, builds per-edge `SearchCell`s of
    `MixedOp`s. Both compute the same function.

    `partial_channels=k > 1` makes it a PC-DARTS supernet (Xu et al., ICLR 2020): each edge sends
    1/k of its channels through the mixed op (so ops are 1/k as wide: about k^2 times fewer
    convolution multiply-adds and k times less activation memory) and the rest around it, and
    every node weighs its incoming edges by softmax(beta).
    """
    check_sizes(channels, layers, in_channels, num_classes)
    k_stem, k_cells, k_cls, k_an, k_ar, k_bn, k_br = jax.random.split(key, 7)
    c_stem, plan, c_last = _cell_plan(channels, layers, stem_multiplier, multiplier)
    fused = fused and space.op_names == DARTS_OPS and space.constructors == DARTS_SPACE.constructors
    cells = []
    for (c_pp, c_p, c, reduction, reduction_prev), k in zip(plan, jax.random.split(k_cells, layers)):
        if fused:
            from ._fused import FusedCell

            cell = FusedCell(c_pp, c_p, c, reduction, reduction_prev, steps, multiplier, partial_channels, key=k)
        else:
            cell = SearchCell(
                space, c_pp, c_p, c, reduction, reduction_prev, steps, multiplier, partial_channels, key=k
            )
        cells.append(cell)
    edges = num_edges(steps)
    alpha = {
        "normal": ArchLogits.init(edges, len(space.op_names), key=k_an),
        "reduce": ArchLogits.init(edges, len(space.op_names), key=k_ar),
    }
    beta = None
    if partial_channels > 1:
        beta = {"normal": EdgeLogits.init(steps, key=k_bn), "reduce": EdgeLogits.init(steps, key=k_br)}
    return CellNetwork(
        Stem(in_channels, c_stem, SEARCH_NORM, key=k_stem),
        tuple(cells),
        Head(c_last, num_classes, key=k_cls),
        None,
        Architecture(alpha, beta),
        space.name,
        _kinds(cells),
    )


def edge_strengths(supernet: CellNetwork) -> dict[str, np.ndarray]:
    """softmax(alpha) of each cell kind, each edge's row scaled by its edge-normalisation weight
    when there is one (PC-DARTS): what the genotype is derived from."""
    out = {}
    for kind, (w, beta) in supernet.arch.weights().items():
        w = np.asarray(w)
        out[kind] = w if beta is None else w * np.asarray(beta)[:, None]
    return out


def _discretize_cell(cell, genotype: Genotype) -> DiscreteCell:
    gene = genotype.reduce if cell.reduction else genotype.normal
    concat = genotype.reduce_concat if cell.reduction else genotype.normal_concat
    steps = len(gene) // 2
    if steps != cell.steps:
        raise ValueError(f"genotype cell has {steps} nodes, the supernet's cells have {cell.steps}")
    if len(concat) != cell.multiplier:
        raise ValueError(
            f"genotype concatenates {len(concat)} nodes, the supernet's cells {cell.multiplier}: "
            "the next cell's input width would not match"
        )
    ops = []
    for k, (op, i) in enumerate(gene):
        module = cell.edge_op(k // 2, i, op)
        if cell.partial_channels > 1:
            module = PartialChannelOp(module, cell.partial_channels, 2 if cell.reduction and i < 2 else 1)
        ops.append(module)
    inputs = tuple(i for _, i in gene)
    return DiscreteCell(cell.preprocess0, cell.preprocess1, tuple(ops), inputs, tuple(concat), cell.reduction)


def darts_network(
    genotype: Genotype,
    channels: int,
    layers: int,
    num_classes: int,
    in_channels: int = 3,
    auxiliary: bool = False,
    *,
    key: PRNGKeyArray,
    space: SearchSpace = DARTS_SPACE,
):
    """`(network, state)`: `genotype` as a network to train from scratch (Liu et al., 2019, Sec. 3.2,
    App. A.2; the original's `NetworkCIFAR`): the DARTS skeleton with `genotype`'s ops on each
    cell, affine batch norm with running statistics (`state`), and optionally the auxiliary head."""
    if genotype.space != space.name:
        raise ValueError(f"a {space.name}-space network needs a {space.name}-space genotype, got {genotype.space!r}")
    if isinstance(layers, bool) or not isinstance(layers, int) or len(set(reduction_layers(layers))) < 2:
        raise ValueError(
            f"layers (={layers!r}) must be an integer >= 2: the two reduction cells sit at layers//3 "
            "and 2*layers//3, which must differ"
        )
    check_sizes(channels, layers, in_channels, num_classes)
    return eqx.nn.make_with_state(_darts_network)(
        genotype, channels, layers, num_classes, in_channels, auxiliary, space, key=key
    )


def _darts_network(genotype, channels, layers, num_classes, in_channels, auxiliary, space, *, key):
    k_stem, k_cells, k_aux, k_cls = jax.random.split(key, 4)
    c_stem, plan, c_last = _cell_plan(channels, layers, 3, len(genotype.normal_concat))
    cells, head = [], None
    auxiliary_after = 2 * layers // 3
    for i, ((c_pp, c_p, c, reduction, reduction_prev), k) in enumerate(zip(plan, jax.random.split(k_cells, layers))):
        cells.append(_eval_cell(space, genotype, c_pp, c_p, c, reduction, reduction_prev, EVAL_NORM, key=k))
        if auxiliary and i == auxiliary_after:
            c_out = len(genotype.reduce_concat if reduction else genotype.normal_concat) * c
            head = AuxiliaryHead(c_out, num_classes, EVAL_NORM, key=k_aux)
    return CellNetwork(
        Stem(in_channels, c_stem, EVAL_NORM, key=k_stem),
        tuple(cells),
        Head(c_last, num_classes, key=k_cls),
        head,
        None,
        space.name,
        (None,) * len(cells),
        auxiliary_after,
        genotype,
    )


def _eval_cell(space, genotype, c_prev_prev, c_prev, channels, reduction, reduction_prev, norm: Normalisation, *, key):
    k0, k1, kops = jax.random.split(key, 3)
    gene = genotype.reduce if reduction else genotype.normal
    concat = genotype.reduce_concat if reduction else genotype.normal_concat
    keys = jax.random.split(kops, len(gene))
    ops = tuple(
        space.make_op(op, channels, 2 if reduction and i < 2 else 1, norm, key=k) for (op, i), k in zip(gene, keys)
    )
    return DiscreteCell(
        preprocess(c_prev_prev, channels, reduction_prev, norm, key=k0),
        preprocess(c_prev, channels, False, norm, key=k1),
        ops,
        tuple(i for _, i in gene),
        tuple(concat),
        reduction,
    )


def one_hot_alpha(supernet: CellNetwork, genotype: Genotype, scale: float = 100.0) -> CellNetwork:
    """A copy of a DARTS `supernet` whose alpha puts softmax weight ~1 on the genotype's op for
    kept edges and on `none` for dropped ones (for checking a discretisation against it)."""
    op_names = get_space(supernet.space).op_names

    def cell_logits(arch: ArchLogits, gene):
        logits = np.zeros(arch.logits.shape, np.float32)
        logits[:, op_names.index("none")] = scale
        for k, (op, i) in enumerate(gene):
            row = edge_index(k // 2, i)
            logits[row] = 0.0
            logits[row, op_names.index(op)] = scale
        return jax.numpy.asarray(logits, dtype=arch.logits.dtype)

    alpha = supernet.arch.alpha
    return eqx.tree_at(
        lambda m: (m.arch.alpha["normal"].logits, m.arch.alpha["reduce"].logits),
        supernet,
        (cell_logits(alpha["normal"], genotype.normal), cell_logits(alpha["reduce"], genotype.reduce)),
    )
