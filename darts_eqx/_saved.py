"""Saving a trained network and loading it back: the genotype and sizes that rebuild it
(`model.json`) beside its arrays (`model.eqx`)."""

import dataclasses
import json
import os
from typing import Any

import equinox as eqx
import jax

from ._checkpoint import atomic_write_bytes, atomic_write_text, serialised
from ._data import PixelNorm
from ._skeleton import CellNetwork
from ._spaces import get_space
from ._train import TrainResult


def save_trained(directory: str | os.PathLike, result: TrainResult, num_classes: int, in_channels: int) -> None:
    """Write `model.eqx` (network and batch-norm state) and `model.json` (what rebuilds it: the
    genotype and the network's sizes). Only networks trained from a genotype are rebuilt this
    way; save a fine-tuned discretised supernet with `eqx.tree_serialise_leaves`."""
    if not result.from_genotype:
        raise ValueError(
            "save_trained rebuilds a network from its genotype; this one was fine-tuned from a discretised supernet: "
            "save it with eqx.tree_serialise_leaves and load it into the same discretised supernet"
        )
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    atomic_write_bytes(os.path.join(directory, "model.eqx"), serialised((result.model, result.state)))
    spec = {
        "genotype": result.model.genotype.to_dict(),
        "channels": result.config.channels,
        "layers": result.config.layers,
        "auxiliary": result.config.auxiliary,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "pixel_norm": None if result.model.pixel_norm is None else result.model.pixel_norm._asdict(),
    }
    atomic_write_text(os.path.join(directory, "model.json"), json.dumps(spec, indent=2))


def load_trained(directory: str | os.PathLike) -> tuple[CellNetwork, Any]:
    """`(model, state)` written by `save_trained` / `darts-eqx train`; call
    `model(x, state)` for inference logits."""
    directory = os.fspath(directory)
    try:
        with open(os.path.join(directory, "model.json")) as f:
            spec = json.load(f)
        space = get_space(spec["genotype"]["space"])
        genotype = space.topology.genotype_from_json(space, spec["genotype"])
        like = space.topology.network(
            space,
            genotype,
            spec["channels"],
            spec["layers"],
            spec["num_classes"],
            spec["in_channels"],
            spec["auxiliary"],
            key=jax.random.key(0),
        )
        norm = spec.get("pixel_norm")  # absent in models saved before it was recorded
        model, state = like  # a fresh network and its batch-norm state
        pixel_norm = None if norm is None else PixelNorm(**{k: tuple(v) for k, v in norm.items()})
        like = (dataclasses.replace(model, pixel_norm=pixel_norm), state)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{directory} holds no readable trained model ({type(e).__name__}: {e})") from None
    return eqx.tree_deserialise_leaves(os.path.join(directory, "model.eqx"), like)
