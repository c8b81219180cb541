"""darts_eqx: Differentiable Architecture Search (Liu, Simonyan, Yang, ICLR 2019) in JAX + Equinox."""

from . import data as data, nb201 as nb201
from ._cell import SearchCell as SearchCell
from ._checkpoint import CheckpointError as CheckpointError, CheckpointWarning as CheckpointWarning
from ._data import ImageData as ImageData
from ._discretize import (
    DiscreteCell as DiscreteCell,
    DiscreteNetwork as DiscreteNetwork,
    DiscreteSeedNetwork as DiscreteSeedNetwork,
    derive_genotype as derive_genotype,
    discretize as discretize,
)
from ._eval import (
    EvalNetwork as EvalNetwork,
    count_parameters as count_parameters,
    make_eval_network as make_eval_network,
)
from ._genotype import Genotype as Genotype
from ._mixed import (
    ArchLogits as ArchLogits,
    MixedOp as MixedOp,
    combine_arch as combine_arch,
    is_arch as is_arch,
    split_arch as split_arch,
)
from ._network import SearchNetwork as SearchNetwork, SeedNetwork as SeedNetwork
from ._plot import plot_alphas as plot_alphas, plot_cell as plot_cell
from ._search import (
    SearchConfig as SearchConfig,
    SearchDiverged as SearchDiverged,
    SearchResult as SearchResult,
    SearchState as SearchState,
    search as search,
    search_step as search_step,
)
from ._second_order import arch_gradient as arch_gradient, momentum_buffer as momentum_buffer
from ._spaces import (
    DARTS_SPACE as DARTS_SPACE,
    NB201_SPACE as NB201_SPACE,
    SEED_SPACE as SEED_SPACE,
    SearchSpace as SearchSpace,
    register_space as register_space,
)
from ._train import (
    TrainConfig as TrainConfig,
    TrainResult as TrainResult,
    load_trained as load_trained,
    save_trained as save_trained,
    train as train,
)
from ._version import __version__ as __version__
from ._zoo import GENOTYPES as GENOTYPES, named_genotype as named_genotype
