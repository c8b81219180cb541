"""XLA compiler options for the library's large jitted loops (the search and training chunks).

On CPU these programs are compile-bound: a search chunk at C=16, layers=8 is ~1,400 distinct
fusion kernels, and LLVM's optimisation of them is a large share of its compile time. XLA:CPU's
`CPU_OPT_PRESET_FAST_COMPILE` preset cut that compile by 12-17% with no measurable change in run
time, whose bulk is convolution library calls that LLVM does not generate (experiments/README.md).
A preset the user chose in `XLA_FLAGS` is left alone; `DARTS_EQX_XLA_PRESET=default` turns ours off.
"""

import os

import jax

_PRESETS = {"fast_compile": "CPU_OPT_PRESET_FAST_COMPILE", "default": None}


def loop_compiler_options() -> dict[str, str] | None:
    """`compiler_options` for `jax.jit` of a search or training chunk on the current backend."""
    choice = os.environ.get("DARTS_EQX_XLA_PRESET", "fast_compile")
    if choice not in _PRESETS:
        raise ValueError(f"DARTS_EQX_XLA_PRESET (={choice!r}) must be one of {sorted(_PRESETS)}")
    if _PRESETS[choice] is None or jax.default_backend() != "cpu":
        return None
    if "--xla_cpu_opt_preset" in os.environ.get("XLA_FLAGS", ""):
        return None
    return {"xla_cpu_opt_preset": _PRESETS[choice]}
