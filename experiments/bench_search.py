"""Benchmark of the scan-fused search step on random data (one JSON line).

    python experiments/bench_search.py --C 8 --layers 5 --batch 32 --image 32 --steps 4
    python experiments/bench_search.py --space nb201 --C 16 --layers 5 --batch 64 --image 32 --steps 4

`--layers` is the cell count for `darts`, cells per stage for `nb201` (the benchmark's N=5).

`compile_s` is the first call of a chunk (compile included) minus one chunk's run time;
`steps_per_s` is timed over a second chunk of `--steps` steps. `peak_rss_mb` includes XLA's
compiler (most of it at small configs); run again with the same `--compile-cache DIR` to measure
the search without compiling (`compile_cache_hit`: the program came from that cache).

`--compile-only` lowers and compiles one chunk without running it (the figure of the compile
target at C=16, layers=8, batch 64): `lower_s` (tracing and lowering), `xla_compile_s`,
`compile_s` (their sum), `peak_rss_mb`, and XLA's `temp_mb` for the chunk where it reports it.
"""

import argparse
import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

import darts_eqx as dx
from darts_eqx._augment import search_augmentation
from darts_eqx._execution import use_compile_cache
from darts_eqx._methods import parts
from darts_eqx._optim import arch_optimizer, weight_optimizer
from darts_eqx._spaces import get_space
from darts_eqx._state import initial_state
from darts_eqx._step import make_chunk_fn
from darts_eqx._supernet import build_supernet


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--space", default="darts", choices=("darts", "nb201", "seed"))
    parser.add_argument("--order", type=int, default=1, choices=(1, 2))
    parser.add_argument("--estimator", default="exact", choices=("exact", "finite_difference"))
    parser.add_argument("--method", default="darts", choices=tuple(dx.methods.METHODS))
    parser.add_argument("--C", type=int, default=8)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--augment", action="store_true", help="crop and flip each batch, as a search does")
    parser.add_argument("--partial-channels", type=int, default=1, help="PC-DARTS K (1: plain DARTS)")
    parser.add_argument(
        "--shared-trace",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one traced gradient per step (order 1, or 2 with finite_difference), or one per phase "
        "(default: the library's choice, `Execution.resolve`)",
    )
    parser.add_argument("--compile-cache", help="JAX persistent compilation cache directory (default: none)")
    parser.add_argument("--compile-only", action="store_true", help="lower and compile one chunk, do not run it")
    a = parser.parse_args()
    cache = use_compile_cache(a.compile_cache or "off")
    if cache:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        entries_before = len(os.listdir(cache)) if os.path.isdir(cache) else 0
    config = dx.SearchConfig(
        space=a.space,
        channels=a.C,
        layers=a.layers,
        batch_size=a.batch,
        partial_channels=a.partial_channels,
        order=a.order,
        estimator=a.estimator,
        method=a.method,
        augment=a.augment,
    )
    execution = dx.Execution(shared_trace=a.shared_trace).resolve(config)
    key = jax.random.key(0)
    model = build_supernet(config, (a.image, a.image, 3), a.classes, key=key)
    arch, weights, static = dx.split_arch(model)
    w_opt, a_opt = weight_optimizer(config, 100), arch_optimizer(config)
    state = initial_state(weights, arch, w_opt, a_opt, key)
    n = 2 * a.steps * a.batch
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(n, a.image, a.image, 3)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, a.classes, n).astype(np.int32))
    idx = jnp.arange(n).reshape(2 * a.steps, a.batch)
    method = parts(dx.methods.from_config(config), dx.methods.MethodContext(config, get_space(a.space).op_names, 100))
    estimate = {k: v for k, v in method._asdict().items() if k not in ("select", "arch_warmup")}
    chunk = make_chunk_fn(static, w_opt, a_opt, execution, augment=search_augmentation(config), **estimate)
    inputs = (images, labels, idx[: a.steps], idx[a.steps :])
    config_fields = {
        "impl": "darts_eqx",
        "space": a.space,
        "order": a.order,
        "estimator": a.estimator if a.order == 2 else None,
        "method": a.method,
        "augment": a.augment,
        "C": a.C,
        "layers": a.layers,
        "batch": a.batch,
        "image": a.image,
        "steps": a.steps,
        "partial_channels": a.partial_channels,
        "shared_trace": execution.shared_trace,
    }
    if a.compile_only:
        print(json.dumps({**config_fields, **compile_figures(chunk, inputs, state), "backend": jax.default_backend()}))
        return
    start = time.perf_counter()
    state, m = chunk(inputs, state)
    jax.block_until_ready(m)
    first = time.perf_counter() - start
    start = time.perf_counter()
    state, m = chunk(inputs, state)
    jax.block_until_ready(m)
    run = time.perf_counter() - start
    print(
        json.dumps(
            {
                **config_fields,
                "steps_per_s": a.steps / run,
                "compile_s": first - run,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                # a run whose programs all came from the cache adds no entry to it
                "compile_cache_hit": (None if not cache else len(os.listdir(cache)) == entries_before),
                "backend": jax.default_backend(),
                "loss_finite": bool(np.all(np.isfinite(np.asarray(m.train_loss)))),
            }
        )
    )


def compile_figures(chunk, inputs, state) -> dict:
    """Lower and compile `chunk` for these arguments without running it."""
    return lower_and_compile(chunk, inputs, state)[1]


def lower_and_compile(fn, *args):
    """`(compiled, figures)`: `fn` (a jitted function) lowered and compiled for `args`, not run,
    with the seconds of each stage, the peak RSS so far and XLA's temporaries where reported."""
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    try:  # Equinox's wrapper holds JAX's compiled program; XLA reports its buffers on most backends
        temp_mb = getattr(compiled, "compiled", compiled).memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # noqa: BLE001 - a backend without memory analysis
        temp_mb = None
    return compiled, {
        "lower_s": lowered_at - start,
        "xla_compile_s": done - lowered_at,
        "compile_s": done - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "temp_mb": temp_mb,
    }


if __name__ == "__main__":
    main()
