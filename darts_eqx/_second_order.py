"""The second-order (unrolled) DARTS architecture gradient (Liu et al., 2019, Eq. 6-8).

The gradient of L_val(w', alpha) in alpha, where w' = w - xi * d(w, alpha) is one virtual step of
the weight optimiser: d = momentum * (its momentum buffer) + grad_w L_train(w, alpha) +
weight_decay * w, exactly the original's `_compute_unrolled_model` (no clipping in the virtual
step). Two estimators of the mixed second derivative:

- `exact`: JAX differentiates through the virtual step (reverse over reverse; no finite
  differences). The result is the true gradient of the unrolled objective.
- `finite_difference`: the paper's Eq. 8, grad_alpha L_val(w', alpha) - xi * (grad_alpha
  L_train(w+, alpha) - grad_alpha L_train(w-, alpha)) / (2 eps), w+- = w +- eps grad_w' L_val,
  eps = 0.01 / ||grad_w' L_val||, for parity with published runs. Written once as phases of the
  supernet's gradient (`FiniteDifference`, and with the weight step `FiniteDifferenceStep`), which
  a search traces one by one or as one shared trace (`_phases`).
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._loss import supernet_loss
from ._phases import TRAIN, VAL, Phases, choose, known, may_be, run_phases
from ._state import SearchState, StepMetrics, regularised, weight_update

ESTIMATORS = ("exact", "finite_difference")


def momentum_buffer(opt_state):
    """The SGD momentum buffer (optax's `TraceState.trace`) inside a weight optimiser's state, or
    None when it has none (plain SGD, or before the first step it is all zeros anyway)."""
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.TraceState))
        if isinstance(s, optax.TraceState)
    ]
    return found[0].trace if found else None


def unrolled_weights(weights, grads, *, xi, momentum: float, weight_decay: float, buffer=None):
    """w' = w - xi * (momentum * buffer + grads + weight_decay * w): the weight optimiser's step
    without clipping, from the gradient `grads` at w."""
    if buffer is None:
        buffer = jax.tree.map(jnp.zeros_like, weights)
    return jax.tree.map(lambda w, g, b: w - xi * (momentum * b + g + weight_decay * w), weights, grads, buffer)


def virtual_step(weights, arch, static, train_batch, *, xi, momentum: float, weight_decay: float, buffer=None):
    """w' = w - xi * (momentum * buffer + grad_w L_train(w, alpha) + weight_decay * w)."""
    grads = jax.grad(lambda w: supernet_loss(arch, w, static, *train_batch)[0])(weights)
    return unrolled_weights(weights, grads, xi=xi, momentum=momentum, weight_decay=weight_decay, buffer=buffer)


def finite_difference_eps(g_weights):
    """eps of Eq. 8: the shift w +- eps grad_w' L_val has norm 0.01."""
    return 0.01 / optax.tree.norm(g_weights)


def finite_difference_weights(weights, g_weights, sign, eps):
    """w+ (sign 1) or w- (sign -1) of Eq. 8: w + sign * eps * grad_w' L_val."""
    return jax.tree.map(lambda w, g: w + sign * eps * g, weights, g_weights)


def finite_difference_gradient(g_arch, g_plus, g_minus, eps, xi):
    """Eq. 8: grad_alpha L_val(w') - xi * (grad_alpha L_train(w+) - grad_alpha L_train(w-)) / (2 eps)."""
    return jax.tree.map(lambda g, p, m: g - xi * ((p - m) / (2 * eps)), g_arch, g_plus, g_minus)


def arch_gradient(
    arch,
    weights,
    static,
    train_batch,
    val_batch,
    *,
    xi,
    momentum: float = 0.9,
    weight_decay: float = 3e-4,
    buffer=None,
    estimator: str = "exact",
):
    """`((val_loss, val_acc), grad)`: the second-order architecture gradient of the model
    `combine_arch(arch, weights, static)`, with `val_loss` / `val_acc` at the unrolled weights w'.

    **Arguments:** `arch, weights, static` as from `split_arch`; `train_batch` and `val_batch` as
    `(images, labels)`; `xi` the virtual step size (DARTS: the current weight lr); `momentum`,
    `weight_decay` and `buffer` (the weight optimiser's momentum buffer, see `momentum_buffer`)
    define the virtual step; `estimator` is `exact` or `finite_difference` (module docstring).
    Works on any model whose loss is differentiable twice in reverse mode, inside `jit`.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator (={estimator!r}) must be one of {ESTIMATORS}")
    step: dict[str, Any] = dict(xi=xi, momentum=momentum, weight_decay=weight_decay, buffer=buffer)
    if estimator == "exact":

        def unrolled(arch):
            return supernet_loss(arch, virtual_step(weights, arch, static, train_batch, **step), static, *val_batch)

        return jax.value_and_grad(unrolled, has_aux=True)(arch)
    phases = FiniteDifference(weights, arch, **step)
    return run_phases(phases, static, (train_batch, val_batch), shared=False)


class FiniteDifferencePhase(NamedTuple):
    """A phase of the finite-difference estimator (`FINITE_DIFFERENCE_PHASES`)."""

    batch: int
    weight_gradient: bool
    index: int
    sign: float  # the shift w + sign * eps * grad_w' L_val of phases 2 and 3

    @property
    def number(self):
        """Which forward pass of the step it is (for its relaxation key)."""
        return self.index


FINITE_DIFFERENCE_PHASES = (
    FiniteDifferencePhase(TRAIN, True, 0, 0.0),  # grad_w L_train(w): the virtual step to w'
    FiniteDifferencePhase(VAL, True, 1, 0.0),  # grad L_val(w') in w and alpha; eps = 0.01 / |grad_w|
    FiniteDifferencePhase(TRAIN, False, 2, 1.0),  # grad_alpha L_train(w+)
    FiniteDifferencePhase(TRAIN, False, 3, -1.0),  # grad_alpha L_train(w-); Eq. 8 (and alpha's step)
    FiniteDifferencePhase(TRAIN, True, 4, 0.0),  # grad_w L_train(w, new alpha): the weight step's
)

# Which of the step's metrics (train loss, train acc, val loss, val acc, |w grad|, |alpha grad|)
# each phase sets.
METRICS_OF_PHASE = np.array(
    [[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [1, 1, 0, 0, 1, 0]], bool
)


class FiniteDifferenceCarry(NamedTuple):
    """What the phases pass on: never the weights or their optimiser state, which a shared trace
    would carry (or copy) through every phase."""

    g_w: Any  # grad_w of phase 0, then 1, then 4
    arch: Any
    a_opt_state: Any
    g_arch: Any  # grad_alpha L_val(w')
    g_plus: Any  # grad_alpha L_train(w+)
    a_grads: Any  # Eq. 8's gradient (`FiniteDifference` alone)
    eps: Any
    metrics: Any  # see METRICS_OF_PHASE: a vector under a shared trace, else a tuple


@dataclass(frozen=True)
class FiniteDifference(Phases):
    """Eq. 8's gradient in alpha as the first four phases of `FINITE_DIFFERENCE_PHASES`, from
    `weights` and `arch`, with the virtual step's `xi`, `momentum`, `weight_decay` and momentum
    `buffer` (None: none)."""

    weights: Any
    arch: Any
    xi: Any
    momentum: float
    weight_decay: float
    buffer: Any = None

    groups = tuple((phase,) for phase in FINITE_DIFFERENCE_PHASES[:2]) + (FINITE_DIFFERENCE_PHASES[2:4],)

    @property
    def dtype(self):
        return jax.tree.leaves(self.weights)[0].dtype

    def start(self, shared: bool) -> FiniteDifferenceCarry:
        if not shared:  # each phase sets what it keeps
            return FiniteDifferenceCarry(None, self.arch, None, None, None, None, None, (None,) * 6)
        zero_arch = jax.tree.map(jnp.zeros_like, self.arch)
        zero_weights = jax.tree.map(jnp.zeros_like, self.weights)
        wide = jnp.promote_types(self.dtype, jnp.float32)
        return FiniteDifferenceCarry(
            zero_weights, self.arch, None, zero_arch, zero_arch, None, jnp.ones((), self.dtype), jnp.zeros(6, wide)
        )

    def at(self, carry: FiniteDifferenceCarry, phase):
        """w' in phase 1, w +- eps grad_w in phases 2 and 3 (those that keep alpha's gradient
        alone), w otherwise: each as written where the phase is known, one expression for all
        under a shared trace."""
        p, xi, step = phase.index, self.xi, dict(momentum=self.momentum, weight_decay=self.weight_decay)
        if known(phase.weight_gradient) and not phase.weight_gradient:
            return finite_difference_weights(self.weights, carry.g_w, phase.sign, carry.eps), carry.arch
        if not known(p):
            c_grad = jnp.where(p == 1, -xi, jnp.asarray(phase.sign, self.dtype) * carry.eps)
            c_step = jnp.where(p == 1, -xi, 0.0)
            return phase_weights(self.weights, carry.g_w, self.buffer, c_grad, c_step, **step), carry.arch
        if p == 1:
            return unrolled_weights(self.weights, carry.g_w, xi=xi, buffer=self.buffer, **step), carry.arch
        return self.weights, carry.arch

    def keep(self, carry: FiniteDifferenceCarry, phase, value, grads):
        (loss, acc), (g_w, g_arch) = value, grads
        p, a_grads, eps = phase.index, None, carry.eps
        if may_be(p, 3):  # Eq. 8 (a shared trace computes it in every phase: alpha is small)
            a_grads = finite_difference_gradient(carry.g_arch, carry.g_plus, g_arch, carry.eps, self.xi)
            a_grads, carry = self.alpha_step(carry, p == 3, a_grads)
        # before clipping: for the NaN guard
        w_norm, a_norm = lambda: optax.tree.norm(g_w), lambda: optax.tree.norm(a_grads)
        metrics = recorded(carry.metrics, p, (lambda: loss, lambda: acc, lambda: loss, lambda: acc, w_norm, a_norm))
        if may_be(p, 1):
            eps = choose(p == 1, finite_difference_eps(g_w).astype(self.dtype), carry.eps)
        carry = carry._replace(
            g_w=choose(phase.weight_gradient, g_w, carry.g_w),
            g_arch=choose(p == 1, g_arch, carry.g_arch),
            g_plus=choose(p == 2, g_arch, carry.g_plus),
            eps=eps,
            metrics=metrics,
        )
        return carry, None

    def alpha_step(self, carry: FiniteDifferenceCarry, now, a_grads):
        """`(a_grads, carry)` once Eq. 8's gradient `a_grads` is known (`now`): here, kept."""
        return a_grads, carry._replace(a_grads=choose(now, a_grads, carry.a_grads))

    def finish(self, carry: FiniteDifferenceCarry, outs):
        return (carry.metrics[2], carry.metrics[3]), carry.a_grads


@dataclass(frozen=True, kw_only=True)
class FiniteDifferenceStep(FiniteDifference):
    """`search_step`'s second order with finite differences: all five phases of
    `FINITE_DIFFERENCE_PHASES` from `state`, alpha's step (`a_opt`, with `arch_reg`'s gradient)
    after Eq. 8 in phase 3, and the weight step (`w_opt`) on phase 4's gradient, where alpha is
    seen through `view(arch, step, key)` (if given)."""

    state: SearchState
    w_opt: Any
    a_opt: Any
    arch_reg: Any = None
    view: Any = None

    groups = FiniteDifference.groups + ((FINITE_DIFFERENCE_PHASES[4],),)

    def start(self, shared: bool) -> FiniteDifferenceCarry:
        return super().start(shared)._replace(a_opt_state=self.state.a_opt_state)

    def view_of(self, phase):
        view = self.view
        if view is None:
            return None
        if known(phase.index):
            return view if phase.index == 4 else None
        return lambda arch, step, key: choose(phase.index == 4, view(arch, step, key), arch)

    def alpha_step(self, carry: FiniteDifferenceCarry, now, a_grads):
        """Alpha's step, taken in phase 3 (a shared trace computes it in every phase)."""
        a_grads = regularised(a_grads, self.state, self.arch_reg)
        a_updates, a_opt_state = self.a_opt.update(a_grads, carry.a_opt_state, carry.arch)
        arch = choose(now, eqx.apply_updates(carry.arch, a_updates), carry.arch)
        return a_grads, carry._replace(arch=arch, a_opt_state=choose(now, a_opt_state, carry.a_opt_state))

    def finish(self, carry: FiniteDifferenceCarry, outs):
        state = dataclasses.replace(self.state, arch=carry.arch, a_opt_state=carry.a_opt_state)
        state = weight_update(state, self.w_opt, carry.g_w)
        return dataclasses.replace(state, step=state.step + 1), StepMetrics(*carry.metrics)


def recorded(metrics, p, values):
    """`metrics` with those phase `p` sets (`METRICS_OF_PHASE`) replaced by `values` (functions
    giving them): a tuple for a known phase, which calls only those it sets; under a shared
    trace, one vector selected elementwise."""
    if known(p):
        return tuple(value() if sets else m for m, sets, value in zip(metrics, METRICS_OF_PHASE[p], values))
    stacked = jnp.stack([value() for value in values]).astype(metrics.dtype)
    return jnp.where(jnp.asarray(METRICS_OF_PHASE)[p], stacked, metrics)


def phase_weights(weights, g_w, buffer, c_grad, c_step, *, momentum: float, weight_decay: float):
    """w + c_grad * g_w + c_step * (momentum * buffer + weight_decay * w), per leaf: w' of the
    virtual step (`unrolled_weights`) with c_grad = c_step = -xi, w +- eps g_w (Eq. 8's w+-) with
    c_grad = +-eps and c_step = 0. Expanded so that every product has a phase-dependent factor:
    XLA hoists a loop-invariant `momentum * buffer` or `weight_decay * w` out of a loop over the
    phases as one more kernel and buffer per weight leaf, which this form avoids
    (experiments/RESULTS.md)."""
    if buffer is None:
        return jax.tree.map(lambda w, g: w * (1 + c_step * weight_decay) + c_grad * g, weights, g_w)
    return jax.tree.map(
        lambda w, g, b: w * (1 + c_step * weight_decay) + c_grad * g + (c_step * momentum) * b, weights, g_w, buffer
    )
