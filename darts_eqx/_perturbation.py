"""DARTS-PT: the architecture selected by how much each op matters to the trained supernet, not by
the size of its alpha (Wang et al., ICLR 2021, Alg. 1), on the supernet of any method.

Edge by edge in random order: remove each candidate op of the edge in turn (its weight set to 0)
and measure the supernet's accuracy on the validation half; keep the op whose removal costs most
accuracy (the edge is then one-hot on it); fine-tune the supernet (weights and alpha, first-order
DARTS with the weight lr at a tenth, constant) for `tune_epochs` epochs before the next edge.
Scoring and fine-tuning see softmax(alpha) on the edges not yet decided, whatever the method
trained the supernet (a GDAS or FairDARTS supernet is scored as a softmax one). In a topology that
also chooses edges (the DARTS cell: two inputs per node), each node then keeps the incoming edges
whose removal costs most accuracy, measured once after the last op. This follows the authors'
NAS-Bench-201 procedure; in the DARTS space they decide a normal and a reduction edge per round
(5 epochs apart, the lr annealed from a tenth) and fine-tune between the nodes' edge decisions too.
Fine-tuning crops and flips its batches as the search does (`augment`); the scores are measured on
the unaugmented validation half, so that they are deterministic (the authors' scoring batches are
augmented). The selection is not checkpointed: a search killed during it selects again when resumed.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._augment import search_augmentation
from ._execution import Execution
from ._loop import Schedule
from ._loss import supernet_loss
from ._mixed import FixedWeights, combine_arch, split_arch
from ._optim import arch_optimizer, weight_optimizer
from ._spaces import space_of
from ._state import initial_state
from ._step import make_chunk_fn
from ._supernet import derive_genotype

DEFAULT_TUNE_EPOCHS = 5  # the authors' NAS-Bench-201 interval (10 in the DARTS space)


def perturbation_select(
    supernet, config, images, labels, schedule: Schedule, *, key, execution: Execution, tune_epochs=None
):
    """`(genotype, tuned supernet)` of DARTS-PT on `supernet` (see the module docstring), with the
    search's data on device (`images`, `labels`) and its split and batches (`schedule`).
    `tune_epochs` defaults to the authors': 10 where the topology also chooses edges, else 5."""
    space = space_of(supernet)
    groups = space.topology.edge_groups(supernet)
    if tune_epochs is None:
        tune_epochs = 2 * DEFAULT_TUNE_EPOCHS if groups else DEFAULT_TUNE_EPOCHS
    arch, weights, static = split_arch(supernet)
    kinds = list(arch.arch.alpha)
    choices = {kind: np.full(arch.arch.alpha[kind].logits.shape[0], -1) for kind in kinds}
    candidates = [i for i, op in enumerate(space.op_names) if op != space.droppable or space.topology.chooses_droppable]
    val = _batches(images, labels, schedule)
    order = [(kinds[int(k)], int(e)) for k, e in np.asarray(jax.random.permutation(key, _pairs(choices)))]
    tune_config = config.replace(w_lr=config.w_lr / 10, w_lr_min=config.w_lr / 10)
    w_opt, a_opt = weight_optimizer(tune_config, schedule.steps_per_epoch), arch_optimizer(config)
    own_weights, own_arch = jax.tree.map(jnp.copy, (weights, arch))  # the chunk donates its state's buffers
    state = initial_state(own_weights, own_arch, w_opt, a_opt, jax.random.fold_in(key, 1))
    chunk = make_chunk_fn(static, w_opt, a_opt, execution, augment=search_augmentation(config))
    for round_, (kind, edge) in enumerate(order):
        base = projected(state.arch, choices)
        scores = [_accuracy(state, static, _without(base, kind, edge, op), val) for op in candidates]
        choices[kind][edge] = candidates[int(np.argmin(scores))]  # removal costs most accuracy
        state = _decided(state, kind, edge, int(choices[kind][edge]))
        if round_ < len(order) - 1:
            for epoch in range(round_ * tune_epochs, (round_ + 1) * tune_epochs):
                train_idx, val_idx = schedule.indices(epoch, host=False)
                for c in range(schedule.chunks):
                    state, _ = chunk((images, labels, train_idx[c], val_idx[c]), state)
    strengths = _edge_strengths(state, static, choices, val, groups)
    tuned = combine_arch(state.arch, state.weights, static)
    # the decided ops and edges alone (without PC-DARTS' edge weights)
    chosen = eqx.tree_at(lambda a: a.alpha, tuned.arch, {k: FixedWeights(jnp.asarray(v)) for k, v in strengths.items()})
    if chosen.beta is not None:
        chosen = eqx.tree_at(lambda a: a.beta, chosen, None)
    return derive_genotype(eqx.tree_at(lambda m: m.arch, tuned, chosen)), tuned


def _pairs(choices) -> np.ndarray:
    return np.array([(k, e) for k, kind in enumerate(choices) for e in range(len(choices[kind]))])


def projected(arch, choices) -> dict:
    """softmax(alpha) of each kind (`arch`: a supernet's architecture part, `split_arch`) with
    every decided edge one-hot on its op."""
    out = {}
    for kind, logits in arch.arch.alpha.items():
        w = jax.nn.softmax(logits.logits, axis=-1)
        decided = jnp.asarray(choices[kind] >= 0)[:, None]
        out[kind] = jnp.where(decided, jax.nn.one_hot(np.maximum(choices[kind], 0), w.shape[-1], dtype=w.dtype), w)
    return out


def _decided(state, kind: str, edge: int, op: int):
    """`state` with alpha's row of `edge` so far apart (0 on `op`, -1e9 elsewhere) that its softmax
    is one-hot on `op` through the fine-tuning (Adam moves it by about its lr a step): the
    fine-tuning's step stays one compiled program for every round."""
    logits = state.arch.arch.alpha[kind].logits
    row = jnp.full(logits.shape[-1], -1e9, logits.dtype).at[op].set(0.0)
    return eqx.tree_at(lambda s: s.arch.arch.alpha[kind].logits, state, logits.at[edge].set(row))


def _without(weights: dict, kind: str, edge: int, op: int | None) -> dict:
    """`weights` with op `op` of `edge` (all its ops when None) set to zero."""
    row = weights[kind][edge]
    row = jnp.zeros_like(row) if op is None else row.at[op].set(0.0)
    return {**weights, kind: weights[kind].at[edge].set(row)}


def _batches(images, labels, schedule: Schedule) -> list:
    pool = np.asarray(schedule.val_pool)
    size = schedule.batch_size
    return [(images[pool[i : i + size]], labels[pool[i : i + size]]) for i in range(0, len(pool) - size + 1, size)]


@eqx.filter_jit
def _batch_accuracy(arch, weights, static, op_weights, x, y):
    seen = eqx.tree_at(lambda a: a.arch.alpha, arch, {k: FixedWeights(w) for k, w in op_weights.items()})
    return supernet_loss(seen, weights, static, x, y)[1]


def _accuracy(state, static, op_weights, batches) -> float:
    """The supernet's accuracy over `batches` with the op weights `op_weights` (by cell kind)."""
    return float(np.mean([_batch_accuracy(state.arch, state.weights, static, op_weights, x, y) for x, y in batches]))


def _edge_strengths(state, static, choices, val, groups: Sequence | None) -> dict:
    """One-hot rows on the chosen ops; in each group of edges `(kind, rows, keep)` that the topology
    chooses among, the `keep` edges whose removal costs most accuracy weigh 2, the others 1."""
    chosen = projected(state.arch, choices)
    base = {k: np.array(w) for k, w in chosen.items()}
    for kind, rows, keep in groups or ():
        scores = [_accuracy(state, static, _without(chosen, kind, int(r), None), val) for r in rows]
        for rank, r in enumerate(np.asarray(rows)[np.argsort(scores)]):
            base[kind][r] *= 2.0 if rank < keep else 1.0
    return base
