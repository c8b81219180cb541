"""Run by test_multidevice.py in a fresh interpreter, so that XLA_FLAGS can give JAX several CPU
devices before it starts. `local`: 1- vs 4-device searches in one process; `float64 SPACE...`:
the same in float64; `process I P PORT DIR`:
process I of P in a jax.distributed run on localhost. Prints one JSON line."""

import json
import os
import sys

mode = sys.argv[1]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={2 if mode == 'process' else 4}"
os.environ["JAX_PLATFORMS"] = "cpu"
if mode == "float64":
    os.environ["JAX_ENABLE_X64"] = "1"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from helpers import tiny_arrays  # noqa: E402

import darts_eqx as dx  # noqa: E402
from darts_eqx import _conv, _parallel  # noqa: E402
from darts_eqx._augment import search_augmentation  # noqa: E402
from darts_eqx._loss import supernet_loss  # noqa: E402
from darts_eqx._optim import arch_optimizer, weight_optimizer  # noqa: E402
from darts_eqx._step import make_chunk_fn  # noqa: E402
from darts_eqx._supernet import build_supernet  # noqa: E402

DATA = dx.data.from_arrays(*tiny_arrays(n=128))
OPTIONS = dict(space="seed", channels=4, layers=1, epochs=2, batch_size=16, progress=False)


def summary(result):
    return {
        "alpha": [np.asarray(a.logits).tolist() for a in result.supernet.arch.alpha.values()],
        "history": result.history,
        "genotype": result.genotype.to_dict(),
    }


def gradients(devices: int, **options) -> tuple[list[list], str]:
    """The weights' and alpha's gradients of the loss of one batch of 16, split over `devices`, and
    the optimised HLO that computed them."""
    config = dx.SearchConfig(**{k: v for k, v in {**OPTIONS, **options}.items() if k != "progress"})
    mesh = _parallel.data_mesh(devices)
    model = build_supernet(config, DATA.image_shape, DATA.num_classes, key=jax.random.key(0))
    arch, weights, static = dx.split_arch(model)
    arch, weights = _parallel.replicate((arch, weights), mesh)
    x, y = DATA.x_train[:16], DATA.y_train[:16]
    if mesh is not None:
        batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(_parallel.AXIS))
        x, y = jax.device_put(x, batch), jax.device_put(y, batch)
    grad = jax.jit(jax.grad(lambda a, w: supernet_loss(a, w, static, x, y)[0], argnums=(0, 1)))
    with _conv.traced_with(mesh=mesh):  # as a search traces its chunk
        compiled = grad.lower(arch, weights).compile()
    return [np.asarray(g).tolist() for g in jax.tree.leaves(compiled(arch, weights))], compiled.as_text()


def compiled_chunk_text(devices: int, **options) -> str:
    """The optimised HLO of the search chunk on `devices` devices."""
    config = dx.SearchConfig(**{k: v for k, v in {**OPTIONS, **options}.items() if k != "progress"})
    mesh = _parallel.data_mesh(devices)
    model = build_supernet(config, DATA.image_shape, DATA.num_classes, key=jax.random.key(0))
    arch, weights, static = dx.split_arch(model)
    w_opt, a_opt = weight_optimizer(config, 4), arch_optimizer(config)
    state = dx.SearchState(weights, arch, w_opt.init(weights), a_opt.init(arch), np.int32(0), jax.random.key(1))
    state = _parallel.replicate(state, mesh)
    data = _parallel.replicate((DATA.x_train, DATA.y_train), mesh)
    idx = _parallel.shard_rows(np.arange(32).reshape(2, 16), mesh)
    augment = search_augmentation(config)
    chunk = make_chunk_fn(static, w_opt, a_opt, dx.Execution().resolve(config), mesh=mesh, augment=augment)
    return chunk.lower((*data, idx, idx), state).compile().compiled.as_text()


if mode == "local":
    out = {"devices": len(jax.devices())}
    one = dx.search(jax.random.key(3), DATA, execution=dx.Execution(devices=1), **OPTIONS)
    four = dx.search(
        jax.random.key(3),
        DATA,
        execution=dx.Execution(devices=4),
        checkpoint_dir=sys.argv[2],
        checkpoint_every=2,
        **OPTIONS,
    )
    out["one"], out["four"] = summary(one), summary(four)
    # the 4-device checkpoints resume on one device: the checkpoint does not depend on the mesh
    os.remove(os.path.join(sys.argv[2], "step-000000008", "manifest.json"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dx.CheckpointWarning)
        resumed = dx.search(
            jax.random.key(3),
            DATA,
            execution=dx.Execution(devices=1),
            checkpoint_dir=sys.argv[2],
            checkpoint_every=2,
            resume=True,
            **OPTIONS,
        )
    out["resumed_on_one"] = summary(resumed)
    # The depthwise FFI kernel has no partitioning rule: under a mesh it runs on each device's part
    # of the batch, and nothing gathers the batch onto every device for it.
    darts = dict(space="darts", layers=2, channels=4)
    chunk = compiled_chunk_text(4, **darts)
    out["all_reduce"], out["darts_all_gather"] = "all-reduce" in chunk, "all-gather" in chunk
    # float32: one step's gradients, with the C++ kernel, on one device and on four
    (one_device, one_text), (four_devices, _) = gradients(1, **darts), gradients(4, **darts)
    out["gradients"] = {1: one_device, 4: four_devices}
    kernel = "darts_eqx_depthwise_forward"
    out["kernel_calls"] = {1: one_text.count(kernel), 4: chunk.count(kernel)}
    out["errors"] = []
    for devices, options in ((4, dict(batch_size=18)), (5, {}), (0, {})):
        try:
            dx.search(jax.random.key(3), DATA, execution=dx.Execution(devices=devices), **{**OPTIONS, **options})
        except ValueError as e:
            out["errors"].append(str(e))
    print(json.dumps(out))
elif mode == "float64":
    # the same searches in float64, where only the order of the sums over the batch differs
    out = {"dtype": str(DATA.x_train.dtype)}
    spaces = {
        "seed": dict(space="seed"),
        "darts": dict(space="darts", layers=2, channels=4),
        "nb201": dict(space="nb201", layers=1),
    }
    for name in sys.argv[2:]:
        space = spaces[name]
        options = {**OPTIONS, **space}
        out[name] = {
            n: summary(dx.search(jax.random.key(3), DATA, execution=dx.Execution(devices=n), **options)) for n in (1, 4)
        }
    print(json.dumps(out))
else:
    index, count, port, directory = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    _parallel.initialize(f"localhost:{port}", count, index)
    result = dx.search(jax.random.key(3), DATA, checkpoint_dir=directory, checkpoint_every=2, **OPTIONS)
    print(json.dumps({"devices": len(jax.devices()), "local": len(jax.local_devices()), **summary(result)}))
