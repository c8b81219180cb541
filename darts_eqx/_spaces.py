"""Search spaces as data: an ordered tuple of op names and one constructor per name.

The op order is part of a space's definition: alpha's last axis follows it and genotypes are
derived from it, so it never comes from dict or set iteration.
"""

from collections.abc import Callable
from dataclasses import dataclass

import equinox as eqx
from jaxtyping import PRNGKeyArray

from ._ops import DilConv, FactorizedReduce, Identity, Pool, ReLUConvBN, SepConv, Zero

# (channels, stride, affine, key) -> op module
OpConstructor = Callable[[int, int, bool, PRNGKeyArray], eqx.Module]


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
        return "none" if "none" in self.op_names else None


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


DARTS_SPACE = SearchSpace(
    name="darts",
    op_names=(
        "none",
        "max_pool_3x3",
        "avg_pool_3x3",
        "skip_connect",
        "sep_conv_3x3",
        "sep_conv_5x5",
        "dil_conv_3x3",
        "dil_conv_5x5",
    ),
    constructors=(
        lambda c, s, affine, key: Zero(s),
        _pool("max"),
        _pool("avg"),
        _skip,
        _sep(3),
        _sep(5),
        _dil(3),
        _dil(5),
    ),
)

# The seed document's minimal mixed op: identity, 3x3 and 5x5 conv, average and max pool.
SEED_SPACE = SearchSpace(
    name="seed",
    op_names=("skip_connect", "conv_3x3", "conv_5x5", "avg_pool_3x3", "max_pool_3x3"),
    constructors=(_skip, _conv(3), _conv(5), _pool("avg"), _pool("max")),
)

SPACES = {space.name: space for space in (DARTS_SPACE, SEED_SPACE)}


def get_space(name: str) -> SearchSpace:
    """The built-in search space called `name` (`darts` or `seed`)."""
    try:
        return SPACES[name]
    except KeyError:
        raise ValueError(f"unknown search space {name!r}; known: {tuple(SPACES)}") from None
