"""DARTS variants as plug-ins (see `darts_eqx.Method`): a plug-in is a function of a
`MethodContext` returning a `Method`; `chain` composes them; `search(method=...)` runs one of the
user's own after the ones its config names. A relaxation is `relax(logits, step, inner, key)`:
`inner(logits, step, key)` the relaxations before it (`softmax` first), `key` a PRNG key of that
forward pass alone, fresh each step and the same on a rerun or a resume."""

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
