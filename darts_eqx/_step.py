"""One DARTS search step, and a chunk of steps fused into one `lax.scan`.

Per step: one Adam step on alpha with the gradient of the loss on a validation batch (first order),
or of the loss after one virtual weight step (second order, `_second_order`), then one SGD step on
the weights with the gradient of the loss on a training batch (Liu et al., 2019, Alg. 1). Each
estimator's step is written once, as phases of the supernet's gradient (`_phases`): first order,
and any estimator given as a function (the exact one), as `Alternation`; finite differences as
`FiniteDifferenceStep`. Whether the phases share one trace is the execution's choice.
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from . import _parallel
from ._config import SearchConfig
from ._execution import Execution
from ._loss import supernet_loss
from ._optim import epoch_lr
from ._phases import TRAIN, VAL, Phases, cond, either, may_be, run_phases
from ._second_order import FiniteDifferenceStep, arch_gradient, momentum_buffer
from ._state import (
    SearchState,
    StepMetrics,
    alpha_update,
    augmentation_keys,
    forward_key,
    regularised,
    weight_update,
)


def search_step(
    state: SearchState,
    static,
    w_opt,
    a_opt,
    train_batch,
    val_batch,
    arch_grad=None,
    arch_reg=None,
    arch_view=None,
    shared_trace: bool = False,
    weight_view=None,
):
    """One DARTS step: alpha on `val_batch`, then weights on `train_batch`. First order unless
    `arch_grad(state, static, train_batch, val_batch) -> ((val_loss, val_acc), grads)` is given
    (see `second_order_gradient`); `arch_reg(arch, step)`, a regulariser of alpha alone, is added
    to the validation loss (its gradient to alpha's); `arch_view(arch, step, key)` is alpha as the
    supernet's forward passes see it (a method's relaxation, with the pass's own PRNG key,
    `forward_key`): both passes in first order, the weight step's in second order;
    `weight_view(arch, step, key, loss)`, where given, is alpha as the weight step alone sees it
    (a method's perturbation, `MethodParts`), traced one phase at a time. With
    `shared_trace`, the step traces the supernet's gradient once for all its phases (first order:
    the alpha and the weight step; second order with finite differences: the virtual step, the
    gradient at w', the two at w+- and the weight step; `_phases`): the same step up to
    floating-point rounding."""
    batches = (train_batch, val_batch)
    finite_difference = isinstance(arch_grad, UnrolledGradient) and arch_grad.config.estimator == "finite_difference"
    if weight_view is not None and (shared_trace or finite_difference):
        raise ValueError(
            "a method that perturbs the weight step's op weights runs its phases one by one "
            "(shared_trace=False) and not with the finite-difference estimator"
        )
    if isinstance(arch_grad, UnrolledGradient) and finite_difference:
        phases = arch_grad.step(state, w_opt, a_opt, arch_reg, arch_view)
    elif shared_trace and arch_grad is not None:
        raise ValueError(
            "shared_trace with a second-order gradient needs `second_order_gradient(config, ...)` with "
            "estimator 'finite_difference' (the exact one differentiates through the virtual step), "
            f"got {arch_grad!r}"
        )
    else:
        phases = Alternation(state, static, w_opt, a_opt, batches, arch_grad, arch_reg, arch_view, weight_view)
    return run_phases(phases, static, batches, shared=shared_trace, state=state)


class AlternationPhase(NamedTuple):
    """A phase of `Alternation`."""

    batch: int
    weight_gradient: bool  # the weights' phase, else alpha's

    @property
    def number(self):
        """Which forward pass of the step it is (for its relaxation key)."""
        return self.weight_gradient


ALPHA_PHASE, WEIGHT_PHASE = AlternationPhase(VAL, False), AlternationPhase(TRAIN, True)


@dataclass(frozen=True)
class Alternation(Phases):
    """The paper's alternation as two phases from `state`: alpha's step (`a_opt`), then the
    weights' step (`w_opt`) on the training batch at the new alpha, both passes seeing alpha
    through `view` (if given). Alpha's gradient is the supernet's on the validation batch (first
    order), or `estimator(state, static, train_batch, val_batch) -> ((val_loss, val_acc), grads)`
    (the exact second-order one, or a plug-in's; no shared trace), plus that of `arch_reg`. With
    `weight_view` the weights' step sees alpha through it instead of `view`. The
    carry is the whole `SearchState`; under a shared trace a `lax.cond` picks each phase's update
    (experiments/RESULTS.md)."""

    state: SearchState
    static: Any
    w_opt: Any
    a_opt: Any
    batches: tuple
    estimator: Callable | None = None
    arch_reg: Callable | None = None
    view: Callable | None = None
    weight_view: Callable | None = None

    groups = ((ALPHA_PHASE,), (WEIGHT_PHASE,))

    def start(self, shared: bool) -> SearchState:
        return self.state

    def at(self, state: SearchState, phase):
        if self.weight_view is None or not phase.weight_gradient:
            return state.weights, state.arch

        def loss(arch):
            return supernet_loss(arch, state.weights, self.static, *self.batches[TRAIN])[0]

        return state.weights, self.weight_view(state.arch, state.step, forward_key(state, phase.number), loss)

    def view_of(self, phase):
        return None if self.weight_view is not None and phase.weight_gradient else self.view

    def evaluate(self, state: SearchState, phase):
        if self.estimator is None or phase.weight_gradient:
            return None
        value, a_grads = self.estimator(state, self.static, *self.batches)
        return value, (None, a_grads)

    def keep(self, state: SearchState, phase, value, grads):
        (loss, acc), (w_grads, a_grads) = value, grads
        weight_phase = phase.weight_gradient
        if may_be(weight_phase, False):
            a_grads = regularised(a_grads, state, self.arch_reg)
        state = cond(
            weight_phase,
            lambda s: weight_update(s, self.w_opt, w_grads),
            lambda s: alpha_update(s, self.a_opt, a_grads),
            state,
        )
        # before clipping: for the NaN guard
        norm = either(weight_phase, lambda: optax.tree.norm(w_grads), lambda: optax.tree.norm(a_grads))
        return state, (loss, acc, norm)

    def finish(self, state: SearchState, outs):
        loss, acc, norm = outs
        state = dataclasses.replace(state, step=state.step + 1)
        return state, StepMetrics(loss[1], acc[1], loss[0], acc[0], norm[1], norm[0])


@dataclass(frozen=True)
class UnrolledGradient:
    """The `arch_grad` of `search_step` for `config.order == 2`: `arch_gradient` with the weight
    optimiser's own virtual step (its momentum buffer, momentum, weight decay; xi = its lr now)."""

    config: SearchConfig
    steps_per_epoch: int

    def xi(self, state: SearchState):
        config = self.config
        return config.xi if config.xi is not None else epoch_lr(config, state.step // self.steps_per_epoch)

    def step(self, state: SearchState, w_opt, a_opt, arch_reg, view) -> FiniteDifferenceStep:
        """`search_step` with this gradient, by finite differences, as phases."""
        config, dtype = self.config, jax.tree.leaves(state.weights)[0].dtype
        xi, buffer = jnp.asarray(self.xi(state), dtype), momentum_buffer(state.w_opt_state)
        return FiniteDifferenceStep(
            state.weights,
            state.arch,
            xi,
            config.w_momentum,
            config.w_weight_decay,
            buffer,
            state=state,
            w_opt=w_opt,
            a_opt=a_opt,
            arch_reg=arch_reg,
            view=view,
        )

    def __call__(self, state: SearchState, static, train_batch, val_batch):
        return arch_gradient(
            state.arch,
            state.weights,
            static,
            train_batch,
            val_batch,
            xi=self.xi(state),
            momentum=self.config.w_momentum,
            weight_decay=self.config.w_weight_decay,
            buffer=momentum_buffer(state.w_opt_state),
            estimator=self.config.estimator,
        )


def second_order_gradient(config: SearchConfig, steps_per_epoch: int) -> UnrolledGradient:
    """The `arch_grad` of `search_step` for `config.order == 2` (see `UnrolledGradient`)."""
    return UnrolledGradient(config, steps_per_epoch)


def make_chunk_fn(
    static,
    w_opt,
    a_opt,
    execution: Execution,
    *,
    mesh=None,
    arch_grad=None,
    arch_reg=None,
    arch_view=None,
    weight_view=None,
    augment=None,
):
    """A jitted `chunk((images, labels, train_idx, val_idx), state) -> (state, metrics)` that
    runs one search step per row of the index arrays `[steps, batch]` inside a `lax.scan`, traced
    and compiled as the resolved `execution` says. The data stays on device and only indices
    change per call, so nothing recompiles; the state's buffers are donated, so a chunk does not
    hold two copies of the supernet. With a `mesh`, each gathered batch stays split over its
    `data` axis (see `_parallel`). `augment(key, images)`, where given, transforms each gathered
    batch (`augmentation_keys`) before the step sees it."""
    constrain = _parallel.batch_constraint(mesh)
    shared_trace = bool(execution.shared_trace)

    @execution.jit
    def chunk(inputs, state):
        images, labels, train_idx, val_idx = inputs

        def body(state, idx):
            it, iv = idx
            x_train, x_val = images[it], images[iv]
            if augment is not None:
                k_train, k_val = augmentation_keys(state)
                x_train, x_val = augment(k_train, x_train), augment(k_val, x_val)
            train = constrain(x_train), constrain(labels[it])
            val = constrain(x_val), constrain(labels[iv])
            return search_step(
                state, static, w_opt, a_opt, train, val, arch_grad, arch_reg, arch_view, shared_trace, weight_view
            )

        with execution.tracing(mesh):
            return lax.scan(body, state, (train_idx, val_idx))

    return chunk
