"""DARTS variants as plug-ins (see `darts_eqx.Method`): a plug-in is a function of a
`MethodContext` returning a `Method`; `chain` composes them; `search(method=...)` runs one of the
user's own after the ones its config names."""

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

__all__ = [
    "Method",
    "MethodContext",
    "Plugin",
    "auxiliary_skip",
    "beta_regularisation",
    "chain",
    "first_order",
    "from_config",
    "softmax",
    "unrolled",
]
