"""darts_eqx: Differentiable Architecture Search (Liu, Simonyan, Yang, ICLR 2019) in JAX + Equinox.

Public names are imported from their submodules on first use (PEP 562), so that reading a genotype
(`from darts_eqx import Genotype`) imports neither jax nor the C++ kernel.
"""

import importlib
import typing

from ._version import __version__ as __version__

__all__ = [
    "Architecture",
    "CellNetwork",
    "LayerTopology",
    "Normalisation",
    "Topology",
    "darts_network",
    "darts_supernet",
    "get_space",
    "layered_supernet",
    "ArchLogits",
    "CheckpointError",
    "CheckpointWarning",
    "DARTS_SPACE",
    "DiscreteCell",
    "Execution",
    "GENOTYPES",
    "Genotype",
    "ImageData",
    "Method",
    "MethodContext",
    "MixedOp",
    "NB201_SPACE",
    "SEED_SPACE",
    "SearchCell",
    "SearchConfig",
    "SearchDiverged",
    "SearchResult",
    "SearchSpace",
    "SearchState",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "arch_gradient",
    "combine_arch",
    "count_parameters",
    "data",
    "derive_genotype",
    "discretize",
    "is_arch",
    "jit_build",
    "load_trained",
    "methods",
    "momentum_buffer",
    "named_genotype",
    "nb201",
    "plot_alphas",
    "plot_cell",
    "read_metrics",
    "register_space",
    "save_trained",
    "search",
    "search_step",
    "split_arch",
    "train",
]

# Public submodules, and the module that defines each other public name.
_SUBMODULES = ("data", "methods", "nb201")
_DEFINED_IN = {
    "SearchCell": "_cell",
    "CheckpointError": "_checkpoint",
    "CheckpointWarning": "_checkpoint",
    "SearchConfig": "_config",
    "ImageData": "_data",
    "DiscreteCell": "_cell",
    "derive_genotype": "_supernet",
    "discretize": "_supernet",
    "Architecture": "_supernet",
    "count_parameters": "_skeleton",
    "CellNetwork": "_skeleton",
    "darts_supernet": "_darts",
    "darts_network": "_darts",
    "layered_supernet": "_layers",
    "LayerTopology": "_layers",
    "Normalisation": "_norm",
    "Topology": "_spaces",
    "get_space": "_spaces",
    "Execution": "_execution",
    "Genotype": "_genotype",
    "Method": "_methods",
    "MethodContext": "_methods",
    "ArchLogits": "_mixed",
    "MixedOp": "_mixed",
    "combine_arch": "_mixed",
    "is_arch": "_mixed",
    "split_arch": "_mixed",
    "jit_build": "_ops",
    "plot_alphas": "_plot",
    "plot_cell": "_plot",
    "read_metrics": "_metrics",
    "SearchDiverged": "_search",
    "SearchResult": "_search",
    "search": "_search",
    "arch_gradient": "_second_order",
    "momentum_buffer": "_second_order",
    "DARTS_SPACE": "_darts",
    "NB201_SPACE": "nb201",
    "SEED_SPACE": "_layers",
    "SearchSpace": "_spaces",
    "register_space": "_spaces",
    "SearchState": "_state",
    "search_step": "_step",
    "TrainConfig": "_train",
    "TrainResult": "_train",
    "load_trained": "_saved",
    "save_trained": "_saved",
    "train": "_train",
    "GENOTYPES": "_zoo",
    "named_genotype": "_zoo",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _DEFINED_IN:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_DEFINED_IN[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if typing.TYPE_CHECKING:
    from . import data as data, methods as methods, nb201 as nb201
    from ._cell import (
        DiscreteCell as DiscreteCell,
        SearchCell as SearchCell,
    )
    from ._checkpoint import (
        CheckpointError as CheckpointError,
        CheckpointWarning as CheckpointWarning,
    )
    from ._config import SearchConfig as SearchConfig
    from ._darts import (
        DARTS_SPACE as DARTS_SPACE,
        darts_network as darts_network,
        darts_supernet as darts_supernet,
    )
    from ._data import ImageData as ImageData
    from ._execution import Execution as Execution
    from ._genotype import Genotype as Genotype
    from ._layers import (
        SEED_SPACE as SEED_SPACE,
        LayerTopology as LayerTopology,
        layered_supernet as layered_supernet,
    )
    from ._methods import (
        Method as Method,
        MethodContext as MethodContext,
    )
    from ._metrics import read_metrics as read_metrics
    from ._mixed import (
        ArchLogits as ArchLogits,
        MixedOp as MixedOp,
        combine_arch as combine_arch,
        is_arch as is_arch,
        split_arch as split_arch,
    )
    from ._norm import Normalisation as Normalisation
    from ._ops import jit_build as jit_build
    from ._plot import (
        plot_alphas as plot_alphas,
        plot_cell as plot_cell,
    )
    from ._saved import load_trained as load_trained, save_trained as save_trained
    from ._search import (
        SearchDiverged as SearchDiverged,
        SearchResult as SearchResult,
        search as search,
    )
    from ._second_order import (
        arch_gradient as arch_gradient,
        momentum_buffer as momentum_buffer,
    )
    from ._skeleton import (
        CellNetwork as CellNetwork,
        count_parameters as count_parameters,
    )
    from ._spaces import (
        SearchSpace as SearchSpace,
        Topology as Topology,
        get_space as get_space,
        register_space as register_space,
    )
    from ._state import SearchState as SearchState
    from ._step import search_step as search_step
    from ._supernet import (
        Architecture as Architecture,
        derive_genotype as derive_genotype,
        discretize as discretize,
    )
    from ._train import TrainConfig as TrainConfig, TrainResult as TrainResult, train as train
    from ._zoo import (
        GENOTYPES as GENOTYPES,
        named_genotype as named_genotype,
    )
    from .nb201 import NB201_SPACE as NB201_SPACE
