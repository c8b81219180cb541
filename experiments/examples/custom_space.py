"""A search space of your own: three candidate ops, registered through the public API, searched
for an epoch on the embedded digits, discretised, and its genotype printed.

    python experiments/examples/custom_space.py
"""

import equinox as eqx
import jax
import jax.numpy as jnp

import darts_eqx as dx


class Scale(eqx.Module):
    """A learned per-channel scale: an NHWC batch in, the same shape out (every op of a space
    must keep the shape at stride 1)."""

    weight: jax.Array

    def __init__(self, channels: int):
        self.weight = jnp.ones(channels)

    def __call__(self, x, state=None):
        # ops are called `op(x, state) -> (y, state)`: the state holds running batch-norm
        # statistics in an evaluation network; an op without batch norm passes it through
        return x * self.weight[None, None, None, :], state


def skip(channels, stride, norm, key):
    return dx.SEED_SPACE.make_op("skip_connect", channels, stride, norm, key=key)


def conv_3x3(channels, stride, norm, key):
    return dx.SEED_SPACE.make_op("conv_3x3", channels, stride, norm, key=key)


SPACE = dx.register_space(
    dx.SearchSpace(
        "scale_or_conv",
        ("skip_connect", "scale", "conv_3x3"),
        (skip, lambda channels, stride, norm, key: Scale(channels), conv_3x3),
    )
)


def main():
    options = dict(channels=8, layers=3, epochs=1, batch_size=64, augment=False)  # digits: no mirror images
    result = dx.search(jax.random.key(0), "digits", space=SPACE.name, **options)
    print(f"val acc {result.history[-1]['val_acc']:.3f}")
    print(result.genotype)
    print(type(result.network).__name__, "with", len(result.network.cells), "layers of", result.genotype.normal[0][0])
    # the genotype trained from scratch as its space's evaluation network, briefly
    trained = dx.train(
        jax.random.key(1), result.genotype, "digits", channels=8, layers=3, epochs=1, batch_size=64, auxiliary=False
    )
    print(f"trained from scratch: test acc {trained.history[-1]['test_acc']:.3f}")


if __name__ == "__main__":
    main()
