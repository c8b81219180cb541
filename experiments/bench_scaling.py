"""Data-parallel scaling of the scan-fused search step at a fixed per-device batch (one JSON line
per device count).

    python experiments/bench_scaling.py --devices 1 2 4 --C 8 --layers 5 --batch-per-device 16 --image 16

Each device count runs in its own interpreter. On a CPU machine JAX is given `max(--devices)`
host devices (XLA_FLAGS=--xla_force_host_platform_device_count), which all share the same cores:
what this shows there is correctness and the overhead of the split, not a speed-up. On GPUs
(or any backend with enough real devices) no flag is set and the real devices are used.
`per_device_mb` is XLA's compiled memory analysis of one device's program (arguments + outputs +
temporaries - aliased); `peak_rss_mb` is the whole process.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def run_one(a) -> dict:
    import jax
    import numpy as np

    import darts_eqx as dx
    from darts_eqx import _parallel
    from darts_eqx._optim import arch_optimizer, weight_optimizer
    from darts_eqx._state import initial_state
    from darts_eqx._step import make_chunk_fn
    from darts_eqx._supernet import build_supernet

    n_dev = a.devices[0]
    batch = a.batch_per_device * n_dev
    config = dx.SearchConfig(space=a.space, channels=a.C, layers=a.layers, batch_size=batch)
    mesh = _parallel.data_mesh(n_dev)
    key = jax.random.key(0)
    model = build_supernet(config, (a.image, a.image, 3), a.classes, key=key)
    arch, weights, static = dx.split_arch(model)
    w_opt, a_opt = weight_optimizer(config, 100), arch_optimizer(config)
    state = initial_state(weights, arch, w_opt, a_opt, key)
    n = 2 * a.steps * batch
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, a.image, a.image, 3)).astype(np.float32)
    labels = rng.integers(0, a.classes, n).astype(np.int32)
    idx = np.arange(n).reshape(2 * a.steps, batch)
    if mesh is None:
        state, data = jax.device_put(state), jax.device_put((images, labels))
    else:
        state, data = _parallel.replicate(state, mesh), _parallel.replicate((images, labels), mesh)
    train, val = _parallel.shard_rows(idx[: a.steps], mesh), _parallel.shard_rows(idx[a.steps :], mesh)
    chunk = make_chunk_fn(static, w_opt, a_opt, dx.Execution().resolve(config), mesh=mesh)
    start = time.perf_counter()
    compiled = chunk.lower((*data, train, val), state).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.compiled.memory_analysis()
    per_device = None
    if memory is not None:
        per_device = (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes
        ) / 2**20
    state, m = compiled((*data, train, val), state)  # warm-up
    jax.block_until_ready(m)
    start = time.perf_counter()
    state, m = compiled((*data, train, val), state)
    jax.block_until_ready(m)
    run = time.perf_counter() - start
    return {
        "devices": n_dev,
        "platform": jax.devices()[0].platform,
        "space": a.space,
        "C": a.C,
        "layers": a.layers,
        "image": a.image,
        "batch_per_device": a.batch_per_device,
        "global_batch": batch,
        "steps": a.steps,
        "steps_per_s": a.steps / run,
        "images_per_s": a.steps * batch / run,
        "compile_s": compile_s,
        "per_device_mb": per_device,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss_finite": bool(np.all(np.isfinite(np.asarray(m.train_loss)))),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--space", default="darts", choices=("darts", "seed"))
    parser.add_argument("--C", type=int, default=8)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--batch-per-device", type=int, default=16)
    parser.add_argument("--image", type=int, default=16)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--host-devices", type=int, help="(internal) host device count of this interpreter")
    a = parser.parse_args()
    if a.host_devices is not None:  # a child: one device count
        print(json.dumps(run_one(a)), flush=True)
        return
    host = max(a.devices)
    for n in a.devices:
        env = dict(os.environ)
        if env.get("JAX_PLATFORMS", "cpu") == "cpu" and not _has_accelerator():
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={host}".strip()
        cmd = [sys.executable, *sys.argv, "--host-devices", str(host), "--devices", str(n)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            sys.exit(out.returncode)
        print(out.stdout.strip().splitlines()[-1], flush=True)


def _has_accelerator() -> bool:
    import jax

    return jax.default_backend() != "cpu"


if __name__ == "__main__":
    main()
