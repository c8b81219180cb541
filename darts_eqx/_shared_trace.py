"""The search step traced once for all its phases (`Execution.shared_trace`).

A step computes the supernet's gradient several times: at the weights and on the validation
batch for alpha, on the training batch for the weights, and in second order with finite
differences at w', w+ and w- as well. Traced once per phase, XLA compiles the supernet's backward
pass that many times. Here each step is a `lax.scan` over its phases of one traced gradient of
(weights, alpha), so XLA compiles it once; the CPU's convolutions and pointwise matmuls gate their
weight gradients off (`kernel_gradient_gate`) in the phases that need alpha's gradient alone. The
same step as the separately traced one up to floating-point rounding (tested); the trade-off is in
experiments/RESULTS.md.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ._conv import kernel_gradient_gate
from ._loss import supernet_loss
from ._second_order import finite_difference_gradient, finite_difference_step as epsilon, momentum_buffer
from ._state import StepMetrics, alpha_update, regularised, weight_update


def first_order_step(state, static, w_opt, a_opt, train_batch, val_batch, arch_reg, view):
    """`search_step`'s first order as a `lax.scan` over two phases (alpha on the validation batch,
    then weights on the training batch) of one traced gradient of (weights, alpha): XLA compiles
    the supernet's backward pass once instead of twice. The alpha phase gates the convolutions'
    and pointwise matmuls' weight gradients off (`kernel_gradient_gate`), so it does no more work
    than a gradient in alpha alone. Same arithmetic as the two-trace form (tested)."""
    batches = jax.tree.map(lambda v, t: jnp.stack([v, t]), val_batch, train_batch)

    def phase(state, inputs):
        is_weight_phase, (x, y) = inputs
        with kernel_gradient_gate(is_weight_phase.astype(jnp.float32)):
            (loss, acc), (w_grads, a_grads) = eqx.filter_value_and_grad(
                lambda wa: supernet_loss(view(wa[1]), wa[0], static, x, y), has_aux=True
            )((state.weights, state.arch))
        a_grads = regularised(a_grads, state, arch_reg)
        state = lax.cond(
            is_weight_phase,
            lambda s: weight_update(s, w_opt, w_grads),
            lambda s: alpha_update(s, a_opt, a_grads),
            state,
        )
        # before clipping: for the NaN guard
        norm = jnp.where(is_weight_phase, optax.tree.norm(w_grads), optax.tree.norm(a_grads))
        return state, (loss, acc, norm)

    state, (loss, acc, norm) = lax.scan(phase, state, (jnp.array([False, True]), batches))
    state = dataclasses.replace(state, step=state.step + 1)
    return state, StepMetrics(loss[1], acc[1], loss[0], acc[0], norm[1], norm[0])


def select(pick, new, old):
    """Per leaf, `new` where `pick` else `old` (a traced scalar choice, no conditional)."""
    return jax.tree.map(lambda n, o: jnp.where(pick, n, o), new, old)


# Which of the step's metrics (train loss, train acc, val loss, val acc, |w grad|, |alpha grad|)
# each phase of `_gated_second_order_step` sets.
METRICS_OF_PHASE = np.array(
    [[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [1, 1, 0, 0, 1, 0]], bool
)


def phase_weights(weights, g_w, buffer, c_grad, c_step, config):
    """w + c_grad * g_w + c_step * (momentum * buffer + weight_decay * w), per leaf: w' of the
    virtual step (`unrolled_weights`) with c_grad = c_step = -xi, w +- eps g_w (Eq. 8's w+-) with
    c_grad = +-eps and c_step = 0. Expanded so that every product has a phase-dependent factor:
    XLA hoists a loop-invariant `momentum * buffer` or `weight_decay * w` out of the phase loop
    as one more kernel and buffer per weight leaf, which this form avoids (experiments/RESULTS.md)."""
    decay, momentum = config.w_weight_decay, config.w_momentum
    if buffer is None:
        return jax.tree.map(lambda w, g: w * (1 + c_step * decay) + c_grad * g, weights, g_w)
    return jax.tree.map(
        lambda w, g, b: w * (1 + c_step * decay) + c_grad * g + (c_step * momentum) * b, weights, g_w, buffer
    )


def finite_difference_step(state, static, w_opt, a_opt, train_batch, val_batch, unrolled, arch_reg, view):
    """`search_step`'s second order with the finite-difference estimator (`arch_gradient`) as a
    `lax.scan` over five phases of one traced gradient of L(w, alpha; batch), so XLA compiles the
    supernet's backward pass once instead of four times:

    0. grad_w L_train(w), for the virtual step w' = w - xi * (momentum * buffer + grad + weight_decay * w);
    1. grad L_val(w') in w and alpha; eps = 0.01 / |grad_w|;
    2., 3. grad_alpha L_train(w +- eps grad_w) (weight gradients gated off);
       alpha's gradient is then grad_alpha L_val(w') - xi (g+ - g-) / (2 eps): the alpha step;
    4. grad_w L_train(w, new alpha), for the weight step, taken after the scan.

    The phases differ only in where they evaluate the gradient and what they keep of it, both
    selected elementwise: the carry holds one weight-sized gradient and alpha's small state, never
    the weights or their optimiser state (a `lax.switch` over the whole state made XLA:CPU copy
    every passed-through leaf in each branch). The same step as the separately traced form up to
    rounding (tested): w' is formed in another fusion than there, and the finite difference
    magnifies its last-bit differences."""
    config = unrolled.config
    dtype = jax.tree.leaves(state.weights)[0].dtype
    xi = jnp.asarray(unrolled.xi(state), dtype)
    buffer = momentum_buffer(state.w_opt_state)
    batches = jax.tree.map(lambda t, v: jnp.stack([t, v, t, t, t]), train_batch, val_batch)
    kernel_gradients = jnp.array([1.0, 1.0, 0.0, 0.0, 1.0], dtype)  # also: the phases whose grad_w is kept
    shift = jnp.array([0.0, 0.0, 1.0, -1.0, 0.0], dtype)  # w +- eps grad_w in phases 2 and 3
    wide = jnp.promote_types(dtype, jnp.float32)
    zero_arch = jax.tree.map(jnp.zeros_like, state.arch)
    carry = (
        jax.tree.map(jnp.zeros_like, state.weights),  # grad_w of phase 0, then 1, then 4
        state.arch,
        state.a_opt_state,
        zero_arch,  # grad_alpha L_val(w')
        zero_arch,  # grad_alpha L_train(w+)
        jnp.ones((), dtype),  # eps
        jnp.zeros(6, wide),
    )

    def phase(carry, inputs):
        g_w, arch, a_opt_state, g_arch, g_plus, eps, metrics = carry
        p, gate, sign, (x, y) = inputs
        # w' in phase 1, w +- eps grad_w in phases 2 and 3, w otherwise
        weights = phase_weights(
            state.weights, g_w, buffer, jnp.where(p == 1, -xi, sign * eps), jnp.where(p == 1, -xi, 0.0), config
        )
        arch_in = select(p == 4, view(arch), arch)
        with kernel_gradient_gate(gate):
            (loss, acc), (gw, ga) = eqx.filter_value_and_grad(
                lambda wa: supernet_loss(wa[1], wa[0], static, x, y), has_aux=True
            )((weights, arch_in))
        # the alpha step, taken in phase 3 (computed in every phase: alpha and its state are small)
        a_grads = regularised(finite_difference_gradient(g_arch, g_plus, ga, eps, xi), state, arch_reg)
        a_updates, a_opt_new = a_opt.update(a_grads, a_opt_state, arch)
        values = jnp.stack([loss, acc, loss, acc, optax.tree.norm(gw), optax.tree.norm(a_grads)]).astype(wide)
        metrics = jnp.where(jnp.asarray(METRICS_OF_PHASE)[p], values, metrics)
        carry = (
            select(gate > 0, gw, g_w),
            select(p == 3, eqx.apply_updates(arch, a_updates), arch),
            select(p == 3, a_opt_new, a_opt_state),
            select(p == 1, ga, g_arch),
            select(p == 2, ga, g_plus),
            jnp.where(p == 1, epsilon(gw).astype(dtype), eps),
            metrics,
        )
        return carry, None

    carry, _ = lax.scan(phase, carry, (jnp.arange(5), kernel_gradients, shift, batches))
    w_grads, arch, a_opt_state, *_, metrics = carry
    state = weight_update(dataclasses.replace(state, arch=arch, a_opt_state=a_opt_state), w_opt, w_grads)
    return dataclasses.replace(state, step=state.step + 1), StepMetrics(*metrics)
