"""DARTS search: alternating alpha and weight steps, fused with `lax.scan`.

Per step: one Adam step on alpha with the gradient of the loss on a validation batch (first order),
or of the loss after one virtual weight step (second order, `_second_order`), then one SGD step on
the weights with the gradient of the loss on a training batch (Liu et al., 2019, Alg. 1). A chunk
of steps is one `lax.scan` inside one jitted call.
"""

import contextlib
import dataclasses
import hashlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from . import _checkpoint, _conv, _parallel
from ._checkpoint import CheckpointError, CheckpointWarning
from ._config import non_negative, positive, positive_ints, replace_known
from ._conv import kernel_gradient_gate
from ._data import load
from ._discretize import derive_genotype, discretize
from ._fused import from_per_source_view, per_source_view
from ._genotype import Genotype
from ._guards import aux_skip_view, beta_regularizer, grew, hessian_eigenvalue, ramp
from ._loss import supernet_loss
from ._mixed import combine_arch, split_arch
from ._network import SearchNetwork, SeedNetwork, reduction_layers
from ._second_order import (
    ESTIMATORS,
    arch_gradient,
    finite_difference_gradient,
    finite_difference_step,
    momentum_buffer,
)
from ._spaces import get_space
from ._version import __version__
from ._xla import loop_jit
from .nb201 import NB201Genotype


class SearchDiverged(FloatingPointError):
    """A loss or alpha became non-finite during search; no genotype is derived from it."""


@dataclass(frozen=True)
class SearchConfig:
    """Search options; the defaults are the paper's CIFAR-10 search (Liu et al., 2019, App. A.1).

    - `space`: `darts` (the CIFAR search network) or `seed` (one mixed-op layer type).
    - `channels`, `layers`: initial channels C and number of cells.
    - `epochs`, `batch_size`: an epoch is `min(len(search_train), len(search_val)) // batch_size`
      steps; each step takes one batch from each half.
    - `train_portion`: share of the training set used to train weights; the rest trains alpha.
    - `w_*`: SGD for weights (lr cosine-annealed per epoch to `w_lr_min`, momentum, L2 weight
      decay), gradients clipped to global norm `grad_clip`.
    - `a_*`: Adam for alpha, with L2 weight decay added to the gradient as PyTorch's Adam does.
    - `steps_per_chunk`: steps fused into one jitted `lax.scan` call (default: a whole epoch);
      an epoch is cut to a whole number of chunks.
    - `order`: 1 for first-order DARTS, 2 for the unrolled architecture gradient (`arch_gradient`)
      with `estimator` `exact` (differentiated through the virtual weight step) or
      `finite_difference` (the paper's Eq. 8); `xi` is the virtual step size (None: the current
      weight lr, as the paper). With order 2 the recorded val loss/acc are at the unrolled weights.
    - `beta_reg`: beta-DARTS regularisation (Ye et al., 2022): lambda * mean over edges of
      logsumexp(alpha) added to the validation loss, lambda ramped linearly from 0 to `beta_reg`
      over the epochs (0: off; the paper uses lambda up to 50 on NAS-Bench-201, 2 on DARTS).
    - `aux_skip`: DARTS-'s auxiliary skip (Chu et al., 2021): the forward pass adds beta times an
      identity to every edge, beta decaying linearly from `aux_skip` (the paper: 1) to 0 at the last
      epoch; first order only (0: off).
    - `hessian`: record the dominant eigenvalue of the Hessian of the validation loss in alpha
      after each epoch (`hessian_eigenvalue` in the history; `hessian_iterations` power steps on
      a fixed validation batch). `early_stop_factor` (DARTS-ES; e.g. 1/0.75): stop when it grew by
      more than that factor over `early_stop_window` epochs, with the genotype of the window's
      first epoch (implies `hessian`).
    - `partial_channels`: k > 1 searches PC-DARTS' partial channel connections with edge
      normalisation (Xu et al., ICLR 2020; k=4 there) in the DARTS space; it must divide
      `channels`. Its supernet is not discretised (its weights fit 1/k-wide ops only).
    - `shared_trace`: trace the supernet's gradient once per step for all its phases (first order,
      or second order with `finite_difference`; see `search_step`) instead of once per phase. The
      same search up to floating-point rounding. None (default): on CPU the shared trace for
      second order with finite differences, separate traces otherwise (`resolve_shared_trace`);
      on a resume, what the checkpoint ran with. On CPU at C=8, layers=5, second order with finite
      differences, the shared trace compiles in about half the time, peaks at 1.8-2.0 GB against
      2.9-3.0 GB, and runs 2-12% slower in the latest runs (18-27% in earlier ones); in first
      order it runs 16-20% slower (experiments/README.md).
    """

    space: str = "darts"
    channels: int = 16
    layers: int = 8
    epochs: int = 50
    batch_size: int = 64
    train_portion: float = 0.5
    w_lr: float = 0.025
    w_lr_min: float = 0.001
    w_momentum: float = 0.9
    w_weight_decay: float = 3e-4
    grad_clip: float = 5.0
    a_lr: float = 3e-4
    a_beta1: float = 0.5
    a_beta2: float = 0.999
    a_weight_decay: float = 1e-3
    steps_per_chunk: int | None = None
    order: int = 1
    estimator: str = "exact"
    xi: float | None = None
    partial_channels: int = 1
    beta_reg: float = 0.0
    aux_skip: float = 0.0
    hessian: bool = False
    hessian_iterations: int = 20
    early_stop_factor: float | None = None
    early_stop_window: int = 5
    shared_trace: bool | None = None

    def __post_init__(self):
        get_space(self.space)
        positive_ints(self, "channels", "layers", "epochs", "batch_size", "hessian_iterations", "early_stop_window")
        positive_ints(self, "steps_per_chunk", optional=True)
        if not 0.0 < self.train_portion < 1.0:
            raise ValueError(f"`train_portion` (={self.train_portion!r}) must lie strictly between 0 and 1")
        positive(self, "w_lr", "a_lr")
        non_negative(self, "w_lr_min", "w_weight_decay", "a_weight_decay", "grad_clip", "w_momentum", "beta_reg")
        non_negative(self, "aux_skip")
        if self.aux_skip and self.order != 1:
            raise ValueError(f"`aux_skip` (={self.aux_skip!r}) is implemented for first-order search (order=1)")
        if self.early_stop_factor is not None and not self.early_stop_factor > 1:
            raise ValueError(f"`early_stop_factor` (={self.early_stop_factor!r}) must be above 1, or None")
        if isinstance(self.partial_channels, bool) or not isinstance(self.partial_channels, int):
            raise ValueError(f"`partial_channels` (={self.partial_channels!r}) must be a positive integer")
        if self.partial_channels != 1:
            if self.space != "darts":
                raise ValueError(
                    f"`partial_channels` (={self.partial_channels}) needs the darts space, not {self.space!r}"
                )
            if self.partial_channels < 1 or self.channels % self.partial_channels:
                raise ValueError(
                    f"`partial_channels` (={self.partial_channels}) must be a positive divisor of "
                    f"`channels` (={self.channels})"
                )
        if self.order not in (1, 2) or isinstance(self.order, bool):
            raise ValueError(f"`order` (={self.order!r}) must be 1 (first order) or 2 (unrolled, second order)")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"`estimator` (={self.estimator!r}) must be one of {ESTIMATORS}")
        if not isinstance(self.hessian, bool):
            raise ValueError(f"`hessian` (={self.hessian!r}) must be True or False")
        if self.shared_trace is not None and not isinstance(self.shared_trace, bool):
            raise ValueError(f"`shared_trace` (={self.shared_trace!r}) must be True, False or None (automatic)")
        if self.shared_trace and not _can_share_trace(self):
            raise ValueError(
                f"`shared_trace` with order 2 needs estimator 'finite_difference', not {self.estimator!r} "
                "(the exact estimator differentiates through the virtual step)"
            )
        if self.xi is not None and not self.xi > 0:
            raise ValueError(f"`xi` (={self.xi!r}) must be positive, or None for the current weight lr")

    def replace(self, **changes) -> "SearchConfig":
        """A copy with `changes`; unknown option names are an error naming them."""
        return replace_known(self, "search", changes)


def _can_share_trace(config: SearchConfig) -> bool:
    """Whether the step can trace one gradient for all its phases: first order, or second order
    with finite differences (the exact estimator differentiates through the virtual step)."""
    return config.order == 1 or config.estimator == "finite_difference"


class SearchState(eqx.Module):
    """Everything that changes during a search: the scan carry."""

    weights: PyTree
    arch: PyTree
    w_opt_state: PyTree
    a_opt_state: PyTree
    step: Int[Array, ""]
    key: PRNGKeyArray


def initial_state(weights, arch, w_opt, a_opt, key: PRNGKeyArray) -> SearchState:
    """The search state at step 0. Both optimiser states are initialised by one compiled program:
    eagerly, every distinct weight shape compiles its own (51 at C=8, layers=5), and XLA:CPU keeps
    about 1.3 MB per compiled program for the life of the process (62 MB here)."""
    w_opt_state, a_opt_state = jax.jit(lambda w, a: (w_opt.init(w), a_opt.init(a)))(weights, arch)
    return SearchState(weights, arch, w_opt_state, a_opt_state, jnp.zeros((), jnp.int32), key)


class StepMetrics(NamedTuple):
    train_loss: Float[Array, ""]
    train_acc: Float[Array, ""]
    val_loss: Float[Array, ""]
    val_acc: Float[Array, ""]
    w_grad_norm: Float[Array, ""]
    a_grad_norm: Float[Array, ""]


@dataclass(frozen=True)
class SearchResult:
    """What `search` returns: the derived genotype, the trained supernet, the discretised network
    (`discretize(supernet, genotype)`; None for a partial-channel or NB201 search), the per-epoch history
    (deterministic: no wall-clock times), the config used, the wall-clock seconds of each epoch
    run in this call, and the epoch at which DARTS-ES stopped the search (None if it did not)."""

    genotype: Genotype | NB201Genotype
    supernet: Any
    network: Any
    history: list[dict]
    config: SearchConfig
    epoch_seconds: list[float] = dataclasses.field(default_factory=list)
    stopped_at: int | None = None


def build_supernet(config: SearchConfig, image_shape, num_classes: int, *, key: PRNGKeyArray):
    """The supernet of `config.space` for images of `image_shape` (height, width, channels):
    the DARTS network, the NAS-Bench-201 network (`layers` = cells per stage), or for any other
    space a `SeedNetwork` of `layers` mixed ops over it."""
    height, width, in_channels = image_shape
    reductions = {"darts": len(reduction_layers(config.layers)), "nb201": 2}.get(config.space, 0)
    factor = 2**reductions
    if height % factor or width % factor:
        raise ValueError(
            f"images of {height}x{width} cannot pass {reductions} reduction cells: height and width must be "
            f"divisible by {factor}"
        )
    if config.space == "darts":
        return SearchNetwork(
            config.channels, config.layers, num_classes, in_channels, partial_channels=config.partial_channels, key=key
        )
    if config.space == "nb201":
        from .nb201 import NB201Network

        return NB201Network(config.channels, config.layers, num_classes, in_channels, key=key)
    model = SeedNetwork(
        config.channels, config.layers, num_classes, in_channels, space=get_space(config.space), key=key
    )
    _check_op_shapes(model, height, width)
    return model


def _check_op_shapes(model: SeedNetwork, height: int, width: int) -> None:
    """Every op of a (custom) space must keep an NHWC batch's shape: checked abstractly, before
    anything is compiled, naming the op that does not."""
    x = jax.ShapeDtypeStruct((2, height, width, model.stem.norm.weight.shape[0]), jnp.float32)
    for name, op in zip(model.op_names, model.mixed[0].ops):
        try:
            out = eqx.filter_eval_shape(op, x)
        except Exception as e:  # a user's op may fail in any way: name it
            raise ValueError(f"op {name!r} of space {model.space_name!r} fails on a {x.shape} batch: {e}") from None
        if getattr(out, "shape", None) != x.shape:
            raise ValueError(
                f"op {name!r} of space {model.space_name!r} maps a {x.shape} batch to "
                f"{getattr(out, 'shape', type(out).__name__)}: ops must keep the shape at stride 1"
            )


def cosine_lr(lr: float, lr_min: float, epochs: int, epoch):
    """The paper's cosine annealing from `lr` to `lr_min`, stepped once per epoch."""
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))


def epoch_lr(config: SearchConfig, epoch):
    """The weight lr of the search in `epoch` (from 0)."""
    return cosine_lr(config.w_lr, config.w_lr_min, config.epochs, epoch)


def clipped_sgd(lr_of_epoch, steps_per_epoch: int, momentum: float, weight_decay: float, grad_clip: float):
    """Clip to global norm, add L2 weight decay, SGD with momentum on a per-epoch lr (the
    original's `clip_grad_norm_` + `SGD(weight_decay=)` + an epoch-stepped scheduler)."""
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.add_decayed_weights(weight_decay),
        optax.sgd(lambda count: lr_of_epoch(count // steps_per_epoch), momentum=momentum),
    )


def weight_optimizer(config: SearchConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The search's SGD on the weights."""
    return clipped_sgd(
        lambda epoch: epoch_lr(config, epoch),
        steps_per_epoch,
        config.w_momentum,
        config.w_weight_decay,
        config.grad_clip,
    )


def arch_optimizer(config: SearchConfig) -> optax.GradientTransformation:
    """Adam on alpha with L2 weight decay added to the gradient (PyTorch's `Adam(weight_decay=)`)."""
    return optax.chain(
        optax.add_decayed_weights(config.a_weight_decay),
        optax.adam(config.a_lr, b1=config.a_beta1, b2=config.a_beta2, eps=1e-8),
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
):
    """One DARTS step: alpha on `val_batch`, then weights on `train_batch`. First order unless
    `arch_grad(state, static, train_batch, val_batch) -> ((val_loss, val_acc), grads)` is given
    (see `second_order_gradient`); `arch_reg(arch, step)`, a regulariser of alpha alone, is added
    to the validation loss (its gradient to alpha's); `arch_view(arch, step)` is alpha as both
    forward passes see it (DARTS-'s auxiliary skip). With `shared_trace`, the step traces the
    supernet's gradient once for all its phases (first order: the alpha and the weight step;
    second order with finite differences: the virtual step, the gradient at w', the two at w+-
    and the weight step), the CPU's convolutions and pointwise matmuls gating their weight
    gradients off in the phases that need alpha's gradient alone. Its compile takes 16-26% (first
    order) and about 55% (second order: 49-54 against 112-125 s) less time at C=16, layers=8, and
    at C=8, layers=5 it runs 2-25% slower than separate traces (`search` picks per config:
    `resolve_shared_trace`; figures in experiments/README.md)."""

    def view(arch):
        return arch if arch_view is None else arch_view(arch, state.step)

    if shared_trace and arch_grad is None:
        return _gated_first_order_step(state, static, w_opt, a_opt, train_batch, val_batch, arch_reg, view)
    if shared_trace:
        if not (isinstance(arch_grad, UnrolledGradient) and arch_grad.config.estimator == "finite_difference"):
            raise ValueError(
                "shared_trace with a second-order gradient needs `second_order_gradient(config, ...)` with "
                "estimator 'finite_difference' (the exact one differentiates through the virtual step), "
                f"got {arch_grad!r}"
            )
        return _gated_second_order_step(state, static, w_opt, a_opt, train_batch, val_batch, arch_grad, arch_reg, view)
    loss_gradient = _loss_gradient(static, arch_view)
    if arch_grad is None:
        (val_loss, val_acc), (_, a_grads) = loss_gradient(state.weights, state.arch, state.step, *val_batch)
    else:
        (val_loss, val_acc), a_grads = arch_grad(state, static, train_batch, val_batch)
    a_grads = _regularised(a_grads, state, arch_reg)
    stepped = _alpha_update(state, a_opt, a_grads)
    (train_loss, train_acc), (w_grads, _) = loss_gradient(stepped.weights, stepped.arch, state.step, *train_batch)
    new = dataclasses.replace(_weight_update(stepped, w_opt, w_grads), step=state.step + 1)
    norms = optax.tree.norm(w_grads), optax.tree.norm(a_grads)  # before clipping: for the NaN guard
    return new, StepMetrics(train_loss, train_acc, val_loss, val_acc, *norms)


def _loss_gradient(static, arch_view):
    """`loss_gradient(weights, arch, step, x, y) -> ((loss, acc), (grad_w, grad_alpha))`, jitted:
    the weight step's gradient (training batch), and in first order also alpha's (validation
    batch). Called twice with the same shapes inside the step, it is traced and lowered once; XLA
    inlines both calls and drops the gradient each one does not use, so the step computes what two
    separately traced gradients compute, with 22-38% less tracing and lowering at C=16, layers=8
    (experiments/README.md)."""

    @jax.jit
    def loss_gradient(weights, arch, step, x, y):
        def loss(wa):
            arch_in = wa[1] if arch_view is None else arch_view(wa[1], step)
            return supernet_loss(arch_in, wa[0], static, x, y)

        return eqx.filter_value_and_grad(loss, has_aux=True)((weights, arch))

    return loss_gradient


def _regularised(a_grads, state: SearchState, arch_reg):
    """alpha's gradient plus that of the regulariser `arch_reg(arch, step)`, if any."""
    if arch_reg is None:
        return a_grads
    reg_grads = jax.grad(arch_reg)(state.arch, state.step)
    return jax.tree.map(lambda g, r: g + r, a_grads, reg_grads)


def _alpha_update(state: SearchState, a_opt, a_grads) -> SearchState:
    a_updates, a_opt_state = a_opt.update(a_grads, state.a_opt_state, state.arch)
    return dataclasses.replace(state, arch=eqx.apply_updates(state.arch, a_updates), a_opt_state=a_opt_state)


def _weight_update(state: SearchState, w_opt, w_grads) -> SearchState:
    w_updates, w_opt_state = w_opt.update(w_grads, state.w_opt_state, state.weights)
    return dataclasses.replace(state, weights=eqx.apply_updates(state.weights, w_updates), w_opt_state=w_opt_state)


def _gated_first_order_step(state, static, w_opt, a_opt, train_batch, val_batch, arch_reg, view):
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
        a_grads = _regularised(a_grads, state, arch_reg)
        state = lax.cond(
            is_weight_phase,
            lambda s: _weight_update(s, w_opt, w_grads),
            lambda s: _alpha_update(s, a_opt, a_grads),
            state,
        )
        # before clipping: for the NaN guard
        norm = jnp.where(is_weight_phase, optax.tree.norm(w_grads), optax.tree.norm(a_grads))
        return state, (loss, acc, norm)

    state, (loss, acc, norm) = lax.scan(phase, state, (jnp.array([False, True]), batches))
    state = dataclasses.replace(state, step=state.step + 1)
    return state, StepMetrics(loss[1], acc[1], loss[0], acc[0], norm[1], norm[0])


def _select(pick, new, old):
    """Per leaf, `new` where `pick` else `old` (a traced scalar choice, no conditional)."""
    return jax.tree.map(lambda n, o: jnp.where(pick, n, o), new, old)


# Which of the step's metrics (train loss, train acc, val loss, val acc, |w grad|, |alpha grad|)
# each phase of `_gated_second_order_step` sets.
_METRICS_OF_PHASE = np.array(
    [[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [1, 1, 0, 0, 1, 0]], bool
)


def _phase_weights(weights, g_w, buffer, c_grad, c_step, config):
    """w + c_grad * g_w + c_step * (momentum * buffer + weight_decay * w), per leaf: w' of the
    virtual step (`unrolled_weights`) with c_grad = c_step = -xi, w +- eps g_w (Eq. 8's w+-) with
    c_grad = +-eps and c_step = 0. Expanded so that every product has a phase-dependent factor:
    XLA hoists a loop-invariant `momentum * buffer` or `weight_decay * w` out of the phase loop
    as one more kernel and buffer per weight leaf (650 kernels at C=8). With this form, back to
    back at C=16, layers=8: lower+compile 56-61 -> 51 s, compile peak 2.24-2.37 -> 2.08-2.13 GB."""
    decay, momentum = config.w_weight_decay, config.w_momentum
    if buffer is None:
        return jax.tree.map(lambda w, g: w * (1 + c_step * decay) + c_grad * g, weights, g_w)
    return jax.tree.map(
        lambda w, g, b: w * (1 + c_step * decay) + c_grad * g + (c_step * momentum) * b, weights, g_w, buffer
    )


def _gated_second_order_step(state, static, w_opt, a_opt, train_batch, val_batch, unrolled, arch_reg, view):
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
    the weights or their optimiser state. (A `lax.switch` over the whole state made XLA:CPU copy
    every passed-through leaf in each branch: lower+compile at C=16, layers=8 took 69.6 s with it,
    60.4 s without, back to back.) The same step as the separately traced form up to rounding
    (tested): w' is formed in another fusion than there, and the finite difference magnifies its
    last-bit differences (state within 3e-8 at C=4)."""
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
        weights = _phase_weights(
            state.weights, g_w, buffer, jnp.where(p == 1, -xi, sign * eps), jnp.where(p == 1, -xi, 0.0), config
        )
        arch_in = _select(p == 4, view(arch), arch)
        with kernel_gradient_gate(gate):
            (loss, acc), (gw, ga) = eqx.filter_value_and_grad(
                lambda wa: supernet_loss(wa[1], wa[0], static, x, y), has_aux=True
            )((weights, arch_in))
        # the alpha step, taken in phase 3 (computed in every phase: alpha and its state are small)
        a_grads = _regularised(finite_difference_gradient(g_arch, g_plus, ga, eps, xi), state, arch_reg)
        a_updates, a_opt_new = a_opt.update(a_grads, a_opt_state, arch)
        values = jnp.stack([loss, acc, loss, acc, optax.tree.norm(gw), optax.tree.norm(a_grads)]).astype(wide)
        metrics = jnp.where(jnp.asarray(_METRICS_OF_PHASE)[p], values, metrics)
        carry = (
            _select(gate > 0, gw, g_w),
            _select(p == 3, eqx.apply_updates(arch, a_updates), arch),
            _select(p == 3, a_opt_new, a_opt_state),
            _select(p == 1, ga, g_arch),
            _select(p == 2, ga, g_plus),
            jnp.where(p == 1, finite_difference_step(gw).astype(dtype), eps),
            metrics,
        )
        return carry, None

    carry, _ = lax.scan(phase, carry, (jnp.arange(5), kernel_gradients, shift, batches))
    w_grads, arch, a_opt_state, *_, metrics = carry
    state = _weight_update(dataclasses.replace(state, arch=arch, a_opt_state=a_opt_state), w_opt, w_grads)
    return dataclasses.replace(state, step=state.step + 1), StepMetrics(*metrics)


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


def resolve_shared_trace(config: SearchConfig, checkpointed: bool | None = None) -> bool:
    """Whether a search with `config` traces the supernet's gradient once per step (see
    `SearchConfig.shared_trace`): the config's choice when it makes one; else, resuming, what the
    checkpoint ran with (`checkpointed`), so that an old search continues as it ran; else, on
    CPU, the shared trace for second order with finite differences (about half the compile time
    and two-thirds of the memory of separate traces, for 2-12% of speed in the latest runs), and
    separate traces for first order (there the shared trace is 16-20% slower for 16-26% less
    compile). Elsewhere separate traces: the shared trace gates the convolutions' kernel
    gradients on CPU only, and it has not been measured on accelerators."""
    if config.shared_trace is not None:
        return config.shared_trace
    supported = _can_share_trace(config)
    if checkpointed is not None and (supported or not checkpointed):
        return checkpointed
    return supported and config.order == 2 and jax.default_backend() == "cpu"


def second_order_gradient(config: SearchConfig, steps_per_epoch: int) -> UnrolledGradient:
    """The `arch_grad` of `search_step` for `config.order == 2` (see `UnrolledGradient`)."""
    return UnrolledGradient(config, steps_per_epoch)


def make_chunk_fn(static, w_opt, a_opt, mesh=None, arch_grad=None, arch_reg=None, arch_view=None, shared_trace=False):
    """A jitted `chunk((images, labels, train_idx, val_idx), state) -> (state, metrics)` that
    runs one search step per row of the index arrays `[steps, batch]` inside a `lax.scan`. The
    data stays on device and only indices change per call, so nothing recompiles; the state's
    buffers are donated, so a chunk does not hold two copies of the supernet. With a `mesh`, each
    gathered batch stays split over its `data` axis (see `_parallel`)."""
    constrain = _parallel.batch_constraint(mesh)

    @loop_jit
    def chunk(inputs, state):
        images, labels, train_idx, val_idx = inputs

        def body(state, idx):
            it, iv = idx
            train = constrain(images[it]), constrain(labels[it])
            val = constrain(images[iv]), constrain(labels[iv])
            return search_step(state, static, w_opt, a_opt, train, val, arch_grad, arch_reg, arch_view, shared_trace)

        # The depthwise FFI kernel has no partitioning rule: under a mesh, the composed kernels.
        with _conv.without_depthwise_kernel() if mesh is not None else contextlib.nullcontext():
            return lax.scan(body, state, (train_idx, val_idx))

    return chunk


def arch_weights(model) -> dict[str, np.ndarray]:
    """softmax(alpha) of each cell type, by name."""
    if isinstance(model, SearchNetwork):
        out = {
            "alpha_normal": _parallel.fetch(model.alpha_normal.weights()),
            "alpha_reduce": _parallel.fetch(model.alpha_reduce.weights()),
        }
        if model.beta_normal is not None:
            out["beta_normal"] = _parallel.fetch(model.beta_normal.weights())
            out["beta_reduce"] = _parallel.fetch(model.beta_reduce.weights())
        return out
    return {"alpha": _parallel.fetch(model.alpha.weights())}


def _progress(total: int, initial: int, enabled: bool | None):
    from tqdm.auto import tqdm

    # tqdm's disable=None turns the bar off when stderr is not a terminal.
    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        disable=None if enabled is None else not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )


# Fields that may differ between a checkpoint and the search resuming it, when asked for by name:
# more (or fewer, but not fewer than done) epochs continue the same search on a longer schedule.
SAFE_TO_CHANGE = ("epochs",)
# Search options added after checkpoints existed, with the value that reproduces how searches
# without them ran; a checkpoint that lacks one compares as that value.
ADDED_AFTER_CHECKPOINTS = {"shared_trace": False}
DEFAULT_CHECKPOINT_EVERY = 100


def chunking(config: SearchConfig, steps_per_epoch: int, checkpoint_every: int | None) -> tuple[int, int]:
    """`(steps per chunk, chunks per epoch)`. With `steps_per_chunk` set, the epoch is cut to whole
    chunks; otherwise a chunk is the whole epoch, or, when checkpointing, its largest divisor of at
    most `checkpoint_every` steps, so that checkpoints fall on chunk ends and the epoch is not cut.
    The chunk length does not change the result: every chunk runs the same scan body."""
    if config.steps_per_chunk is not None:
        chunk_len = min(config.steps_per_chunk, steps_per_epoch)
    elif checkpoint_every is not None:
        chunk_len = max(d for d in range(1, min(checkpoint_every, steps_per_epoch) + 1) if steps_per_epoch % d == 0)
    else:
        chunk_len = steps_per_epoch
    return chunk_len, steps_per_epoch // chunk_len


def data_fingerprint(data) -> dict:
    """What identifies the search data in a checkpoint: sizes and a SHA-256 of the training arrays."""
    digest = hashlib.sha256()
    for a in (data.x_train, data.y_train):
        digest.update(np.ascontiguousarray(a).tobytes())
    return {
        "name": data.name,
        "train": len(data.x_train),
        "image_shape": list(data.image_shape),
        "num_classes": data.num_classes,
        "sha256": digest.hexdigest(),
    }


def _as_typed_key(key) -> PRNGKeyArray:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def _saved(state: SearchState) -> SearchState:
    """The state as plain arrays (typed PRNG keys are stored as their raw key data)."""
    return eqx.tree_at(lambda s: s.key, state, jax.random.key_data(state.key))


def _unsaved(saved: SearchState, impl: str) -> SearchState:
    return eqx.tree_at(lambda s: s.key, saved, jax.random.wrap_key_data(saved.key, impl=impl))


def _checkpoint_config(manifest: dict) -> dict:
    """The search config a checkpoint's manifest records; an option added since counts as the
    value it ran with (`ADDED_AFTER_CHECKPOINTS`). Empty when the manifest records none."""
    old = manifest.get("config", {})
    return {**ADDED_AFTER_CHECKPOINTS, **old} if old else old


def _check_resumable(path: str, manifest: dict, expected: dict, allow_changes) -> None:
    """Raise `CheckpointError` naming every way the checkpoint at `path` is not this search's."""
    old, new = _checkpoint_config(manifest), expected["config"]
    differing = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    blocked = [k for k in differing if k not in allow_changes]
    problems = []
    if blocked:
        fields = ", ".join(f"{k} (checkpoint {old.get(k)!r}, now {new.get(k)!r})" for k in blocked)
        safe = [k for k in blocked if k in SAFE_TO_CHANGE]
        hint = f"; to change {safe} on purpose, allow it (allow_changes / --allow-change)" if safe else ""
        problems.append(f"the config differs in {fields}{hint}")
    old_data, new_data = manifest.get("data", {}), expected["data"]
    if old_data.get("sha256") != new_data["sha256"]:
        problems.append(
            f"the data set differs (checkpoint: {old_data.get('name')!r}, {old_data.get('train')} images "
            f"{old_data.get('image_shape')}; now: {new_data['name']!r}, {new_data['train']} images "
            f"{new_data['image_shape']})"
        )
    if manifest.get("key") != expected["key"]:
        problems.append("the key (seed) differs")
    if problems:
        raise CheckpointError(f"cannot resume from {path}: " + "; ".join(problems))
    if manifest["epoch"] > new["epochs"]:
        raise CheckpointError(
            f"cannot resume from {path}: it has done {manifest['epoch']} epochs, more than epochs={new['epochs']}"
        )


def search(
    key: PRNGKeyArray,
    data=None,
    config: SearchConfig | None = None,
    *,
    progress: bool | None = None,
    callback=None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    resume: bool = False,
    allow_changes=(),
    devices=None,
    **options,
) -> SearchResult:
    """Run a first-order DARTS search.

    **Arguments:**
    - `key`: a JAX PRNG key; it decides the initial weights and alpha, the 50/50 split and the
      data order, so the same key, data and config give the same search, bit for bit on CPU.
    - `data`: anything `darts_eqx.data.load` accepts (default: the embedded digits).
    - `config`: a `SearchConfig`; keyword `options` override its fields.
    - `progress`: show a progress bar (default: only on a terminal).
    - `callback`: called as `callback(history, supernet)` after each epoch, with the list of all
      epoch records so far (restored ones included after a resume).
    - `checkpoint_dir`: write checkpoints of the whole search state there, at least every
      `checkpoint_every` steps and at the end of each epoch (the two newest are kept).
    - `resume`: continue from the newest intact checkpoint in `checkpoint_dir` (an older one, with a
      `CheckpointWarning`, if the newest is damaged; a fresh start if there is none). The result is
      bit-for-bit that of the same search never interrupted (same jax/darts_eqx versions and XLA
      settings: a different compiler may round differently). A checkpoint of another config, data
      set or key is a `CheckpointError` naming the differences; `allow_changes=("epochs",)` accepts
      a different number of epochs.
    - `devices`: data-parallel search over this many of `jax.devices()` (or a list of devices;
      default: all). Each global batch is split over them, everything else is replicated, and
      gradients and batch-norm statistics are over the global batch: the same search as on one
      device, up to the order of floating-point sums. `batch_size` must divide evenly.

    **Returns:** a `SearchResult`.

    **Raises:** `SearchDiverged` when a loss, gradient norm, weight or alpha becomes non-finite,
    naming the step and the quantity; the checkpoints written before stay in place.
    """
    config = (config or SearchConfig()).replace(**options)
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every (={checkpoint_every!r}) must be a positive integer")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir to resume from")
    allow_changes = tuple(allow_changes)
    unsafe = [k for k in allow_changes if k not in SAFE_TO_CHANGE]
    if unsafe:
        raise ValueError(f"allow_changes {unsafe}: only {list(SAFE_TO_CHANGE)} may differ from a checkpoint")
    checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
    if checkpoint_dir is not None and not resume and _checkpoint.list_checkpoints(checkpoint_dir):
        raise ValueError(
            f"{checkpoint_dir} holds checkpoints of a search: continue it with resume=True, or use another directory"
        )
    found = _checkpoint.latest(checkpoint_dir) if resume else None
    checkpointed = None if found is None else _checkpoint_config(found[1]).get("shared_trace")
    config = config.replace(shared_trace=resolve_shared_trace(config, checkpointed))
    mesh = _parallel.data_mesh(devices)
    _parallel.check_batch(config.batch_size, mesh)
    data = load(data)
    n = len(data.x_train)
    n_train = int(round(n * config.train_portion))
    n_val = n - n_train
    steps_per_epoch = min(n_train, n_val) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size (={config.batch_size}) is larger than the search split: {n} training images "
            f"give {n_train} for weights and {n_val} for alpha"
        )
    chunk_len, chunks_per_epoch = chunking(config, steps_per_epoch, checkpoint_every if checkpoint_dir else None)
    steps_per_epoch = chunks_per_epoch * chunk_len

    key = _as_typed_key(key)
    key_model, key_split, key_state = jax.random.split(key, 3)
    model = build_supernet(config, data.image_shape, data.num_classes, key=key_model)
    arch, weights, static = split_arch(model)
    w_opt, a_opt = weight_optimizer(config, steps_per_epoch), arch_optimizer(config)
    state = initial_state(weights, arch, w_opt, a_opt, key_state)
    order = np.asarray(jax.random.permutation(key_split, n))
    train_pool, val_pool = jnp.asarray(order[:n_train]), jnp.asarray(order[n_train:])
    key_order = jax.random.fold_in(key_split, 1)
    identity = None
    if checkpoint_dir is not None:  # what a checkpoint must match; hashing the data costs a pass over it
        identity = {
            "darts_eqx": __version__,
            "config": dataclasses.asdict(config),
            "data": data_fingerprint(data),
            "key": np.asarray(jax.random.key_data(key)).tolist(),
        }
    key_impl = str(jax.random.key_impl(key_state))

    history, epoch_metrics, start_epoch, start_step, last_checkpoint = [], [], 0, 0, None
    if resume:
        if found is None:
            warnings.warn(f"no checkpoint in {checkpoint_dir}: starting a new search", CheckpointWarning, stacklevel=2)
        else:
            last_checkpoint, manifest = found
            _check_resumable(last_checkpoint, manifest, identity, allow_changes)
            # format 1 stored each cell's ops per source: read through that view, then stack
            per_source, like = manifest["format"] == 1, _saved(state)
            like = per_source_view(like) if per_source else like
            loaded = _checkpoint.load_arrays(last_checkpoint, like)
            state = _unsaved(from_per_source_view(loaded) if per_source else loaded, key_impl)
            state = _parallel.replicate(state, mesh)
            start_epoch, start_step, history = manifest["epoch"], manifest["epoch_step"], manifest["history"]
            if start_step % chunk_len:  # written with another chunking: shorter chunks, same result
                chunk_len = math.gcd(chunk_len, start_step)
                chunks_per_epoch = steps_per_epoch // chunk_len
            if start_step:
                epoch_metrics = [StepMetrics(*(np.asarray(v, np.float32) for v in manifest["epoch_metrics"]))]

    def save_checkpoint(epoch: int, epoch_step: int, metrics: list[StepMetrics]) -> str:
        joined = [np.concatenate(v).tolist() for v in zip(*metrics)] if metrics else None
        record = {**identity, "epoch": epoch, "epoch_step": epoch_step, "history": history, "epoch_metrics": joined}
        step = int(_parallel.fetch(state.step))
        if not _parallel.is_main_process():  # one writer; every process holds the same state
            return os.path.join(checkpoint_dir, f"step-{step:09d}")
        return _checkpoint.save(checkpoint_dir, step, jax.tree.map(_parallel.fetch, _saved(state)), record)

    if mesh is None:
        device_data = (jnp.asarray(data.x_train), jnp.asarray(data.y_train))
    else:
        state = _parallel.replicate(state, mesh)
        device_data = _parallel.replicate((data.x_train, data.y_train), mesh)
    arch_grad = second_order_gradient(config, steps_per_epoch) if config.order == 2 else None
    arch_reg = None
    if config.beta_reg > 0:

        def arch_reg(arch, step):
            return ramp(config.beta_reg, step // steps_per_epoch, config.epochs) * beta_regularizer(arch)

    arch_view = None
    if config.aux_skip > 0:
        arch_view = aux_skip_view(get_space(config.space).op_names, config.aux_skip, config.epochs, steps_per_epoch)
    chunk = make_chunk_fn(static, w_opt, a_opt, mesh, arch_grad, arch_reg, arch_view, config.shared_trace)
    track_hessian = config.hessian or config.early_stop_factor is not None
    if track_hessian:
        # a fixed validation batch, so that the eigenvalues of different epochs compare
        fixed = val_pool[: config.batch_size]
        hessian_batch = (device_data[0][fixed], device_data[1][fixed])

        @eqx.filter_jit
        def eigenvalue(arch, weights, x, y, key):
            loss = lambda a: supernet_loss(a, weights, static, x, y)[0]  # noqa: E731
            return hessian_eigenvalue(loss, arch, key=key, iterations=config.hessian_iterations)

    stopped_at = None
    used = steps_per_epoch * config.batch_size
    epoch_seconds = []
    unsaved_steps = 0
    bar = _progress(config.epochs * steps_per_epoch, start_epoch * steps_per_epoch + start_step, progress)
    try:
        for epoch in range(start_epoch, config.epochs):
            start = time.perf_counter()
            key_t, key_v = jax.random.split(jax.random.fold_in(key_order, epoch))
            train_idx = jax.random.permutation(key_t, train_pool)[:used].reshape(chunks_per_epoch, chunk_len, -1)
            val_idx = jax.random.permutation(key_v, val_pool)[:used].reshape(chunks_per_epoch, chunk_len, -1)
            if mesh is not None:
                train_idx, val_idx = np.asarray(train_idx), np.asarray(val_idx)
            first_chunk = start_step // chunk_len if epoch == start_epoch else 0
            if epoch != start_epoch:
                epoch_metrics = []
            for c in range(first_chunk, chunks_per_epoch):
                step_before = int(_parallel.fetch(state.step))
                idx = _parallel.shard_rows(train_idx[c], mesh), _parallel.shard_rows(val_idx[c], mesh)
                state, m = chunk((*device_data, *idx), state)
                m = jax.tree.map(_parallel.fetch, m)
                _check_finite(m, state, step_before, epoch, last_checkpoint)
                epoch_metrics.append(m)
                bar.update(chunk_len)
                unsaved_steps += chunk_len
                epoch_step = (c + 1) * chunk_len
                if checkpoint_dir and epoch_step < steps_per_epoch and unsaved_steps + chunk_len > checkpoint_every:
                    last_checkpoint, unsaved_steps = save_checkpoint(epoch, epoch_step, epoch_metrics), 0
            metrics = StepMetrics(*(np.concatenate(v) for v in zip(*epoch_metrics)))
            supernet = combine_arch(state.arch, state.weights, static)
            record = {
                "epoch": epoch + 1,
                **{name: float(values.mean()) for name, values in metrics._asdict().items()},
                "lr": float(epoch_lr(config, epoch)),
                **{k: v.tolist() for k, v in arch_weights(supernet).items()},
            }
            if track_hessian:
                key_eig = jax.random.fold_in(jax.random.fold_in(key_split, 2), epoch)  # key_state is donated
                record["hessian_eigenvalue"] = float(
                    _parallel.fetch(eigenvalue(state.arch, state.weights, *hessian_batch, key_eig))
                )
            history.append(record)
            epoch_seconds.append(time.perf_counter() - start)
            if checkpoint_dir:
                last_checkpoint, unsaved_steps = save_checkpoint(epoch + 1, 0, []), 0
            bar.set_postfix(epoch=epoch + 1, train_acc=f"{record['train_acc']:.3f}", val_acc=f"{record['val_acc']:.3f}")
            if callback is not None:
                callback(list(history), supernet)
            if config.early_stop_factor is not None:
                eigenvalues = [h["hessian_eigenvalue"] for h in history]
                if grew(eigenvalues, config.early_stop_factor, config.early_stop_window):
                    stopped_at = epoch + 1
                    break
    finally:
        bar.close()
    if mesh is not None:  # hand back ordinary single-device arrays
        state = _unsaved(jax.tree.map(lambda x: jnp.asarray(_parallel.fetch(x)), _saved(state)), key_impl)
    supernet = combine_arch(state.arch, state.weights, static)
    if stopped_at is None:
        genotype = derive_genotype(supernet)
    else:  # DARTS-ES: the architecture from before the eigenvalue grew
        genotype = derive_genotype(_with_recorded_alpha(supernet, history[stopped_at - 1 - config.early_stop_window]))
    # A partial-channel supernet's weights fit 1/k-wide ops only; NB201 is scored by lookup.
    network = discretize(supernet, genotype) if config.partial_channels == 1 and config.space != "nb201" else None
    return SearchResult(genotype, supernet, network, history, config, epoch_seconds, stopped_at)


def _with_recorded_alpha(supernet, record: dict):
    """`supernet` with the alpha (and beta) whose softmax a history record holds."""
    for name in ("alpha", "alpha_normal", "alpha_reduce", "beta_normal", "beta_reduce"):
        if name in record:
            logits = jnp.log(jnp.asarray(record[name], jnp.float32))
            supernet = eqx.tree_at(lambda m, name=name: getattr(m, name).logits, supernet, logits)
    return supernet


@eqx.filter_jit
def _finite(state: SearchState):
    def all_finite(tree):
        leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))]
        return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)

    return all_finite(state.weights), all_finite(state.arch)


def _check_finite(metrics: StepMetrics, state: SearchState, step_before: int, epoch: int, last_checkpoint):
    """Stop at the first non-finite loss or gradient norm of a chunk, or non-finite weights/alpha
    after it, before anything derived from it is saved."""
    kept = f"; the last good checkpoint {last_checkpoint} is kept" if last_checkpoint else ""
    for name, values in metrics._asdict().items():
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise SearchDiverged(
                f"{name} became non-finite ({values[bad[0]]}) at step {step_before + int(bad[0]) + 1} "
                f"(epoch {epoch + 1}); the search stopped and no genotype was derived{kept}. Try a lower w_lr or a_lr."
            )
    weights_ok, arch_ok = (bool(_parallel.fetch(v)) for v in _finite(state))
    for name, ok in (("weights", weights_ok), ("alpha", arch_ok)):
        if not ok:
            raise SearchDiverged(
                f"{name} became non-finite by step {int(_parallel.fetch(state.step))} (epoch {epoch + 1}); "
                f"the search stopped and no genotype was derived{kept}"
            )
