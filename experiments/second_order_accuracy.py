"""How close the paper's finite-difference second-order gradient is to the exact one, in float64.

    cd experiments && JAX_ENABLE_X64=1 python second_order_accuracy.py --out runs/second_order

For each configuration (`--C`, `--batch`, `--image` size, at `--layers`) and seed, on a supernet at
its initial weights (from the seed) and two batches drawn by the seed from the first images of the
CIFAR-10 subset (`../shared/data`, average-pooled to the image size; random images if the subset is
absent): the exact gradient of the unrolled objective L_val(w - xi grad_w L_train(w, alpha),
alpha) in alpha (`estimator="exact"`), Eq. 8's finite difference at the paper's shift (weights
moved by a vector of norm 0.01) and at the smaller `--shifts`, and a central difference of the
unrolled objective along a random unit direction of alpha (a check of the exact gradient). Then
`--search C BATCH IMAGE EPOCHS`: a first-order search of that many epochs (seed 0), with the same
measurement after each epoch on the batches of epoch 0 (EPOCHS 0: none). xi = 0.025, weight decay
3e-4; the virtual step has no momentum buffer (as at the first step). One JSON line per measurement
in `OUT/second_order.jsonl` (a rerun skips the configurations and seeds already there), and
`OUT/report.md`.

Measured: `cosine` (FD against exact), `relative_error` (||FD - exact|| / ||exact||),
`norm_ratio` (||FD|| / ||exact||), each per shift (`fd_0.01`, ...); `directional_error`
(|<exact, v> - central difference| / |central difference|); `library_fd_matches` (relative
difference between `estimator="finite_difference"` and this script's Eq. 8 at shift 0.01).

Each estimator is one `eqx.filter_jit` function, compiled once per shape (C, layers, batch, image)
and reused by every seed and search epoch; the compiled functions are dropped when the shape
changes. Float64 compiles take minutes per shape on CPU. (`JAX_DISABLE_MOST_OPTIMIZATIONS=1`
compiled in about half the time, but measured about ten times slower, and LLVM ran out of memory
at the third shape.)
"""

import argparse
import json
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from shared_data import CIFAR10_SUBSET, pooled, write_report

import darts_eqx as dx
from darts_eqx._loss import supernet_loss
from darts_eqx._second_order import arch_gradient, virtual_step

XI, MOMENTUM, WEIGHT_DECAY = 0.025, 0.9, 3e-4
STEP = dict(xi=XI, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def images(n: int, size: int, seed: int):
    if os.path.exists(CIFAR10_SUBSET):
        with np.load(CIFAR10_SUBSET) as f:
            x, y = f["x_train"][:n], f["y_train"][:n]
        return pooled(x, size), y
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, size, size, 3)), rng.integers(0, 10, n)


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def unrolled_loss(arch, weights, static, train_batch, val_batch):
    """L_val(w', alpha) at the unrolled weights w' = w - xi * grad_w L_train(w, alpha) (+ decay)."""
    w_prime = virtual_step(weights, arch, static, train_batch, **STEP)
    return supernet_loss(arch, w_prime, static, *val_batch)[0]


# Module-level `filter_jit` functions: the batches, alpha and the weights are traced arguments, the
# supernet's static part (identical for every seed at the same C, layers and image size) is hashed,
# so each compiles once per shape and serves every seed and every epoch of the search. Separate
# functions rather than one: the finite differences at all shifts call one compiled gradient.
unrolled = eqx.filter_jit(unrolled_loss)


@eqx.filter_jit
def exact_gradient(arch, weights, static, train_batch, val_batch):
    """The gradient of the unrolled objective in alpha (`estimator="exact"`)."""
    return arch_gradient(arch, weights, static, train_batch, val_batch, **STEP)[1]


@eqx.filter_jit
def library_fd_gradient(arch, weights, static, train_batch, val_batch):
    """Eq. 8 at the paper's shift as the library computes it (`estimator="finite_difference"`)."""
    return arch_gradient(arch, weights, static, train_batch, val_batch, estimator="finite_difference", **STEP)[1]


@eqx.filter_jit
def val_gradients(arch, weights, static, train_batch, val_batch):
    """(grad_alpha, grad_w) of L_val at the unrolled weights w'."""
    w_prime = virtual_step(weights, arch, static, train_batch, **STEP)
    return jax.grad(lambda a, w: supernet_loss(a, w, static, *val_batch)[0], argnums=(0, 1))(arch, w_prime)


@eqx.filter_jit
def shifted_train_gradient(arch, weights, static, train_batch, g_w, step):
    """grad_alpha L_train(w + step * g_w, alpha); `step` a traced scalar."""
    shifted = jax.tree.map(lambda w, g: w + step * g, weights, g_w)
    return jax.grad(lambda a: supernet_loss(a, shifted, static, *train_batch)[0])(arch)


def estimates(arch, weights, static, train_batch, val_batch, direction, shifts):
    """The exact gradient, the library's finite difference, Eq. 8's finite difference at each
    shift norm in `shifts`, and the central difference of the unrolled objective along
    `direction`."""
    batches = (train_batch, val_batch)
    exact = exact_gradient(arch, weights, static, *batches)
    library_fd = library_fd_gradient(arch, weights, static, *batches)
    g_arch, g_w = val_gradients(arch, weights, static, *batches)
    norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(g_w)))
    fds = {}
    for r in shifts:
        eps = r / norm
        gp = shifted_train_gradient(arch, weights, static, train_batch, g_w, eps)
        gm = shifted_train_gradient(arch, weights, static, train_batch, g_w, -eps)
        fds[r] = jax.tree.map(lambda g, p, m: g - XI * (p - m) / (2 * eps), g_arch, gp, gm)
    h = 1e-5
    plus, minus = (jax.tree.map(lambda a, v: a + s * h * v, arch, direction) for s in (1, -1))
    central = (unrolled(plus, weights, static, *batches) - unrolled(minus, weights, static, *batches)) / (2 * h)
    return exact, library_fd, fds, central


def compare(exact, fd) -> dict:
    e, f = flat(exact), flat(fd)
    return {
        "cosine": float(e @ f / (np.linalg.norm(e) * np.linalg.norm(f))),
        "relative_error": float(np.linalg.norm(f - e) / np.linalg.norm(e)),
        "norm_ratio": float(np.linalg.norm(f) / np.linalg.norm(e)),
    }


def measure_once(arch, weights, static, batches, shifts, key) -> dict:
    leaves, treedef = jax.tree.flatten(arch)
    vs = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(jax.random.split(key, len(leaves)), leaves)]
    total = jnp.sqrt(sum(jnp.sum(v**2) for v in vs))
    direction = jax.tree.unflatten(treedef, [v / total for v in vs])
    exact, library_fd, fds, central = estimates(arch, weights, static, *batches, direction, shifts)
    row = {f"fd_{r:g}": compare(exact, fd) for r, fd in fds.items()}
    row["library_fd_matches"] = compare(fds[0.01], library_fd)["relative_error"]
    along = float(flat(exact) @ flat(direction))
    row["directional_error"] = abs(along - float(central)) / max(abs(float(central)), 1e-300)
    return row


def run_config(C, batch, size, seed, layers, shifts, search_epochs):
    x, y = images(4 * batch + 1024, size, seed)
    data = dx.data.from_arrays(x, y)
    config = dx.SearchConfig(channels=C, layers=layers, batch_size=batch)
    supernet = build(config, data, seed)
    arch, weights, static = dx.split_arch(supernet)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(data.x_train))
    train_batch = (jnp.asarray(data.x_train[idx[:batch]]), jnp.asarray(data.y_train[idx[:batch]]))
    val_batch = (jnp.asarray(data.x_train[idx[batch : 2 * batch]]), jnp.asarray(data.y_train[idx[batch : 2 * batch]]))
    batches = (train_batch, val_batch)
    key = jax.random.key(seed)
    rows = [{"epoch": 0, **measure_once(arch, weights, static, batches, shifts, key)}]
    if search_epochs:

        def after_epoch(history, net):
            a, w, s = dx.split_arch(net)
            rows.append(
                {"epoch": len(history), **measure_once(a, w, s, batches, shifts, jax.random.fold_in(key, len(history)))}
            )

        dx.search(jax.random.key(seed), data, config, epochs=search_epochs, callback=after_epoch, progress=False)
    return rows


def build(config, data, seed):
    from darts_eqx._supernet import build_supernet

    return build_supernet(config, data.image_shape, data.num_classes, key=jax.random.key(seed))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/second_order")
    parser.add_argument("--C", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--image", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shifts", type=float, nargs="+", default=[0.01, 1e-4, 1e-6])
    parser.add_argument(
        "--search", nargs=4, type=int, metavar=("C", "BATCH", "IMAGE", "EPOCHS"), default=[8, 32, 16, 10]
    )
    a = parser.parse_args()
    if not jax.config.jax_enable_x64:
        raise SystemExit("run with JAX_ENABLE_X64=1: the comparison is meant in float64")
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "second_order.jsonl")
    done = set()
    if os.path.exists(path):
        with open(path) as f:
            done = {tuple(json.loads(line)["config"]) for line in f if line.strip()}
    plan = [(C, b, s, seed, 0) for C in a.C for b in a.batch for s in a.image for seed in range(a.seeds)]
    if a.search[3] > 0:
        plan.append((*a.search[:3], 0, a.search[3]))
    shape = None
    for C, b, s, seed, epochs in plan:
        if (C, b, s, seed, epochs) in done:
            continue
        if shape not in (None, (C, b, s)):  # drop the last shape's executables: memory and mappings
            jax.clear_caches()
        shape, start = (C, b, s), time.perf_counter()
        rows = run_config(C, b, s, seed, a.layers, a.shifts, epochs)
        print(f"C={C} batch={b} image={s} seed={seed} epochs={epochs}: {time.perf_counter() - start:.0f} s", flush=True)
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps({"config": [C, b, s, seed, epochs], "layers": a.layers, **row}) + "\n")
    report(path, a)


def number(v: float) -> str:
    return f"{v:.2f}" if v == 0 or 0.01 <= abs(v) < 1000 else f"{v:.0e}"


def report(path, a):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    shifts = [f"fd_{r:g}" for r in a.shifts]
    layers = sorted({r.get("layers", a.layers) for r in rows})
    lines = [
        f"Layers {', '.join(map(str, layers))}; mean ± std over seeds; "
        "the FD at shift r moves the weights by a vector of norm r.",
        "",
        "| C | batch | image | seeds | "
        + " | ".join(f"cosine, shift {r:g}" for r in a.shifts)
        + " | "
        + " | ".join(f"relative error, shift {r:g}" for r in a.shifts)
        + f" | norm ratio, shift {a.shifts[0]:g} | exact vs central difference (max) |",
        "|---" * (6 + 2 * len(a.shifts)) + "|",
    ]
    at_init = [r for r in rows if r["config"][4] == 0]
    for C, b, s in sorted({tuple(r["config"][:3]) for r in at_init}):
        group = [r for r in at_init if tuple(r["config"][:3]) == (C, b, s)]

        def stat(name, field):
            v = np.array([r[name][field] for r in group])
            return f"{number(v.mean())} ± {number(v.std())}"

        errors = np.array([r["directional_error"] for r in group])
        lines.append(
            f"| {C} | {b} | {s} | {len(group)} | "
            + " | ".join(stat(n, "cosine") for n in shifts)
            + " | "
            + " | ".join(stat(n, "relative_error") for n in shifts)
            + f" | {stat(shifts[0], 'norm_ratio')} | {errors.max():.1e} |"
        )
    along = [r for r in rows if r["config"][4] > 0]
    if along:
        lines += ["", "Along a first-order search (" + ", ".join(map(str, along[0]["config"][:3])) + "):", ""]
        lines += [
            "| epoch | "
            + " | ".join(f"cosine, shift {r:g}" for r in a.shifts)
            + f" | relative error, shift {a.shifts[0]:g} | norm ratio, shift {a.shifts[0]:g} | "
            "exact vs central difference |",
            "|---" * (4 + len(a.shifts)) + "|",
        ]
        for r in along:
            m = r[shifts[0]]
            lines.append(
                f"| {r['epoch']} | "
                + " | ".join(number(r[n]["cosine"]) for n in shifts)
                + f" | {number(m['relative_error'])} | {number(m['norm_ratio'])} | {r['directional_error']:.1e} |"
            )
    library = max(r["library_fd_matches"] for r in rows)
    lines += ["", f'`estimator="finite_difference"` against Eq. 8 here at shift 0.01: at most {library:.0e} apart.']
    write_report(os.path.dirname(path), lines)


if __name__ == "__main__":
    main()
