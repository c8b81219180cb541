"""A DARTS variant of your own, plugged into `darts_eqx.search` without touching the library.

The method here anneals the relaxation's temperature: the forward pass sees softmax(alpha / T)
with T falling linearly from `start` to `end` over the search, so early epochs mix the ops evenly
and late ones nearly pick one (the annealing GDAS and SNAS use for their samples, here applied to
plain DARTS' softmax). It also adds a small entropy penalty on softmax(alpha), a loss term on alpha.

    python experiments/examples/custom_method.py            # a short search on the embedded digits
"""

import jax
import jax.numpy as jnp

import darts_eqx as dx
from darts_eqx import methods


def annealed_temperature(start: float = 5.0, end: float = 0.5) -> methods.Plugin:
    """softmax(alpha / T), T from `start` at the first step to `end` at the last."""

    def annealed_temperature(context: methods.MethodContext) -> methods.Method:
        total = context.config.epochs * context.steps_per_epoch

        def relax(logits, step, inner, key):
            # `key`: this forward pass's own PRNG key, for a relaxation that samples (unused here)
            t = start + (end - start) * jnp.minimum(step / max(total - 1, 1), 1.0)
            return inner(logits / t, step, key)  # `inner` is softmax, or the relaxation before this one

        return methods.Method(relax=relax)

    return annealed_temperature


def entropy_penalty(strength: float = 0.01) -> methods.Plugin:
    """strength * mean over edges of the entropy of softmax(alpha): pushes each edge to one op."""

    def entropy_penalty(context: methods.MethodContext) -> methods.Method:
        def arch_loss(arch, step):
            rows = [
                -jnp.sum(jax.nn.softmax(a.logits) * jax.nn.log_softmax(a.logits), axis=-1)
                for a in jax.tree.leaves(arch, is_leaf=lambda n: isinstance(n, dx.ArchLogits))
                if isinstance(a, dx.ArchLogits)
            ]
            return strength * jnp.mean(jnp.concatenate(rows))

        return methods.Method(arch_loss=arch_loss)

    return entropy_penalty


def main():
    method = methods.chain(annealed_temperature(), entropy_penalty())
    options = dict(channels=8, layers=3, epochs=4, batch_size=64, augment=False)  # digits: no mirror images
    result = dx.search(jax.random.key(0), "digits", method=method, **options)
    last = result.history[-1]
    print(f"val acc {last['val_acc']:.3f}")
    print(result.genotype)


if __name__ == "__main__":
    main()
