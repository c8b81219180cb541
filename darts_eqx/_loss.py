"""The search loss: mean cross-entropy and accuracy of a supernet on one batch."""

import jax.numpy as jnp
import optax

from ._mixed import combine_arch


def loss_and_accuracy(model, x, y):
    """Mean cross-entropy and accuracy of `model` on one batch."""
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, axis=-1) == y)


def supernet_loss(arch, weights, static, x, y):
    """`loss_and_accuracy` of the supernet `combine_arch(arch, weights, static)`."""
    return loss_and_accuracy(combine_arch(arch, weights, static), x, y)
