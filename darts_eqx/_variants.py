"""The DARTS variants that fix its drift towards parameter-free cells, each a method plug-in (see
`_methods`), and the names the config and the command line know them by (`METHODS`).

Each follows its paper and the authors' released code, whose hyper-parameters are the defaults:
- `gdas`: one op per edge sampled by Gumbel-max, straight-through weights (Dong & Yang, 2019);
- `drnas`: op weights drawn from a Dirichlet whose concentration alpha sets (Chen et al., 2021);
- `sdarts`: the weight step trained at randomly or adversarially perturbed op weights (Chen &
  Hsieh, 2020);
- `fairdarts`: independent sigmoids and a zero-one loss (Chu et al., 2020).
"""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from ._guards import alpha_logits
from ._methods import Method, MethodContext, Plugin, relaxation_view
from ._mixed import SampledWeights
from ._op_names import droppable_op


def gdas(tau_max: float = 10.0, tau_min: float = 0.1) -> Plugin:
    """GDAS (Dong & Yang, CVPR 2019, Eq. 3-5): on every edge one op is sampled by Gumbel-max from
    softmax(alpha), and only that op is evaluated. The op weights are the straight-through
    Gumbel-softmax: in value one-hot on the sampled op, in gradient softmax((log softmax(alpha) +
    g) / tau) (`gumbel_straight_through`). The temperature tau falls linearly from `tau_max` at the
    first epoch to `tau_min` at the last (the authors' NAS-Bench-201 code: 10 to 0.1). Alpha's and
    the weights' forward passes each draw their own sample; the genotype is alpha's argmax. As every
    step here, alpha's step comes first (the authors' code trains the weights first); the
    relaxation replaces softmax (relaxations chained before it are not used)."""
    if not 0 < tau_min <= tau_max:
        raise ValueError(f"gdas temperatures must satisfy 0 < tau_min <= tau_max, got {tau_min!r}, {tau_max!r}")

    def gdas(context: MethodContext) -> Method:
        epochs, steps = context.config.epochs, context.steps_per_epoch

        def relax(logits, step, inner, key):
            return gumbel_straight_through(logits, gdas_temperature(step // steps, epochs, tau_max, tau_min), key)

        return Method(relax=relax)

    return gdas


def gdas_temperature(epoch, epochs: int, tau_max: float, tau_min: float):
    """tau_max at epoch 0, falling linearly to tau_min at epoch `epochs - 1`."""
    return tau_max - (tau_max - tau_min) * epoch / max(epochs - 1, 1)


def gumbel_straight_through(logits, tau, key) -> SampledWeights:
    """GDAS' op weights: with g ~ Gumbel(0, 1) per op and h = softmax((log softmax(alpha) + g) / tau),
    the sampled op is argmax h and the weights one_hot - stop_gradient(h) + h."""
    g = jax.random.gumbel(key, logits.shape, logits.dtype)
    probs = jax.nn.softmax((jax.nn.log_softmax(logits, axis=-1) + g) / tau, axis=-1)
    index = jnp.argmax(probs, axis=-1)
    hard = jax.nn.one_hot(index, logits.shape[-1], dtype=probs.dtype)
    return SampledWeights(hard - lax.stop_gradient(probs) + probs, index)


def drnas(regulariser: str = "l2", scale: float = 1e-3, warmup: float = 0.2) -> Plugin:
    """DrNAS (Chen et al., ICLR 2021, Sec. 2.2): each forward pass draws the op weights of every edge
    from Dirichlet(beta), beta = elu(alpha) + 1, with pathwise gradients (`jax.random.dirichlet` is
    reparameterised). The regulariser keeps beta near the anchor Dirichlet(1): `"kl"` adds `scale`
    * the sum over edges of KL(Dir(beta) || Dir(1)) to alpha's loss (Eq. 5); `"l2"`, the released
    code's default, is an L2 penalty of `scale` (1e-3) on alpha, which is the search's own
    `a_weight_decay` (1e-3 by default): nothing is added here (set `a_weight_decay=0` with
    `"kl"`, as that code does). Alpha does not step during the first `warmup` share of the
    epochs, rounded down (that code trains the weights alone for the first 10 epochs of each
    stage: of 50 on NAS-Bench-201, of 25 in the DARTS space); a search whose epochs are extended
    on resume (`allow_changes`) recomputes it. The genotype is alpha's argmax (beta is monotonic
    in alpha). First order; the relaxation replaces softmax. Not built: the code's progressive
    stages (partial channels, then the ops pruned to the strongest few per edge with wider
    channels)."""
    if regulariser not in ("l2", "kl"):
        raise ValueError(f"drnas `regulariser` (={regulariser!r}) must be 'l2' or 'kl'")
    if not scale >= 0:
        raise ValueError(f"drnas `scale` (={scale!r}) must be >= 0")
    if not 0 <= warmup < 1:
        raise ValueError(f"drnas `warmup` (={warmup!r}) must be a share of the epochs in [0, 1)")

    def drnas(context: MethodContext) -> Method:
        def relax(logits, step, inner, key):
            return jax.random.dirichlet(key, dirichlet_concentration(logits), dtype=logits.dtype)

        def arch_loss(arch, step):
            return scale * sum(jnp.sum(dirichlet_kl_to_uniform(dirichlet_concentration(a))) for a in alpha_logits(arch))

        epochs = math.floor(warmup * context.config.epochs)  # below `epochs`, as warmup < 1
        return Method(relax=relax, arch_loss=arch_loss if regulariser == "kl" else None, arch_warmup=epochs or None)

    return drnas


def dirichlet_concentration(logits):
    """DrNAS' concentration: elu(alpha) + 1 (positive, and alpha + 1 for alpha >= 0)."""
    return jax.nn.elu(logits) + 1.0


def dirichlet_kl_to_uniform(concentration):
    """KL(Dir(c) || Dir(1, ..., 1)) of each row c, in closed form: log Gamma(sum c) - sum log Gamma(c)
    - log Gamma(K) + sum (c - 1) (digamma(c) - digamma(sum c))."""
    total = jnp.sum(concentration, axis=-1)
    k = concentration.shape[-1]
    cross = jnp.sum(
        (concentration - 1.0)
        * (jax.scipy.special.digamma(concentration) - jax.scipy.special.digamma(total)[..., None]),
        axis=-1,
    )
    return (
        jax.scipy.special.gammaln(total)
        - jnp.sum(jax.scipy.special.gammaln(concentration), axis=-1)
        - jax.scipy.special.gammaln(float(k))
        + cross
    )


def sdarts(attack: str = "random", epsilon: float = 0.3, steps: int = 7) -> Plugin:
    """SDARTS (Chen & Hsieh, ICML 2020, Eq. 4-6): the weight step trains at perturbed op weights
    A + delta, A = softmax(alpha) as the relaxation gives it, so that the weights suit a
    neighbourhood of A and the validation loss stays smooth in alpha. `attack="random"`
    (SDARTS-RS): delta ~ U(-eps, eps) per weight; `"adversarial"` (SDARTS-ADV): `steps` steps of
    L-inf PGD ascending the training loss from a random start, step 2 eps / steps, kept within
    the eps-ball, and dropped if it ends with a lower loss than A. After each move every edge's
    weights are clipped to [0, 1] and renormalised to sum 1 (`onto_simplex`). eps grows linearly
    with the epoch e of E, 0.03 + (`epsilon` - 0.03) e / E (0.03 at the first epoch, just under
    `epsilon`, 0.3, at the last), as the authors' code. Alpha's step
    is plain DARTS. The authors' PGD ran the supernet in eval mode, which in their NAS-Bench-201
    cells means running batch-norm statistics; here every pass uses batch statistics."""
    if attack not in ("random", "adversarial"):
        raise ValueError(f"sdarts `attack` (={attack!r}) must be 'random' or 'adversarial'")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sdarts `steps` (={steps!r}) must be a positive integer")
    if not epsilon > 0:
        raise ValueError(f"sdarts `epsilon` (={epsilon!r}) must be positive")

    def sdarts(context: MethodContext) -> Method:
        epochs, per_epoch = context.config.epochs, context.steps_per_epoch

        def perturb(weights, step, key, loss):
            eps = 0.03 + (epsilon - 0.03) * (step // per_epoch) / epochs
            if attack == "random":
                return random_perturbation(weights, eps, key)
            return pgd_perturbation(weights, eps, key, loss, steps)

        return Method(perturb=perturb)

    sdarts.__qualname__ = f"sdarts_{attack}"
    return sdarts


def onto_simplex(weights):
    """SDARTS' clip of each edge's op weights: clipped to [0, 1] and divided by their sum; an edge
    left all zero gets weight 1 on the op that was largest before clipping."""
    top = jax.nn.one_hot(jnp.argmax(weights, axis=-1), weights.shape[-1], dtype=weights.dtype)
    clipped = jnp.clip(weights, 0.0, 1.0)
    clipped = jnp.where(jnp.sum(clipped, axis=-1, keepdims=True) == 0, top, clipped)
    return clipped / jnp.sum(clipped, axis=-1, keepdims=True)


def random_perturbation(weights: list, eps, key) -> list:
    """Each weight moved by U(-eps, eps), then `onto_simplex`."""
    keys = jax.random.split(key, len(weights))
    return [onto_simplex(w + jax.random.uniform(k, w.shape, w.dtype, -eps, eps)) for w, k in zip(weights, keys)]


def pgd_perturbation(weights: list, eps, key, loss: Callable, steps: int) -> list:
    """L-inf PGD on the op weights that raises `loss(weights)`: a random start in the eps-ball,
    then `steps` signed-gradient steps of 2 eps / steps, each projected back into the ball around
    `weights` and `onto_simplex`; `weights` themselves if the result's loss is not above theirs."""
    size = 2.0 * eps / steps

    def ascend(_, current):
        grads = jax.grad(loss)(current)
        moved = [c + size * jnp.sign(g) for c, g in zip(current, grads)]
        return [onto_simplex(a + jnp.clip(m - a, -eps, eps)) for a, m in zip(weights, moved)]

    attacked = lax.fori_loop(0, steps, ascend, random_perturbation(weights, eps, key))
    worse = loss(attacked) >= loss(weights)
    return [jnp.where(worse, p, w) for p, w in zip(attacked, weights)]


def fairdarts(zero_one: float = 10.0) -> Plugin:
    """FairDARTS (Chu et al., ECCV 2020, Eq. 3-4): every op's weight is its own sigmoid(alpha), so
    ops do not compete within an edge, and alpha's loss adds `zero_one` (10, the authors' code) *
    L_01 = -mean over all alphas of (sigmoid(alpha) - 0.5)^2, which pushes each weight to 0 or 1.
    The genotype is the space's rule on the sigmoid weights (for the DARTS cell: each node's two
    edges whose strongest op but `none` is strongest, that op on each). As in the authors' code,
    there is no `none` op: where the space has one, its weight is 0 and it is left out of L_01
    (under independent sigmoids it gets no gradient from the task loss, so L_01 alone would push it
    to 0 or 1 by the sign of its initial alpha, and NAS-Bench-201's selection could pick it).
    Unlike their code, the selection is the space's rule rather than their 0.85 threshold (which
    may keep any number of edges), and the optimisers are the search config's (theirs: alpha Adam
    lr 3e-3, betas (0.9, 0.999)). First order; the relaxation replaces softmax."""
    if not zero_one >= 0:
        raise ValueError(f"fairdarts `zero_one` (={zero_one!r}) must be >= 0")

    def fairdarts(context: MethodContext) -> Method:
        drop = droppable_op(context.op_names)
        dropped = None if drop is None else context.op_names.index(drop)

        def relax(logits, step, inner, key):
            weights = jax.nn.sigmoid(logits)
            return weights if dropped is None else weights.at[..., dropped].set(0.0)

        def arch_loss(arch, step):
            weights = [jax.nn.sigmoid(a) for a in alpha_logits(arch)]
            if dropped is not None:
                weights = [jnp.delete(w, dropped, axis=-1, assume_unique_indices=True) for w in weights]
            flat = jnp.concatenate([w.ravel() for w in weights])
            return -zero_one * jnp.mean((flat - 0.5) ** 2)

        return Method(relax=relax, arch_loss=arch_loss, select=_selected_through(relax))

    return fairdarts


def _selected_through(relax):
    """A selection: the space's rule applied to the op weights `relax` gives (not softmax)."""
    from ._supernet import derive_genotype

    def sigmoid_only(logits, step, key):
        return relax(logits, step, None, key)

    def select(supernet):
        view = relaxation_view(sigmoid_only)
        arch = view(supernet.arch, jnp.int32(0), jax.random.key(0))
        return derive_genotype(eqx.tree_at(lambda m: m.arch, supernet, arch))

    return select


# The methods the config and the command line name (`SearchConfig.method`, `--method`), with the
# authors' defaults; `darts` adds nothing to the order's plug-in.
METHODS: dict[str, Callable[[], Plugin | None]] = {
    "darts": lambda: None,
    "gdas": gdas,
    "drnas": drnas,
    "sdarts-rs": lambda: sdarts("random"),
    "sdarts-adv": lambda: sdarts("adversarial"),
    "fairdarts": fairdarts,
}
