"""What the exact second-order estimator compiles, part by part (one JSON line per part).

    python experiments/bench_second_order_parts.py [--C 8 --layers 5 --batch 32]

Each part is jitted alone on one random batch, lowered and compiled, not run:

- `gradient`: grad L(w, alpha) in both, the supernet's gradient (what a first-order phase runs);
- `mixed`: grad_alpha <grad_w L(w, alpha), v>, the mixed second derivative alone (reverse over
  reverse: the backward pass differentiated once more);
- `exact`: `arch_gradient(..., estimator="exact")`, the arch step of `order=2`'s default (the
  virtual step, the validation gradient at w', and the mixed term through the virtual step).

Printed: `bench_search.py --compile-only`'s figures (`lower_s`, `xla_compile_s`, `compile_s`,
`peak_rss_mb`, `temp_mb`), and the optimised program's fusions, XLA convolutions and custom calls
(the C++ depthwise kernel's calls). One process per part keeps
each compile's memory its own (`--part`); without it the three run one after another in
subprocesses.
"""

import argparse
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_search import lower_and_compile

import darts_eqx as dx
from darts_eqx import SearchConfig
from darts_eqx._loss import supernet_loss
from darts_eqx._supernet import build_supernet

PARTS = ("gradient", "mixed", "exact")


def part_function(part: str, static, batch):
    def loss(arch, weights):
        return supernet_loss(arch, weights, static, *batch)[0]

    if part == "gradient":
        return lambda arch, weights, v: jax.grad(loss, argnums=(0, 1))(arch, weights)
    if part == "mixed":

        def directional(arch, weights, v):
            return optax.tree.vdot(jax.grad(loss, argnums=1)(arch, weights), v)

        return jax.grad(directional)
    return lambda arch, weights, v: dx.arch_gradient(arch, weights, static, batch, batch, xi=0.025)


def measure(a) -> dict:
    config = SearchConfig(space="darts", channels=a.C, layers=a.layers, batch_size=a.batch, order=2)
    model = build_supernet(config, (a.image, a.image, 3), 10, key=jax.random.key(0))
    arch, weights, static = dx.split_arch(model)
    rng = np.random.default_rng(0)
    batch = (
        jnp.asarray(rng.normal(size=(a.batch, a.image, a.image, 3)).astype(np.float32)),
        jnp.asarray(rng.integers(0, 10, a.batch).astype(np.int32)),
    )
    v = jax.tree.map(jnp.ones_like, weights)
    compiled, figures = lower_and_compile(jax.jit(part_function(a.part, static, batch)), arch, weights, v)
    hlo = compiled.as_text()
    return {
        "part": a.part,
        "C": a.C,
        "layers": a.layers,
        "batch": a.batch,
        "image": a.image,
        **{k: x if x is None else round(x, 1) for k, x in figures.items()},
        "fusions": hlo.count(" fusion("),
        "convolutions": hlo.count("convolution("),
        "custom_calls": hlo.count("custom-call("),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=PARTS)
    parser.add_argument("--C", type=int, default=8)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image", type=int, default=32)
    a = parser.parse_args()
    if a.part is not None:
        print(json.dumps(measure(a)))
        return
    sizes = ["--C", str(a.C), "--layers", str(a.layers), "--batch", str(a.batch), "--image", str(a.image)]
    for part in PARTS:
        subprocess.run([sys.executable, __file__, "--part", part, *sizes], check=True)


if __name__ == "__main__":
    main()
