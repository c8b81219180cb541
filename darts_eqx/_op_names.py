"""Each search space's op names, apart from the ops (no jax here): what a genotype needs to be read
and checked. `_spaces.py` pairs these names with op constructors, and `register_space` records a
custom space's names here too.

The op order is part of a space's definition: alpha's last axis follows it and genotypes are
derived from it, so it never comes from dict or set iteration.
"""

DARTS_OPS = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)

# The seed document's minimal mixed op: identity, 3x3 and 5x5 conv, average and max pool.
SEED_OPS = ("skip_connect", "conv_3x3", "conv_5x5", "avg_pool_3x3", "max_pool_3x3")

# NAS-Bench-201's ops (Dong & Yang, ICLR 2020).
NB201_OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")

_OP_NAMES: dict[str, tuple[str, ...]] = {"darts": DARTS_OPS, "seed": SEED_OPS, "nb201": NB201_OPS}


def droppable_op(op_names: tuple[str, ...]) -> str | None:
    """The op that means 'no edge' (`none`), never chosen by discretisation, if the space has it."""
    return "none" if "none" in op_names else None


def register_op_names(space: str, op_names: tuple[str, ...]) -> None:
    """Record the op names of the space called `space` (`register_space` does this)."""
    existing = _OP_NAMES.get(space)
    if existing is not None and existing != op_names:
        raise ValueError(f"search space {space!r} is registered with ops {existing}, not {op_names}")
    _OP_NAMES[space] = op_names


def space_op_names(space: str) -> tuple[str, ...]:
    """The ordered op names of the space called `space`: `darts`, `seed`, `nb201` or a registered one."""
    try:
        return _OP_NAMES[space]
    except KeyError:
        raise ValueError(f"unknown search space {space!r}; known: {tuple(_OP_NAMES)}") from None
