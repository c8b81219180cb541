"""Search spaces as data: an ordered tuple of op names and one constructor per name.

The op order is part of a space's definition: alpha's last axis follows it and genotypes are
derived from it, so it never comes from dict or set iteration. The built-in spaces' names live in
`_op_names.py` (no jax), so that genotypes are read and checked without importing the ops.
"""

from collections.abc import Callable
from dataclasses import dataclass

from jaxtyping import Array, PRNGKeyArray

from ._op_names import DARTS_OPS, NB201_OPS, SEED_OPS, droppable_op, register_op_names
from ._ops import DilConv, FactorizedReduce, Identity, Pool, ReLUConvBN, SepConv, Zero

# (channels, stride, affine, key) -> op module: a batch in, a batch out
OpConstructor = Callable[[int, int, bool, PRNGKeyArray], Callable[..., Array]]


@dataclass(frozen=True)
class SearchSpace:
    """A named, ordered set of candidate operations.

    **Arguments:**
    - `name`: the space's name, recorded in genotypes.
    - `op_names`: candidate op names, in alpha's column order.
    - `constructors`: one `(channels, stride, affine, key) -> Module` per name, same order.
    """

    name: str
    op_names: tuple[str, ...]
    constructors: tuple[OpConstructor, ...]

    def __post_init__(self):
        if len(self.op_names) != len(self.constructors):
            raise ValueError(
                f"space {self.name!r}: {len(self.op_names)} op names but {len(self.constructors)} constructors"
            )
        if len(set(self.op_names)) != len(self.op_names):
            raise ValueError(f"space {self.name!r}: op names {self.op_names} repeat")
        if not self.op_names:
            raise ValueError(f"space {self.name!r} has no ops")

    def make_op(self, name: str, channels: int, stride: int, affine: bool, *, key: PRNGKeyArray):
        """Build the op `name` of this space."""
        if name not in self.op_names:
            raise ValueError(f"unknown op {name!r} for space {self.name!r}; known: {self.op_names}")
        index = self.op_names.index(name)
        return self.constructors[index](channels, stride, affine, key)

    @property
    def droppable(self) -> str | None:
        """The op that means 'no edge' (`none`), never chosen by discretisation."""
        return droppable_op(self.op_names)


def _zero(c, s, affine, key):
    return Zero(s)


def _pool(kind):
    # Inside mixed ops pools get a non-affine BN (search network); in a discrete evaluation
    # network (affine=True) they have none, as in the original.
    return lambda c, s, affine, key: Pool(kind, c, s, with_norm=not affine)


def _skip(c, s, affine, key):
    return Identity() if s == 1 else FactorizedReduce(c, c, affine, key=key)


def _sep(k):
    return lambda c, s, affine, key: SepConv(c, c, k, s, k // 2, affine, key=key)


def _dil(k):
    return lambda c, s, affine, key: DilConv(c, c, k, s, k - 1, 2, affine, key=key)


def _conv(k):
    return lambda c, s, affine, key: ReLUConvBN(c, c, k, s, k // 2, affine, key=key)


def _space(name: str, op_names: tuple[str, ...], constructors: dict[str, OpConstructor]) -> SearchSpace:
    """A space whose constructors are given by op name (the order is `op_names`')."""
    return SearchSpace(name, op_names, tuple(constructors[op] for op in op_names))


DARTS_SPACE = _space(
    "darts",
    DARTS_OPS,
    {
        "none": _zero,
        "max_pool_3x3": _pool("max"),
        "avg_pool_3x3": _pool("avg"),
        "skip_connect": _skip,
        "sep_conv_3x3": _sep(3),
        "sep_conv_5x5": _sep(5),
        "dil_conv_3x3": _dil(3),
        "dil_conv_5x5": _dil(5),
    },
)

# The seed document's minimal mixed op: identity, 3x3 and 5x5 conv, average and max pool.
SEED_SPACE = _space(
    "seed",
    SEED_OPS,
    {
        "skip_connect": _skip,
        "conv_3x3": _conv(3),
        "conv_5x5": _conv(5),
        "avg_pool_3x3": _pool("avg"),
        "max_pool_3x3": _pool("max"),
    },
)

# NAS-Bench-201's ops (Dong & Yang, ICLR 2020); the cell and network are in `darts_eqx.nb201`.
NB201_SPACE = _space(
    "nb201",
    NB201_OPS,
    {
        "none": _zero,
        "skip_connect": _skip,
        "nor_conv_1x1": _conv(1),
        "nor_conv_3x3": _conv(3),
        "avg_pool_3x3": lambda c, s, affine, key: Pool("avg", c, s, with_norm=False),  # no BN after pooling
    },
)

SPACES = {space.name: space for space in (DARTS_SPACE, SEED_SPACE, NB201_SPACE)}


def register_space(space: SearchSpace) -> SearchSpace:
    """Make a custom `space` usable by name (`search(space=name)`, genotypes of that space): the
    search then runs a `SeedNetwork` of mixed ops over its ops, which must map an NHWC batch to
    one of the same shape at stride 1. Registering another space under a taken name is an error."""
    if not isinstance(space, SearchSpace):
        raise ValueError(f"register_space expects a SearchSpace, got {type(space).__name__}")
    existing = SPACES.get(space.name)
    if existing is not None and existing is not space:
        raise ValueError(f"a different search space is already registered as {space.name!r}")
    register_op_names(space.name, space.op_names)
    SPACES[space.name] = space
    return space


def get_space(name: str) -> SearchSpace:
    """The search space called `name`: `darts`, `seed`, `nb201` or one given to `register_space`."""
    try:
        return SPACES[name]
    except KeyError:
        raise ValueError(f"unknown search space {name!r}; known: {tuple(SPACES)}") from None
