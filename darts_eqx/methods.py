"""DARTS variants as plug-ins (see `darts_eqx.Method`): a plug-in is a function of a
`MethodContext` returning a `Method`; `chain` composes them; `search(method=...)` runs one of the
user's own after the ones its config names. A relaxation is `relax(logits, step, inner, key)`:
`inner(logits, step, key)` the relaxations before it (`softmax` first), `key` a PRNG key of that
forward pass alone, fresh each step and the same on a rerun or a resume. `METHODS` names the
built-in variants by the names `SearchConfig.method` takes (`gdas`, `drnas`, `sdarts-rs` and
`sdarts-adv` from `sdarts`, `fairdarts`);
`SearchConfig.select="pt"` selects the genotype by DARTS-PT's perturbation instead of alpha's
argmax, on the supernet of any method."""

from ._methods import (
    Method as Method,
    MethodContext as MethodContext,
    Plugin as Plugin,
    auxiliary_skip as auxiliary_skip,
    beta_regularisation as beta_regularisation,
    chain as chain,
    first_order as first_order,
    from_config as from_config,
    softmax as softmax,
    unrolled as unrolled,
)
from ._mixed import SampledWeights as SampledWeights
from ._variants import (
    METHODS as METHODS,
    drnas as drnas,
    fairdarts as fairdarts,
    gdas as gdas,
    sdarts as sdarts,
)

__all__ = [
    "METHODS",
    "Method",
    "MethodContext",
    "Plugin",
    "SampledWeights",
    "auxiliary_skip",
    "beta_regularisation",
    "chain",
    "drnas",
    "fairdarts",
    "first_order",
    "from_config",
    "gdas",
    "sdarts",
    "softmax",
    "unrolled",
]
