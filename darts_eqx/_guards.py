"""Guards against DARTS' collapse onto parameter-free ops, and the Hessian diagnostic.

- beta-regularisation (beta-DARTS, Ye et al., CVPR 2022): lambda * mean over edges of
  logsumexp(alpha) added to the validation loss, lambda ramped linearly over the epochs.
- The dominant eigenvalue of the Hessian of the validation loss in alpha (R-DARTS, Zela et al.,
  ICLR 2020: its growth predicts collapse), by Hessian-vector products and power iteration. The
  products are reverse over reverse: the canonical CPU convolutions carry a custom VJP, which has
  no forward-mode rule; the result is the same exact product.
- DARTS-ES: stop when the eigenvalue grew by more than a factor over a window of epochs, and keep
  the architecture from the start of the window.
"""

import jax
import jax.numpy as jnp
import optax

from ._mixed import ArchLogits


def alpha_logits(arch) -> list:
    """The logits of every `ArchLogits` in `arch`."""
    nodes = jax.tree.leaves(arch, is_leaf=lambda n: isinstance(n, ArchLogits))
    return [node.logits for node in nodes if isinstance(node, ArchLogits)]


def beta_regularizer(arch):
    """Mean over all edges (of every alpha in `arch`) of logsumexp over the ops."""
    rows = jnp.concatenate([jax.nn.logsumexp(a, axis=-1).ravel() for a in alpha_logits(arch)])
    return jnp.mean(rows)


def ramp(value: float, epoch, epochs: int):
    """`value` scaled linearly from 0 at the first epoch to `value` at the last."""
    return value * epoch / max(epochs - 1, 1)


def hessian_eigenvalue(loss_of_arch, arch, *, key, iterations: int = 20):
    """The dominant eigenvalue (largest in magnitude) of the Hessian of `loss_of_arch` at `arch`,
    by `iterations` steps of power iteration on Hessian-vector products; jit-compatible."""
    grad = jax.grad(loss_of_arch)

    def hvp(v):
        return jax.grad(lambda a: optax.tree.vdot(grad(a), v))(arch)

    leaves, treedef = jax.tree.flatten(arch)
    keys = jax.random.split(key, len(leaves))
    v = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])

    def body(_, carry):
        v, _ = carry
        v = _scale(v, 1.0 / jnp.sqrt(optax.tree.vdot(v, v)))
        hv = hvp(v)
        return hv, optax.tree.vdot(hv, v)

    _, eigenvalue = jax.lax.fori_loop(0, iterations, body, (v, jnp.zeros((), leaves[0].dtype)))
    return eigenvalue


def _scale(tree, s):
    return jax.tree.map(lambda x: x * s, tree)


def grew(eigenvalues: list[float], factor: float, window: int) -> bool:
    """DARTS-ES's rule: the newest eigenvalue exceeds `factor` times the one `window` epochs
    before it (its paper stops at a ratio of 1/0.75 over 5 epochs)."""
    if len(eigenvalues) <= window:
        return False
    before = eigenvalues[-1 - window]
    return before > 0 and eigenvalues[-1] > factor * before
