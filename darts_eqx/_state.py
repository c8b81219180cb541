"""The search state (the scan carry) and the metrics each step returns."""

import dataclasses
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree


class SearchState(eqx.Module):
    """Everything that changes during a search: the scan carry."""

    weights: PyTree
    arch: PyTree
    w_opt_state: PyTree
    a_opt_state: PyTree
    step: Int[Array, ""]
    key: PRNGKeyArray


# One metric: a scalar from a step, the values of a chunk's steps stacked by its scan, and NumPy
# once fetched to the host (the loop's epoch, a checkpoint's partly done epoch).
Metric = Float[Array, "*steps"] | Float[np.ndarray, "*steps"]


class StepMetrics(NamedTuple):
    train_loss: Metric
    train_acc: Metric
    val_loss: Metric
    val_acc: Metric
    w_grad_norm: Metric
    a_grad_norm: Metric


def initial_state(weights, arch, w_opt, a_opt, key: PRNGKeyArray) -> SearchState:
    """The search state at step 0. Both optimiser states are initialised by one compiled program:
    eagerly, every distinct weight shape would compile its own, and XLA:CPU keeps each compiled
    program for the life of the process."""
    w_opt_state, a_opt_state = jax.jit(lambda w, a: (w_opt.init(w), a_opt.init(a)))(weights, arch)
    return SearchState(weights, arch, w_opt_state, a_opt_state, jnp.zeros((), jnp.int32), key)


def forward_key(state: SearchState, number) -> PRNGKeyArray:
    """The key of forward pass `number` of `state`'s step, for a method's relaxation to draw from:
    the state's key folded with the step, then with the pass. Folded rather than split into the
    carry, so the carry does not change, and a resumed search draws what an uninterrupted one
    draws."""
    return jax.random.fold_in(jax.random.fold_in(state.key, state.step), number)


# The "pass number" of the step's data augmentation: one that no forward pass uses.
_AUGMENTATION = 2**31 - 1


def augmentation_keys(state: SearchState) -> tuple[PRNGKeyArray, PRNGKeyArray]:
    """The keys that augment the training and the validation batch of `state`'s step; folded
    like `forward_key`, so a resumed search draws what an uninterrupted one draws."""
    key = forward_key(state, _AUGMENTATION)
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def as_typed_key(key) -> PRNGKeyArray:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def saved(state: SearchState) -> SearchState:
    """The state as plain arrays (typed PRNG keys are stored as their raw key data)."""
    return eqx.tree_at(lambda s: s.key, state, jax.random.key_data(state.key))


def unsaved(stored: SearchState, impl: str) -> SearchState:
    """The inverse of `saved`, for a key of implementation `impl`."""
    return eqx.tree_at(lambda s: s.key, stored, jax.random.wrap_key_data(stored.key, impl=impl))


def regularised(a_grads, state: SearchState, arch_reg):
    """alpha's gradient plus that of the regulariser `arch_reg(arch, step)`, if any."""
    if arch_reg is None:
        return a_grads
    reg_grads = jax.grad(arch_reg)(state.arch, state.step)
    return jax.tree.map(lambda g, r: g + r, a_grads, reg_grads)


def alpha_update(state: SearchState, a_opt, a_grads) -> SearchState:
    a_updates, a_opt_state = a_opt.update(a_grads, state.a_opt_state, state.arch)
    return dataclasses.replace(state, arch=eqx.apply_updates(state.arch, a_updates), a_opt_state=a_opt_state)


def weight_update(state: SearchState, w_opt, w_grads) -> SearchState:
    w_updates, w_opt_state = w_opt.update(w_grads, state.w_opt_state, state.weights)
    return dataclasses.replace(state, weights=eqx.apply_updates(state.weights, w_updates), w_opt_state=w_opt_state)
