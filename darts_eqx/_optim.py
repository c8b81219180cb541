"""The search's two optimisers, as the original: SGD with momentum on the weights (cosine lr
stepped per epoch, L2 weight decay, gradients clipped) and Adam on alpha."""

from typing import Any

import jax.numpy as jnp
import optax
from jax.typing import ArrayLike


def cosine_lr(lr: float, lr_min: float, epochs: int, epoch):
    """The paper's cosine annealing from `lr` to `lr_min`, stepped once per epoch."""
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))


def epoch_lr(config, epoch):
    """The weight lr of a search with `config` (a `SearchConfig`) in `epoch` (from 0)."""
    return cosine_lr(config.w_lr, config.w_lr_min, config.epochs, epoch)


def clipped_sgd(lr_of_epoch, steps_per_epoch: int, momentum: float, weight_decay: float, grad_clip: float):
    """Clip to global norm, add L2 weight decay, SGD with momentum on a per-epoch lr (the
    original's `clip_grad_norm_` + `SGD(weight_decay=)` + an epoch-stepped scheduler)."""
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.add_decayed_weights(weight_decay),
        # optax types a schedule's argument as any number (complex ones too); it passes its int32 step count.
        optax.sgd(
            lambda count: lr_of_epoch(count // steps_per_epoch),  # pyright: ignore[reportOperatorIssue]
            momentum=momentum,
        ),
    )


def weight_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """The search's SGD on the weights."""
    return clipped_sgd(
        lambda epoch: epoch_lr(config, epoch),
        steps_per_epoch,
        config.w_momentum,
        config.w_weight_decay,
        config.grad_clip,
    )


def arch_optimizer(config, frozen_steps: int = 0) -> optax.GradientTransformation:
    """Adam on alpha with L2 weight decay added to the gradient (PyTorch's `Adam(weight_decay=)`).
    During its first `frozen_steps` updates alpha stays put and Adam's state does not move (a
    warm-up of the weights: the original code does not call alpha's optimiser then)."""
    adam = optax.chain(
        optax.add_decayed_weights(config.a_weight_decay),
        optax.adam(config.a_lr, b1=config.a_beta1, b2=config.a_beta2, eps=1e-8),
    )
    if frozen_steps == 0:
        return adam

    def warm(step: ArrayLike, **extra_args: Any) -> ArrayLike:  # step: updates so far
        return jnp.asarray(step) >= frozen_steps

    return optax.transforms.conditionally_mask(adam, warm)
