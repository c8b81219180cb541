"""DARTS variants as plug-ins, composed the way optax composes gradient transformations.

What tells DARTS variants apart is four small things, each a field of `Method`:

- `relax(logits, step, inner, key) -> weights`: how alpha becomes op weights in the forward pass.
  `inner(logits, step, key)` is the relaxation before it in the chain (softmax first), so
  relaxations stack: DARTS-'s auxiliary skip adds a decaying offset to whatever `inner` gives.
  `key` is a PRNG key of this forward pass and this alpha alone (each pass of each step gets its
  own, the same again when the search is rerun or resumed), for relaxations that sample (Gumbel, Dirichlet); one
  that samples and calls `inner` passes it a key of its own (`jax.random.split`). In second order
  only the weight step's forward pass sees the relaxation.
- `arch_loss(arch, step) -> scalar`: a term added to the validation loss that alpha descends
  (beta-DARTS' regularisation).
- `estimator`: the architecture gradient, `estimator(state, static, train_batch, val_batch) ->
  ((val_loss, val_acc), grads)` (`search_step`'s `arch_grad`); None is first order.
- `select(supernet) -> genotype`: the discrete architecture of a trained supernet; None is the
  paper's argmax (`derive_genotype`).

Two more: `arch_warmup`, the epochs at the start during which alpha's optimiser does not step
(the weights warm up first, as DrNAS' code does), and, for methods that perturb what the weight
step sees (SDARTS):
`perturb(weights, step, key, loss) -> weights` takes the op weights the relaxation gives the weight
step's forward pass (a list, one array per alpha) and returns those it trains the weights at;
`loss(weights)` is that step's training loss at given op weights (for adversarial perturbations).
No gradient reaches alpha through them (alpha's step is the other pass).

A plug-in is a function of a `MethodContext` (the config, the space's op names, the steps per
epoch, for schedules) returning a `Method`; `chain` composes plug-ins. `search(method=...)` adds a
plug-in of the user's own after the ones the config names (`from_config`).
"""

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._guards import beta_regularizer, ramp
from ._mixed import ArchLogits, FixedWeights, RelaxedLogits


class MethodContext(NamedTuple):
    """What a plug-in may read when a search builds it: the `SearchConfig`, the space's op names
    (alpha's columns) and the steps per epoch (schedules over steps: `epoch = step // it`)."""

    config: Any
    op_names: tuple[str, ...]
    steps_per_epoch: int


class Method(NamedTuple):
    """The parts of a DARTS variant (see `darts_eqx.methods`); None leaves a part to DARTS:
    `relax(logits, step, inner, key) -> op weights`, `arch_loss(arch, step) -> scalar`,
    `estimator(state, static, train_batch, val_batch) -> ((val_loss, val_acc), grads)`,
    `select(supernet) -> genotype`, `perturb(weights, step, key, loss) -> weights` and
    `arch_warmup`, the epochs before alpha's first step."""

    relax: Callable | None = None
    arch_loss: Callable | None = None
    estimator: Callable | None = None
    select: Callable | None = None
    perturb: Callable | None = None
    arch_warmup: int | None = None


class MethodParts(NamedTuple):
    """What `search_step` and the search's end take from a `Method`: `arch_grad` (the estimator),
    `arch_reg` (the loss term), `arch_view(arch, step, key)` (alpha through the relaxation),
    `select`, `weight_view(arch, step, key, loss)` (alpha as the weight step sees it, when the
    method perturbs it) and `arch_warmup` (epochs before alpha's first step, 0 for none)."""

    arch_grad: Callable | None
    arch_reg: Callable | None
    arch_view: Callable | None
    select: Callable | None
    weight_view: Callable | None
    arch_warmup: int = 0


Plugin = Callable[[MethodContext], Method]


def softmax(logits, step, key=None):
    """DARTS' relaxation: softmax(alpha) over the ops of each edge."""
    return jax.nn.softmax(logits, axis=-1)


def chain(*plugins: Plugin) -> Plugin:
    """One plug-in doing what `plugins` do, in order: relaxations stack (each sees the one before
    as `inner`), loss terms add up, and at most one plug-in may set each of the estimator, the
    selection, the perturbation and the warm-up (two are an error naming them)."""

    def build(context: MethodContext) -> Method:
        methods = [(_name(p), _built(p, context)) for p in plugins]
        relaxations = [m.relax for _, m in methods if m.relax is not None]
        losses = [m.arch_loss for _, m in methods if m.arch_loss is not None]
        return Method(
            relax=_stacked(relaxations) if relaxations else None,
            arch_loss=_summed(losses) if losses else None,
            estimator=_single(methods, "estimator"),
            select=_single(methods, "select"),
            perturb=_single(methods, "perturb"),
            arch_warmup=_single(methods, "arch_warmup"),
        )

    build.__qualname__ = "chain(" + ", ".join(_name(p) for p in plugins) + ")"
    return build


def _built(plugin: Plugin, context: MethodContext) -> Method:
    """`plugin(context)`, checked to be a `Method`."""
    method = plugin(context)
    if not isinstance(method, Method):
        raise ValueError(f"method plug-in {_name(plugin)} returned {type(method).__name__}, not a darts_eqx.Method")
    return method


def _name(plugin) -> str:
    return getattr(plugin, "__qualname__", type(plugin).__name__)


def _single(methods, part: str):
    setting = [(name, getattr(m, part)) for name, m in methods if getattr(m, part) is not None]
    if len(setting) > 1:
        raise ValueError(f"plug-ins {[name for name, _ in setting]} each set the {part}; a method has one")
    return setting[0][1] if setting else None


def _stacked(relaxations):
    def relax(logits, step, inner, key):
        weights = inner
        for outer in relaxations:
            weights = _wrapped(outer, weights)
        return weights(logits, step, key)

    return relax


def _wrapped(outer, inner):
    return lambda logits, step, key: outer(logits, step, inner, key)


def _summed(losses):
    def arch_loss(arch, step):
        total = losses[0](arch, step)
        for loss in losses[1:]:
            total = total + loss(arch, step)
        return total

    return arch_loss


def relaxation_view(relax: Callable):
    """`view(arch, step, key)`: `arch` with every `ArchLogits` shown through the complete
    relaxation `relax(logits, step, key)` (`search_step`'s `arch_view`), each alpha (the normal
    and the reduction cell's) with a key of its own, so that their samples are independent."""

    def view(arch, step, key):
        leaves, tree = jax.tree.flatten(arch, is_leaf=lambda n: isinstance(n, ArchLogits))
        relaxed = [
            RelaxedLogits(n.logits, step, jax.random.fold_in(key, i), relax) if isinstance(n, ArchLogits) else n
            for i, n in enumerate(leaves)
        ]
        return jax.tree.unflatten(tree, relaxed)

    return view


def first_order() -> Plugin:
    """First-order DARTS: alpha descends the gradient of the validation loss at the current
    weights (Liu et al., 2019, Sec. 2.3 with xi = 0)."""

    def first_order(context: MethodContext) -> Method:
        return Method()

    return first_order


def unrolled() -> Plugin:
    """Second-order DARTS: alpha descends the gradient of the validation loss after one virtual
    weight step (Liu et al., 2019, Eq. 6-8), estimated as the config's `estimator` says (`exact`
    or `finite_difference`) with step size `xi` (`arch_gradient`)."""

    def unrolled(context: MethodContext) -> Method:
        from ._step import second_order_gradient

        return Method(estimator=second_order_gradient(context.config, context.steps_per_epoch))

    return unrolled


def beta_regularisation(strength: float) -> Plugin:
    """beta-DARTS (Ye et al., CVPR 2022, Eq. 6): lambda * mean over edges of logsumexp(alpha)
    added to alpha's loss, lambda ramped linearly from 0 at the first epoch to `strength` at the
    last."""

    def beta_regularisation(context: MethodContext) -> Method:
        epochs, steps = context.config.epochs, context.steps_per_epoch

        def arch_loss(arch, step):
            return ramp(strength, step // steps, epochs) * beta_regularizer(arch)

        return Method(arch_loss=arch_loss)

    return beta_regularisation


def auxiliary_skip(beta: float) -> Plugin:
    """DARTS- (Chu et al., ICLR 2021, Eq. 2): an extra identity on every edge, its weight decaying
    linearly from `beta` at the first epoch to 0 at the last: the forward pass sees the inner
    relaxation's weights plus beta on the `skip_connect` column (an identity at stride 1; at
    stride 2, as that op, a factorized reduction), while alpha and the genotype stay alpha's own."""

    def auxiliary_skip(context: MethodContext) -> Method:
        relax = aux_skip_relaxation(context.op_names, beta, context.config.epochs, context.steps_per_epoch)
        return Method(relax=relax)

    return auxiliary_skip


def aux_skip_relaxation(op_names, value: float, epochs: int, steps_per_epoch: int):
    """`relax(logits, step, inner, key)` of `auxiliary_skip`."""
    if "skip_connect" not in op_names:
        raise ValueError(f"aux_skip needs a skip_connect op; the space has {tuple(op_names)}")
    skip = list(op_names).index("skip_connect")

    def relax(logits, step, inner, key):
        beta = value - ramp(value, step // steps_per_epoch, epochs)
        offset = jnp.zeros(len(op_names)).at[skip].set(beta)
        return inner(logits, step, key) + offset.astype(logits.dtype)[None, :]

    return relax


def from_config(config) -> Plugin:
    """The plug-ins a `SearchConfig` names: first or second order (`order`), the `method` (one of
    `METHODS`: `darts`, `gdas`, `drnas`, `sdarts-rs`, `sdarts-adv`, `fairdarts`, with its
    authors' defaults), then beta-DARTS (`beta_reg` > 0) and DARTS-'s auxiliary skip (`aux_skip`
    > 0)."""
    from ._variants import METHODS

    plugins = [first_order() if config.order == 1 else unrolled()]
    named = METHODS[config.method]()
    if named is not None:
        plugins.append(named)
    if config.beta_reg > 0:
        plugins.append(beta_regularisation(config.beta_reg))
    if config.aux_skip > 0:
        plugins.append(auxiliary_skip(config.aux_skip))
    return chain(*plugins)


def parts(plugin: Plugin, context: MethodContext) -> MethodParts:
    """The `MethodParts` of the method `plugin` builds."""
    method = _built(plugin, context)
    relax = softmax if method.relax is None else _on_softmax(method.relax)
    view = None if method.relax is None else relaxation_view(relax)
    weight_view = None if method.perturb is None else perturbed_view(relax, method.perturb)
    return MethodParts(method.estimator, method.arch_loss, view, method.select, weight_view, _warmup(method, context))


def _warmup(method: Method, context: MethodContext) -> int:
    """The method's `arch_warmup` as a whole number of epochs below the search's."""
    warmup, epochs = method.arch_warmup, context.config.epochs
    try:
        whole = 0 if warmup is None else operator.index(warmup)
    except TypeError:
        whole = None
    if isinstance(warmup, bool) or whole is None or not 0 <= whole < epochs:
        raise ValueError(f"a method's `arch_warmup` (={warmup!r}) must be a whole number of epochs in [0, {epochs})")
    return whole


def perturbed_view(relax: Callable, perturb: Callable):
    """`view(arch, step, key, loss)`: `arch` with every alpha replaced by the op weights that
    `relax(logits, step, key)` gives it, perturbed (all alphas together) by `perturb(weights, step,
    key, loss_at)`, where `loss_at(weights) = loss(arch with those weights)`."""

    def view(arch, step, key, loss):
        leaves, tree = jax.tree.flatten(arch, is_leaf=lambda n: isinstance(n, ArchLogits))
        where = [i for i, n in enumerate(leaves) if isinstance(n, ArchLogits)]
        relax_key, perturb_key = jax.random.split(key)
        weights = [relax(leaves[i].logits, step, jax.random.fold_in(relax_key, i)) for i in where]
        if not all(isinstance(w, jax.Array) for w in weights):
            raise ValueError("a perturbation needs op weights as arrays; this relaxation samples one op per edge")

        def with_weights(ws):
            new = list(leaves)
            for i, w in zip(where, ws):
                new[i] = FixedWeights(w)
            return jax.tree.unflatten(tree, new)

        perturbed = perturb(weights, step, perturb_key, lambda ws: loss(with_weights(ws)))
        return with_weights([jax.lax.stop_gradient(w) for w in perturbed])

    return view


def _on_softmax(relax):
    return lambda logits, step, key: relax(logits, step, softmax, key)


def aux_skip_view(op_names, value: float, epochs: int, steps_per_epoch: int):
    """`view(arch, step, key)`: `arch` with every alpha seen through DARTS-'s auxiliary skip (beta =
    `value` at the first epoch decaying linearly to 0 at the last) on top of softmax."""
    return relaxation_view(_on_softmax(aux_skip_relaxation(op_names, value, epochs, steps_per_epoch)))
