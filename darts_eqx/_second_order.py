"""The second-order (unrolled) DARTS architecture gradient (Liu et al., 2019, Eq. 6-8).

The gradient of L_val(w', alpha) in alpha, where w' = w - xi * d(w, alpha) is one virtual step of
the weight optimiser: d = momentum * (its momentum buffer) + grad_w L_train(w, alpha) +
weight_decay * w, exactly the original's `_compute_unrolled_model` (no clipping in the virtual
step). Two estimators of the mixed second derivative:

- `exact`: JAX differentiates through the virtual step (reverse over reverse; no finite
  differences). The result is the true gradient of the unrolled objective.
- `finite_difference`: the paper's Eq. 8, grad_alpha L_val(w', alpha) - xi * (grad_alpha
  L_train(w+, alpha) - grad_alpha L_train(w-, alpha)) / (2 eps), w+- = w +- eps grad_w' L_val,
  eps = 0.01 / ||grad_w' L_val||, for parity with published runs.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ._loss import supernet_loss

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


def finite_difference_step(g_weights):
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

    unrolled_weights = jax.lax.stop_gradient(virtual_step(weights, arch, static, train_batch, **step))
    metrics, (g_arch, g_weights) = jax.value_and_grad(supernet_loss, argnums=(0, 1), has_aux=True)(
        arch, unrolled_weights, static, *val_batch
    )
    eps = finite_difference_step(g_weights)
    # The two gradients at w+ and w- run as one `lax.map` over the sign: one traced (and compiled)
    # copy of the supernet's backward pass instead of two, the same arithmetic.
    signs = jnp.array([1.0, -1.0], eps.dtype)

    def arch_grad_at(sign):
        shifted = finite_difference_weights(weights, g_weights, sign, eps)
        return jax.grad(lambda a: supernet_loss(a, shifted, static, *train_batch)[0])(arch)

    g_both = jax.lax.map(arch_grad_at, signs)
    g_plus, g_minus = jax.tree.map(lambda g: g[0], g_both), jax.tree.map(lambda g: g[1], g_both)
    return metrics, finite_difference_gradient(g_arch, g_plus, g_minus, eps, xi)
