"""One DARTS search step, and a chunk of steps fused into one `lax.scan`.

Per step: one Adam step on alpha with the gradient of the loss on a validation batch (first order),
or of the loss after one virtual weight step (second order, `_second_order`), then one SGD step on
the weights with the gradient of the loss on a training batch (Liu et al., 2019, Alg. 1).
"""

import dataclasses
from dataclasses import dataclass

import equinox as eqx
import jax
import optax
from jax import lax

from . import _parallel, _shared_trace
from ._config import SearchConfig
from ._execution import Execution
from ._loss import supernet_loss
from ._optim import epoch_lr
from ._second_order import arch_gradient, momentum_buffer
from ._state import SearchState, StepMetrics, alpha_update, regularised, weight_update


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
):
    """One DARTS step: alpha on `val_batch`, then weights on `train_batch`. First order unless
    `arch_grad(state, static, train_batch, val_batch) -> ((val_loss, val_acc), grads)` is given
    (see `second_order_gradient`); `arch_reg(arch, step)`, a regulariser of alpha alone, is added
    to the validation loss (its gradient to alpha's); `arch_view(arch, step)` is alpha as both
    forward passes see it (DARTS-'s auxiliary skip). With `shared_trace`, the step traces the
    supernet's gradient once for all its phases (first order: the alpha and the weight step;
    second order with finite differences: the virtual step, the gradient at w', the two at w+-
    and the weight step), the CPU's convolutions and pointwise matmuls gating their weight
    gradients off in the phases that need alpha's gradient alone (`_shared_trace`); the same
    step up to floating-point rounding."""

    def view(arch):
        return arch if arch_view is None else arch_view(arch, state.step)

    if shared_trace and arch_grad is None:
        return _shared_trace.first_order_step(state, static, w_opt, a_opt, train_batch, val_batch, arch_reg, view)
    if shared_trace:
        if not (isinstance(arch_grad, UnrolledGradient) and arch_grad.config.estimator == "finite_difference"):
            raise ValueError(
                "shared_trace with a second-order gradient needs `second_order_gradient(config, ...)` with "
                "estimator 'finite_difference' (the exact one differentiates through the virtual step), "
                f"got {arch_grad!r}"
            )
        return _shared_trace.finite_difference_step(
            state, static, w_opt, a_opt, train_batch, val_batch, arch_grad, arch_reg, view
        )
    loss_gradient = _loss_gradient(static, arch_view)
    if arch_grad is None:
        (val_loss, val_acc), (_, a_grads) = loss_gradient(state.weights, state.arch, state.step, *val_batch)
    else:
        (val_loss, val_acc), a_grads = arch_grad(state, static, train_batch, val_batch)
    a_grads = regularised(a_grads, state, arch_reg)
    stepped = alpha_update(state, a_opt, a_grads)
    (train_loss, train_acc), (w_grads, _) = loss_gradient(stepped.weights, stepped.arch, state.step, *train_batch)
    new = dataclasses.replace(weight_update(stepped, w_opt, w_grads), step=state.step + 1)
    norms = optax.tree.norm(w_grads), optax.tree.norm(a_grads)  # before clipping: for the NaN guard
    return new, StepMetrics(train_loss, train_acc, val_loss, val_acc, *norms)


def _loss_gradient(static, arch_view):
    """`loss_gradient(weights, arch, step, x, y) -> ((loss, acc), (grad_w, grad_alpha))`, jitted:
    the weight step's gradient (training batch), and in first order also alpha's (validation
    batch). Called twice with the same shapes inside the step, it is traced and lowered once; XLA
    inlines both calls and drops the gradient each one does not use, so the step computes what two
    separately traced gradients compute, with less tracing and lowering (experiments/RESULTS.md)."""

    @jax.jit
    def loss_gradient(weights, arch, step, x, y):
        def loss(wa):
            arch_in = wa[1] if arch_view is None else arch_view(wa[1], step)
            return supernet_loss(arch_in, wa[0], static, x, y)

        return eqx.filter_value_and_grad(loss, has_aux=True)((weights, arch))

    return loss_gradient


@dataclass(frozen=True)
class UnrolledGradient:
    """The `arch_grad` of `search_step` for `config.order == 2`: `arch_gradient` with the weight
    optimiser's own virtual step (its momentum buffer, momentum, weight decay; xi = its lr now)."""

    config: SearchConfig
    steps_per_epoch: int

    def xi(self, state: SearchState):
        config = self.config
        return config.xi if config.xi is not None else epoch_lr(config, state.step // self.steps_per_epoch)

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
    static, w_opt, a_opt, execution: Execution, *, mesh=None, arch_grad=None, arch_reg=None, arch_view=None
):
    """A jitted `chunk((images, labels, train_idx, val_idx), state) -> (state, metrics)` that
    runs one search step per row of the index arrays `[steps, batch]` inside a `lax.scan`, traced
    and compiled as the resolved `execution` says. The data stays on device and only indices
    change per call, so nothing recompiles; the state's buffers are donated, so a chunk does not
    hold two copies of the supernet. With a `mesh`, each gathered batch stays split over its
    `data` axis (see `_parallel`)."""
    constrain = _parallel.batch_constraint(mesh)
    shared_trace = bool(execution.shared_trace)

    @execution.jit
    def chunk(inputs, state):
        images, labels, train_idx, val_idx = inputs

        def body(state, idx):
            it, iv = idx
            train = constrain(images[it]), constrain(labels[it])
            val = constrain(images[iv]), constrain(labels[iv])
            return search_step(state, static, w_opt, a_opt, train, val, arch_grad, arch_reg, arch_view, shared_trace)

        with execution.tracing(sharded=mesh is not None):
            return lax.scan(body, state, (train_idx, val_idx))

    return chunk
