"""darts_eqx: Differentiable Architecture Search (Liu, Simonyan, Yang, ICLR 2019) in JAX + Equinox."""

from . import data as data
from ._cell import SearchCell as SearchCell
from ._data import ImageData as ImageData
from ._discretize import (
    DiscreteCell as DiscreteCell,
)
from ._discretize import (
    DiscreteNetwork as DiscreteNetwork,
)
from ._discretize import (
    DiscreteSeedNetwork as DiscreteSeedNetwork,
)
from ._discretize import (
    derive_genotype as derive_genotype,
)
from ._discretize import (
    discretize as discretize,
)
from ._genotype import Genotype as Genotype
from ._mixed import (
    ArchLogits as ArchLogits,
)
from ._mixed import (
    MixedOp as MixedOp,
)
from ._mixed import (
    combine_arch as combine_arch,
)
from ._mixed import (
    is_arch as is_arch,
)
from ._mixed import (
    split_arch as split_arch,
)
from ._network import SearchNetwork as SearchNetwork
from ._network import SeedNetwork as SeedNetwork
from ._search import (
    SearchConfig as SearchConfig,
)
from ._search import (
    SearchDiverged as SearchDiverged,
)
from ._search import (
    SearchResult as SearchResult,
)
from ._search import (
    SearchState as SearchState,
)
from ._search import (
    search as search,
)
from ._search import (
    search_step as search_step,
)
from ._spaces import DARTS_SPACE as DARTS_SPACE
from ._spaces import SEED_SPACE as SEED_SPACE
from ._spaces import SearchSpace as SearchSpace

__version__ = "0.1.0"
