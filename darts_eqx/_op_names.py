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
# The form of each space's `Genotype`, which its checks follow: "cell" (two (op, input) pairs per
# node of a DARTS cell, normal and reduction), "single" (one op), None (the space's genotypes are
# of another class).
_GENOTYPE_FORMS: dict[str, str | None] = {"darts": "cell", "seed": "single", "nb201": None}


def droppable_op(op_names: tuple[str, ...]) -> str | None:
    """The op that means 'no edge' (`none`), never chosen by discretisation, if the space has it."""
    return "none" if "none" in op_names else None


def register_op_names(space: str, op_names: tuple[str, ...], genotype_form: str | None = None) -> None:
    """Record the op names and genotype form of the space called `space` (`register_space` does
    this)."""
    existing = _OP_NAMES.get(space)
    if existing is not None and existing != op_names:
        raise ValueError(f"search space {space!r} is registered with ops {existing}, not {op_names}")
    _OP_NAMES[space] = op_names
    _GENOTYPE_FORMS[space] = genotype_form


def genotype_form(space: str) -> str | None:
    """The form of the `space`'s genotypes ("cell", "single" or None; see `_GENOTYPE_FORMS`)."""
    space_op_names(space)  # an unknown space is an error naming it
    return _GENOTYPE_FORMS.get(space)


def space_op_names(space: str) -> tuple[str, ...]:
    """The ordered op names of the space called `space`: `darts`, `seed`, `nb201` or a registered one."""
    try:
        return _OP_NAMES[space]
    except KeyError:
        raise ValueError(f"unknown search space {space!r}; known: {tuple(_OP_NAMES)}") from None
