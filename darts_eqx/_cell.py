"""The DARTS cell: two preprocessed inputs, `steps` intermediate nodes, output the channel
concatenation of the last `multiplier` nodes. In the search cell each node sums mixed ops over all
earlier states; in the discrete cell each node sums two chosen ops. Both are cells of the skeleton
(`_skeleton.CellNetwork`)."""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._mixed import MixedOp, OpWeights, partial_channel_edge, partial_channel_merge
from ._norm import SEARCH_NORM, Normalisation
from ._ops import Earlier, FactorizedReduce, Identity, Images, Output, ReLUConvBN
from ._skeleton import DropPath
from ._spaces import SearchSpace

if TYPE_CHECKING:
    # A module that maps a batch of images to images: an op, or a cell's input preprocessing;
    # called `op(x, state) -> (y, state)`.
    OpModule = Callable[..., tuple[Array, Any]]
else:
    # At run time fields so annotated are checked (by jaxtyping's import hook) as any `eqx.Module`.
    OpModule = eqx.Module


def edge_index(node: int, source: int) -> int:
    """Row of alpha for the edge from state `source` into intermediate node `node`."""
    return sum(2 + j for j in range(node)) + source


def num_edges(steps: int) -> int:
    """Edges of a cell with `steps` intermediate nodes (14 for 4 nodes)."""
    return edge_index(steps, 0)


def preprocess(cin: int, cout: int, reduce_input: bool, norm: Normalisation, *, key: PRNGKeyArray):
    """Bring a cell input to the cell's width (and resolution, after a reduction)."""
    if reduce_input:
        return FactorizedReduce(cin, cout, norm, key=key)
    return ReLUConvBN(cin, cout, 1, 1, 0, norm, key=key)


def check_partial_channels(channels: int, k: int):
    """PC-DARTS sends channels/k channels of every edge through its mixed op: k must divide them."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`partial_channels` (={k!r}) must be a positive integer")
    if channels % k:
        raise ValueError(f"`partial_channels` (={k}) must divide the cell's channel count ({channels})")


class SearchCell(eqx.Module):
    """One cell of the supernet. Edges from the two cell inputs stride 2 in a reduction cell.

    With `partial_channels=k > 1` each edge is a PC-DARTS edge (`partial_channel_edge`: the mixed
    op, built at channels/k, sees 1/k of the channels) and node j sums its edges weighted by the
    edge-normalisation weights passed to `__call__`."""

    preprocess0: OpModule
    preprocess1: OpModule
    edges: tuple[MixedOp, ...]
    reduction: bool = eqx.field(static=True)
    steps: int = eqx.field(static=True)
    multiplier: int = eqx.field(static=True)
    partial_channels: int = eqx.field(static=True, default=1)

    def __init__(
        self,
        space: SearchSpace,
        c_prev_prev: int,
        c_prev: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
        steps: int = 4,
        multiplier: int = 4,
        partial_channels: int = 1,
        *,
        key: PRNGKeyArray,
    ):
        check_partial_channels(channels, partial_channels)
        k0, k1, ke = jax.random.split(key, 3)
        self.preprocess0 = preprocess(c_prev_prev, channels, reduction_prev, SEARCH_NORM, key=k0)
        self.preprocess1 = preprocess(c_prev, channels, False, SEARCH_NORM, key=k1)
        keys = iter(jax.random.split(ke, num_edges(steps)))
        self.edges = tuple(
            MixedOp(space, channels // partial_channels, 2 if reduction and source < 2 else 1, key=next(keys))
            for node in range(steps)
            for source in range(node + 2)
        )
        self.reduction, self.steps, self.multiplier = reduction, steps, multiplier
        self.partial_channels = partial_channels

    def edge_op(self, node: int, source: int, name: str) -> OpModule:
        """The op module `name` on the edge `source -> node`."""
        mixed = self.edges[edge_index(node, source)]
        return mixed.ops[mixed.op_names.index(name)]

    def __call__(
        self,
        s0: Earlier,
        s1: Images,
        cell_weights: tuple[OpWeights, Float[Array, " edges"] | None],
        state: Any = None,
        drop: DropPath | None = None,
    ) -> tuple[Output, Any]:
        weights, edge_weights = cell_weights
        states = [self.preprocess0(s0)[0], self.preprocess1(s1)[0]]
        k = self.partial_channels
        for node in range(self.steps):
            terms = []
            for i, h in enumerate(states):
                e = edge_index(node, i)
                stride = 2 if self.reduction and i < 2 else 1
                term = partial_channel_edge(self.edges[e], h, weights[e], k, stride)
                terms.append(term if edge_weights is None else edge_weights[e] * term)
            states.append(sum(terms[1:], terms[0]))
        return jnp.concatenate(states[-self.multiplier :], axis=-1), state


class PartialChannelOp(eqx.Module):
    """A discretised PC-DARTS edge: `op` on the first 1/k of the channels, the rest bypassing it,
    then the channel shuffle (`partial_channel_edge` with one op)."""

    op: OpModule
    partial_channels: int = eqx.field(static=True)
    stride: int = eqx.field(static=True)

    def __call__(self, x: Images, state=None):
        y, state = self.op(x[..., : x.shape[-1] // self.partial_channels], state)
        return partial_channel_merge(y, x, self.partial_channels, self.stride), state


class DiscreteCell(eqx.Module):
    """A discrete cell: node k is `ops[2k](states[inputs[2k]]) + ops[2k+1](states[inputs[2k+1]])`;
    the output concatenates `states[i]` for `i` in `concat`. In training, drop-path zeroes
    whole samples of each edge but identities."""

    preprocess0: OpModule
    preprocess1: OpModule
    ops: tuple[OpModule, ...]
    inputs: tuple[int, ...] = eqx.field(static=True)
    concat: tuple[int, ...] = eqx.field(static=True)
    reduction: bool = eqx.field(static=True)

    def __check_init__(self):
        if len(self.ops) != len(self.inputs) or len(self.ops) % 2:
            raise ValueError(
                f"a discrete cell needs two ops per node, got {len(self.ops)} ops, {len(self.inputs)} inputs"
            )
        for k, i in enumerate(self.inputs):
            if not 0 <= i < k // 2 + 2:
                raise ValueError(f"op {k} of a discrete cell reads state {i}, which node {k // 2} cannot see")

    def __call__(self, s0: Earlier, s1: Images, weights=None, state=None, drop: DropPath | None = None):
        h0, state = self.preprocess0(s0, state)
        h1, state = self.preprocess1(s1, state)
        states = [h0, h1]
        keys: list[Any] = [None] * len(self.ops) if drop is None else list(jax.random.split(drop.key, len(self.ops)))
        for node in range(len(self.ops) // 2):
            total = None
            for k in (2 * node, 2 * node + 1):
                h, state = self.ops[k](states[self.inputs[k]], state)
                if drop is not None and not isinstance(self.ops[k], Identity):
                    h = drop(h, keys[k])
                total = h if total is None else total + h
            states.append(total)
        return jnp.concatenate([states[i] for i in self.concat], axis=-1), state
