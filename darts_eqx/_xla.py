"""XLA compiler options for the library's large jitted loops (the search and training chunks).

On CPU these programs are compile-bound: a search chunk at C=16, layers=8 is ~1,400 distinct
fusion kernels, and LLVM's optimisation of them is a large share of its compile time. XLA:CPU's
`CPU_OPT_PRESET_FAST_COMPILE` preset cut that compile by 7-13% with no measurable change in run
time, whose bulk is convolution library calls that LLVM does not generate (experiments/README.md).
A preset the user chose in `XLA_FLAGS` (or a flag file there) is left alone; an XLA without the
option gets none; `DARTS_EQX_XLA_PRESET=default` turns ours off.
"""

import functools
import os

import jax

_PRESETS = {"fast_compile": "CPU_OPT_PRESET_FAST_COMPILE", "default": None}


def loop_compiler_options() -> dict[str, str] | None:
    """`compiler_options` for `jax.jit` of a search or training chunk on the current backend."""
    choice = os.environ.get("DARTS_EQX_XLA_PRESET") or "fast_compile"
    if choice not in _PRESETS:
        raise ValueError(f"DARTS_EQX_XLA_PRESET (={choice!r}) must be one of {sorted(_PRESETS)}")
    if _PRESETS[choice] is None or jax.default_backend() != "cpu":
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_cpu_opt_preset" in flags or "--flagfile" in flags:
        return None
    return {"xla_cpu_opt_preset": _PRESETS[choice]} if _accepted(_PRESETS[choice]) else None


@functools.cache
def _accepted(preset: str) -> bool:
    """Whether this XLA knows the preset (older jaxlibs lack the option): a tiny compile, once."""
    try:
        jax.jit(lambda x: x + 1, compiler_options={"xla_cpu_opt_preset": preset}).lower(1.0).compile()
    except Exception:  # noqa: BLE001 - XLA reports an unknown option as a generic runtime error
        return False
    return True
