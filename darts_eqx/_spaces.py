"""Search spaces as data: an ordered tuple of op names, one constructor per name, and a topology
that wires the ops into networks (`Topology`).

The op order is part of a space's definition: alpha's last axis follows it and genotypes are
derived from it, so it never comes from dict or set iteration. The built-in spaces register
themselves from their own modules through `register_space`, as a user's space does; their op
names also live in `_op_names.py` (no jax), so that genotypes are read and checked without
importing the ops.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jaxtyping import Array, PRNGKeyArray

from ._norm import Normalisation
from ._op_names import droppable_op, register_op_names

# (channels, stride, norm, key) -> op module: `op(x, state) -> (y, state)` on a batch
OpConstructor = Callable[[int, int, Normalisation, PRNGKeyArray], Callable[..., tuple[Array, Any]]]


@dataclass(frozen=True)
class SearchSpace:
    """A named, ordered set of candidate operations.

    **Arguments:**
    - `name`: the space's name, recorded in genotypes.
    - `op_names`: candidate op names, in alpha's column order.
    - `topology`: how the ops are wired into the supernet, the discrete network and the
      evaluation network (`Topology`); default: `layers()`, a stack of mixed ops of stride 1.
    - `constructors`: one `(channels, stride, norm, key) -> Module` per name, same order; the
      module is called `op(x, state) -> (y, state)` on an NHWC batch and builds its batch norms
      with `norm(channels)` (see `darts_eqx.Normalisation`), so that the same op serves the
      search (batch statistics) and the evaluation network (running statistics).
    """

    name: str
    op_names: tuple[str, ...]
    constructors: tuple[OpConstructor, ...]
    topology: "Topology" = None  # type: ignore[assignment]  # the layered topology when not given

    def __post_init__(self):
        if self.topology is None:
            from ._layers import LayerTopology

            object.__setattr__(self, "topology", LayerTopology())
        if not isinstance(self.topology, Topology):
            raise ValueError(f"space {self.name!r}: topology must be a darts_eqx.Topology, got {self.topology!r}")
        if len(self.op_names) != len(self.constructors):
            raise ValueError(
                f"space {self.name!r}: {len(self.op_names)} op names but {len(self.constructors)} constructors"
            )
        if len(set(self.op_names)) != len(self.op_names):
            raise ValueError(f"space {self.name!r}: op names {self.op_names} repeat")
        if not self.op_names:
            raise ValueError(f"space {self.name!r} has no ops")

    def make_op(self, name: str, channels: int, stride: int, norm: Normalisation, *, key: PRNGKeyArray):
        """Build the op `name` of this space."""
        if name not in self.op_names:
            raise ValueError(f"unknown op {name!r} for space {self.name!r}; known: {self.op_names}")
        index = self.op_names.index(name)
        return self.constructors[index](channels, stride, norm, key)

    @property
    def droppable(self) -> str | None:
        """The op that means 'no edge' (`none`), never chosen by discretisation."""
        return droppable_op(self.op_names)


def space(
    name: str, op_names: tuple[str, ...], constructors: dict[str, OpConstructor], topology: "Topology | None" = None
) -> SearchSpace:
    """A space whose constructors are given by op name (the order is `op_names`')."""
    missing = [op for op in op_names if op not in constructors]
    if missing:
        raise ValueError(f"space {name!r}: no constructor for ops {missing}")
    return SearchSpace(name, op_names, tuple(constructors[op] for op in op_names), topology)  # type: ignore[arg-type]


class Topology:
    """How a space's ops are wired into networks: the supernet a search trains, the genotype a
    trained supernet selects, the discrete network it becomes, and the evaluation network a
    genotype is trained as. Every network is a `darts_eqx.CellNetwork`. Subclass it to give a
    space a topology of its own; the built-in ones are the DARTS cell (`darts_eqx.DARTS_SPACE`),
    NAS-Bench-201's (`darts_eqx.nb201`) and a stack of mixed ops (`darts_eqx.LayerTopology`).

    The genotypes `derive` returns are saved with the models and run folders: a genotype class of
    its own provides `to_dict()` (a JSON-ready dict) and `to_json(**json_dumps_options)` (its
    text), and the topology's `genotype_from_json` reads either back."""

    # The form of its genotypes' checks: "cell" (DARTS cells), "single" (one op), or None when
    # its genotypes are of a class of its own.
    genotype_form: str | None = None
    # Whether its supernet takes `partial_channels` > 1 (PC-DARTS edges).
    supports_partial_channels: bool = False
    # The `layers` the command line uses when none is given (None: `SearchConfig`'s default).
    default_layers: int | None = None
    # Whether its genotypes may pick the space's `none` op on an edge (NAS-Bench-201's do).
    chooses_droppable: bool = False

    def edge_groups(self, supernet):
        """The groups of edges its genotypes choose among, as `(cell kind, alpha rows, how many are
        kept)` (the DARTS cell: each node's incoming edges, 2 kept), or None when every edge is kept
        (for DARTS-PT's edge decisions)."""
        return None

    def reductions(self, config) -> int:
        """How many times the supernet of `config` halves the image size."""
        return 0

    def supernet(self, space: "SearchSpace", config, image_shape, num_classes: int, *, key: PRNGKeyArray):
        """The supernet of `config` (its `channels`, `layers`, ...) for images of `image_shape`
        (height, width, channels)."""
        raise NotImplementedError

    def derive(self, space: "SearchSpace", supernet):
        """The genotype the supernet's architecture parameters select."""
        raise NotImplementedError

    def discretize(self, space: "SearchSpace", supernet, genotype):
        """`supernet` with each kept edge's chosen op (and its weights) and nothing else."""
        raise NotImplementedError

    def network(
        self,
        space: "SearchSpace",
        genotype,
        channels: int,
        layers: int,
        num_classes: int,
        in_channels: int,
        auxiliary: bool,
        *,
        key: PRNGKeyArray,
    ):
        """A fresh evaluation network (running batch-norm statistics) implementing `genotype`."""
        raise NotImplementedError(f"{type(self).__name__} does not build evaluation networks")

    def genotype_from_json(self, space: "SearchSpace", obj):
        """The genotype a `to_dict()` (or `to_json()`) of this topology's genotypes wrote."""
        from ._genotype import Genotype

        return Genotype.from_json(obj)


def check_image_size(space: SearchSpace, config, height: int, width: int) -> None:
    """A `ValueError` if images of `height` x `width` cannot pass the reductions of `space`'s
    networks for `config` (its `layers`)."""
    n = space.topology.reductions(config)
    if height % 2**n or width % 2**n:
        raise ValueError(
            f"images of {height}x{width} cannot pass {n} reduction cells: height and width must be divisible by {2**n}"
        )


SPACES: dict[str, SearchSpace] = {}
# The built-in spaces' modules, imported (and so registered) when a space is first looked up.
_BUILT_IN = ("._darts", "._layers", ".nb201")


def register_space(space: SearchSpace) -> SearchSpace:
    """Make `space` usable by name (`search(space=name)`, `--space name`, genotypes of that
    space). Registering another space under a taken name is an error."""
    if not isinstance(space, SearchSpace):
        raise ValueError(f"register_space expects a SearchSpace, got {type(space).__name__}")
    existing = SPACES.get(space.name)
    if existing is not None and existing is not space:
        raise ValueError(f"a different search space is already registered as {space.name!r}")
    register_op_names(space.name, space.op_names, space.topology.genotype_form)
    SPACES[space.name] = space
    return space


def space_of(model) -> SearchSpace:
    """The registered space a network (`CellNetwork`) belongs to."""
    name = getattr(model, "space", None)
    if not isinstance(name, str):
        raise TypeError(f"expected a darts_eqx network (a CellNetwork), got {type(model).__name__}")
    return get_space(name)


def _import_built_in():
    import importlib

    for module in _BUILT_IN:
        importlib.import_module(module, __package__)


def space_names() -> tuple[str, ...]:
    """The names of the registered spaces, built-in ones first."""
    _import_built_in()
    return tuple(SPACES)


def get_space(name: str) -> SearchSpace:
    """The search space called `name`: a built-in one or one given to `register_space`."""
    _import_built_in()
    try:
        return SPACES[name]
    except KeyError:
        raise ValueError(f"unknown search space {name!r}; known: {tuple(SPACES)}") from None
