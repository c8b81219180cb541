"""The supernet of a search config, and what the search reads off it (softmax(alpha) per cell type)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from . import _parallel
from ._network import SearchNetwork, SeedNetwork, reduction_layers
from ._spaces import get_space


def build_supernet(config, image_shape, num_classes: int, *, key: PRNGKeyArray):
    """The supernet of `config.space` for images of `image_shape` (height, width, channels):
    the DARTS network, the NAS-Bench-201 network (`layers` = cells per stage), or for any other
    space a `SeedNetwork` of `layers` mixed ops over it."""
    height, width, in_channels = image_shape
    reductions = {"darts": len(reduction_layers(config.layers)), "nb201": 2}.get(config.space, 0)
    factor = 2**reductions
    if height % factor or width % factor:
        raise ValueError(
            f"images of {height}x{width} cannot pass {reductions} reduction cells: height and width must be "
            f"divisible by {factor}"
        )
    if config.space == "darts":
        return SearchNetwork(
            config.channels, config.layers, num_classes, in_channels, partial_channels=config.partial_channels, key=key
        )
    if config.space == "nb201":
        from .nb201 import NB201Network

        return NB201Network(config.channels, config.layers, num_classes, in_channels, key=key)
    model = SeedNetwork(
        config.channels, config.layers, num_classes, in_channels, space=get_space(config.space), key=key
    )
    _check_op_shapes(model, height, width)
    return model


def _check_op_shapes(model: SeedNetwork, height: int, width: int) -> None:
    """Every op of a (custom) space must keep an NHWC batch's shape: checked abstractly, before
    anything is compiled, naming the op that does not."""
    stem_scale = model.stem.norm.weight
    assert stem_scale is not None  # the stem's batch norm is affine
    x = jax.ShapeDtypeStruct((2, height, width, stem_scale.shape[0]), jnp.float32)
    for name, op in zip(model.op_names, model.mixed[0].ops):
        try:
            out = eqx.filter_eval_shape(op, x)
        except Exception as e:  # a user's op may fail in any way: name it
            raise ValueError(f"op {name!r} of space {model.space_name!r} fails on a {x.shape} batch: {e}") from None
        if getattr(out, "shape", None) != x.shape:
            raise ValueError(
                f"op {name!r} of space {model.space_name!r} maps a {x.shape} batch to "
                f"{getattr(out, 'shape', type(out).__name__)}: ops must keep the shape at stride 1"
            )


def arch_weights(model) -> dict[str, np.ndarray]:
    """softmax(alpha) of each cell type, by name."""
    if isinstance(model, SearchNetwork):
        out = {
            "alpha_normal": _parallel.fetch(model.alpha_normal.weights()),
            "alpha_reduce": _parallel.fetch(model.alpha_reduce.weights()),
        }
        if model.beta_normal is not None:
            assert model.beta_reduce is not None  # the two betas exist together (partial channels)
            out["beta_normal"] = _parallel.fetch(model.beta_normal.weights())
            out["beta_reduce"] = _parallel.fetch(model.beta_reduce.weights())
        return out
    return {"alpha": _parallel.fetch(model.alpha.weights())}


def with_recorded_alpha(supernet, record: dict):
    """`supernet` with the alpha (and beta) whose softmax a history record holds."""
    for name in ("alpha", "alpha_normal", "alpha_reduce", "beta_normal", "beta_reduce"):
        if name in record:
            logits = jnp.log(jnp.asarray(record[name], jnp.float32))
            supernet = eqx.tree_at(lambda m, name=name: getattr(m, name).logits, supernet, logits)
    return supernet
