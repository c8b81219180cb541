"""The C++ depthwise kernel built with the portable flags against the same source built with added
flags (default `-march=native`): forward, input gradient and kernel gradient of the DARTS search's
depthwise stages, both libraries loaded in one process and timed in alternation, so that a
change in the machine's load touches both alike.

    python experiments/bench_depthwise_flags.py                    # portable against -march=native
    python experiments/bench_depthwise_flags.py --flags "-march=x86-64-v3" --repeats 50

Prints, per shape and function, the fastest and the median call of each build in milliseconds,
and the ratio of the fastest calls (portable / added: above 1 means the added flags are faster).
"""

import argparse
import ctypes
import os
import shlex
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from darts_eqx import _native

# (edges, batch, height and width, channels, kernel size, stride): stage 1 of the sep_conv and
# dil_conv edges of a source at the README's C=8 configuration and at the paper's C=16, batch 64
SHAPES = [
    (4, 32, 32, 8, 3, 1),
    (4, 32, 32, 8, 5, 1),
    (4, 64, 32, 16, 3, 1),
    (4, 32, 16, 16, 5, 2),
]


def build(flags: list[str], directory: str, tag: str) -> None:
    compiler = _native._compiler()
    if compiler is None:
        raise SystemExit("no C++ compiler")
    path = os.path.join(directory, f"depthwise-{tag}.so")
    _native._build(compiler, path, flags)
    library = ctypes.cdll.LoadLibrary(path)
    for target, symbol in _native.TARGETS.values():
        capsule = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(f"{target}_{tag}", capsule, platform="cpu")


def functions(tag: str, edges, batch, size, channels, k, stride):
    padding = k // 2
    out = (size + 2 * padding - k) // stride + 1
    attrs = dict(stride=np.int64(stride), padding=np.int64(padding), dilation=np.int64(1))
    x_shape, k_shape = (batch, size, size, channels), (edges, k, k, channels)
    y_shape = (edges, batch, out, out, channels)

    def call(name, shape):
        target = f"{_native.TARGETS[name][0]}_{tag}"
        return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")

    return {
        "forward": jax.jit(lambda x, w, g: call("forward", y_shape)(x, w, **attrs)),
        "input_gradient": jax.jit(lambda x, w, g: call("input_gradient", x_shape)(w, g, **attrs)),
        "kernel_gradient": jax.jit(lambda x, w, g: call("kernel_gradient", k_shape)(x, g, **attrs)),
    }, (x_shape, k_shape, y_shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flags", default="-march=native", help="flags added to the portable ones")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls of each function and build")
    args = parser.parse_args()
    portable, added = list(_native._FLAGS), [*_native._FLAGS, *shlex.split(args.flags)]
    print(f"jax {jax.__version__}, compiler {' '.join(_native._compiler() or [])}, portable {' '.join(portable)}")
    with tempfile.TemporaryDirectory() as directory:
        build(portable, directory, "portable")
        build(added, directory, "added")
    print(f"{'edges, batch, size, C, k, stride':<28} {'function':<16} portable ms (min, median)  added (min, median)")
    keys = jax.random.split(jax.random.key(0), 3)
    for shape in SHAPES:
        fns = {tag: functions(tag, *shape) for tag in ("portable", "added")}
        x_shape, k_shape, y_shape = fns["portable"][1]
        operands = [jax.random.normal(key, s) for key, s in zip(keys, (x_shape, k_shape, y_shape))]
        for name in ("forward", "input_gradient", "kernel_gradient"):
            times = {"portable": [], "added": []}
            for tag in times:
                reference = fns["portable"][0][name](*operands)
                np.testing.assert_allclose(fns[tag][0][name](*operands), reference, rtol=1e-4, atol=1e-3)
            for _ in range(args.repeats):
                for tag in times:
                    start = time.perf_counter()
                    jax.block_until_ready(fns[tag][0][name](*operands))
                    times[tag].append(time.perf_counter() - start)
            (a, a_med), (b, b_med) = ((1e3 * min(times[t]), 1e3 * statistics.median(times[t])) for t in times)
            print(f"{str(shape):<28} {name:<16} {a:8.3f} {a_med:8.3f}  {b:8.3f} {b_med:8.3f}  ratio {a / b:.2f}")


if __name__ == "__main__":
    main()
