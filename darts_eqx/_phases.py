"""A search step as phases of the supernet's gradient, and the two ways to trace them.

Each estimator writes its step once, as `Phases`: a phase is a row of values (a `NamedTuple` with
at least `batch`, the batch it evaluates on, `TRAIN` or `VAL`, and `weight_gradient`, whether it
keeps grad_w), and its estimator says where the row evaluates the gradient of L(w, alpha; batch)
in (w, alpha) (`at`), how the forward pass sees alpha there (`view_of`) and what it keeps of the
gradient (`keep`). How the phases are traced is an execution choice (`Execution.shared_trace`),
made here alone (`run_phases`):

- one by one: each phase is traced with its row as Python values, so it computes only what it
  keeps. Every phase calls one jitted gradient of (w, alpha), traced and lowered once for the
  phases of equal shapes; XLA inlines each call and drops the gradient the phase does not keep. A
  group of phases at points the group itself does not move runs as one `lax.map` over the fields
  in which they differ: one compiled copy of the supernet's backward pass for all of them; there it
  differentiates only what the group keeps (XLA does not drop an unused gradient inside a loop).
- shared: one `lax.scan` over the stacked rows of one traced gradient, so XLA compiles the
  supernet's backward pass once; in the phases that keep alpha's gradient alone the convolutions'
  and pointwise matmuls' weight gradients are gated off (`kernel_gradient_gate`). The same step up
  to floating-point rounding (tested); the trade-off is in experiments/RESULTS.md.

An estimator reads a row's fields through `choose`, `either`, `cond` and `may_be`, so that one
text serves both: a field known while tracing (all fields of a phase run on its own, and those
that all phases run together share) decides there; a traced one selects elementwise.
"""

import abc
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._conv import kernel_gradient_gate
from ._loss import supernet_loss
from ._state import forward_key

TRAIN, VAL = 0, 1  # a phase's `batch`


def known(value) -> bool:
    """Whether a row's field is fixed while tracing (its phase traced on its own), not traced."""
    return isinstance(value, (bool, int, float, np.generic))


def may_be(value, wanted) -> bool:
    """False only when `value` is known and is not `wanted`: whether the phase may need what a
    test `value == wanted` guards (under a shared trace every phase computes it)."""
    return not known(value) or value == wanted


def choose(pick, new, old):
    """Per leaf, `new` where `pick` else `old`."""
    if known(pick):
        return new if pick else old
    return jax.tree.map(lambda n, o: jnp.where(pick, n, o), new, old)


def either(pick, new: Callable, old: Callable):
    """`new()` where `pick` else `old()`; a known `pick` computes only the one it picks."""
    if known(pick):
        return new() if pick else old()
    return choose(pick, new(), old())


def cond(pick, true_fn: Callable, false_fn: Callable, operand):
    """`lax.cond(pick, true_fn, false_fn, operand)`, or the branch a known `pick` picks."""
    if known(pick):
        return (true_fn if pick else false_fn)(operand)
    return lax.cond(pick, true_fn, false_fn, operand)


class Phases(abc.ABC):
    """An estimator's step as phases (see the module docstring). `groups` lists the phase rows in
    order; the phases of one group evaluate at points that the group's own `keep`s do not move,
    and have the same `batch`, `weight_gradient` and `view_of`."""

    groups: tuple[tuple[Any, ...], ...]

    @abc.abstractmethod
    def start(self, shared: bool) -> Any:
        """The carry before the first phase (under a shared trace, with the shapes it keeps)."""

    @abc.abstractmethod
    def at(self, carry, phase) -> tuple[Any, Any]:
        """`(weights, arch)` at which `phase` evaluates the gradient."""

    @abc.abstractmethod
    def keep(self, carry, phase, value, grads) -> tuple[Any, Any]:
        """`(carry, out)` after `phase`, from `value = (loss, acc)` and `grads = (grad_w, grad_alpha)`
        (`grad_w` is None where a phase traced on its own does not keep it)."""

    def view_of(self, phase) -> Callable | None:
        """`view(arch, step, key)`: alpha as `phase`'s forward pass sees it, or None for alpha
        itself. For known rows, the same function for every phase it serves."""
        return None

    def evaluate(self, carry, phase) -> tuple[Any, Any] | None:
        """`(value, grads)` of a phase that is not the supernet's gradient at a point (an
        estimator's own, traced on its own only), or None."""
        return None

    @abc.abstractmethod
    def finish(self, carry, outs) -> Any:
        """What the phases give: from the last carry and each phase's `out` (`run_phases`)."""


def run_phases(phases: Phases, static, batches: Sequence, *, shared: bool, state=None):
    """`phases.finish(carry, outs)` after running `phases` on `batches = (train, val)` as one
    shared trace or one by one (module docstring). `outs` holds each phase's `out`: stacked under
    a shared trace, else a tuple per field of a tuple `out`; None if the phases give none.
    `state` (a `SearchState`) gives each view its step and relaxation key."""
    run = _shared if shared else _one_by_one
    return phases.finish(*run(phases, phases.start(shared), static, batches, state))


def _shared(phases: Phases, carry, static, batches, state):
    rows = [phase for group in phases.groups for phase in group]
    known_fields, traced_fields = _split(rows)
    stacked_batches = jax.tree.map(lambda *b: jnp.stack(b), *[batches[phase.batch] for phase in rows])

    def body(carry, inputs):
        traced, (x, y) = inputs
        phase = _merged(known_fields, traced)
        weights, arch = phases.at(carry, phase)
        view = phases.view_of(phase)
        step, key = _view_inputs(view, phase, state)
        with kernel_gradient_gate(jnp.asarray(phase.weight_gradient).astype(jnp.float32)):
            value, grads = eqx.filter_value_and_grad(
                lambda wa: supernet_loss(_seen(view, wa[1], step, key), wa[0], static, x, y), has_aux=True
            )((weights, arch))
        return phases.keep(carry, phase, value, grads)

    return lax.scan(body, carry, (traced_fields, stacked_batches))


def _one_by_one(phases: Phases, carry, static, batches, state):
    gradients: dict[Any, Callable] = {}  # one jitted gradient per view: the phases share its trace

    def gradient(phase):
        view = phases.view_of(phase)
        if view not in gradients:
            gradients[view] = _loss_gradient(static, view)
        return gradients[view]

    outs = []
    for group in phases.groups:
        for phase, (value, grads) in zip(group, _evaluated(phases, carry, group, gradient, batches, static, state)):
            carry, out = phases.keep(carry, phase, value, grads)
            outs.append(out)
    return carry, None if all(out is None for out in outs) else tuple(zip(*outs))


def _evaluated(phases: Phases, carry, group, gradient, batches, static, state):
    """`(value, grads)` of each phase of `group`, traced on its own or, for several, as one `lax.map`."""
    first = group[0]
    loss_gradient, batch = gradient(first), batches[first.batch]
    if len(group) == 1:
        own = phases.evaluate(carry, first)
        if own is not None:
            return [own]
        return [loss_gradient(*phases.at(carry, first), *_view_inputs(phases.view_of(first), first, state), *batch)]

    known_fields, traced_fields = _split(group)
    view = phases.view_of(first)

    def gradient_at(traced):
        phase = _merged(known_fields, traced)
        weights, arch = phases.at(carry, phase)
        step, key = _view_inputs(view, phase, state)
        if first.weight_gradient:
            return loss_gradient(weights, arch, step, key, *batch)
        # Inside a loop XLA does not drop the half of a gradient that is not used: take alpha's alone.
        value, a_grads = eqx.filter_value_and_grad(
            lambda a: supernet_loss(_seen(view, a, step, key), weights, static, *batch), has_aux=True
        )(arch)
        return value, (None, a_grads)

    both = lax.map(gradient_at, traced_fields)
    return [jax.tree.map(lambda v: v[i], both) for i in range(len(group))]


def _view_inputs(view, phase, state):
    """`(step, key)` that `view` reads in `phase`, its relaxation key the phase's own (None, None
    without a view)."""
    if view is None:
        return None, None
    return state.step, forward_key(state, phase.number)


def _seen(view, arch, step, key):
    return arch if view is None else view(arch, step, key)


def _split(rows):
    """`(known, traced)`: the fields that all `rows` share, as Python values, and the others
    stacked into arrays, each a row with the rest None. `batch` picks the data: it is never traced."""
    differ = [f for f in rows[0]._fields if any(getattr(row, f) != getattr(rows[0], f) for row in rows)]
    known_fields = rows[0]._replace(**{f: None for f in differ})
    stacked = {f: jnp.asarray(np.asarray([getattr(row, f) for row in rows])) for f in differ if f != "batch"}
    return known_fields, rows[0]._replace(**{f: stacked.get(f) for f in rows[0]._fields})


def _merged(known_fields, traced):
    """A row from `_split`'s two halves."""
    return known_fields._replace(**{f: v for f, v in traced._asdict().items() if v is not None})


def _loss_gradient(static, view):
    """`loss_gradient(weights, arch, step, key, x, y) -> ((loss, acc), (grad_w, grad_alpha))`,
    jitted, alpha seen through `view(arch, step, key)` if given. Called by several phases with the
    same shapes, it is traced and lowered once; XLA inlines each call and drops the gradient that
    call does not use, so the step computes what separately traced gradients compute, with less
    tracing and lowering (experiments/RESULTS.md)."""

    @jax.jit
    def loss_gradient(weights, arch, step, key, x, y):
        def loss(wa):
            return supernet_loss(_seen(view, wa[1], step, key), wa[0], static, x, y)

        return eqx.filter_value_and_grad(loss, has_aux=True)((weights, arch))

    return loss_gradient
