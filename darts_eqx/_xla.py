"""XLA compiler options for the library's large jitted loops (the search and training chunks).

On CPU these programs are compile-bound: a search chunk is over a thousand distinct fusion
kernels, and LLVM's optimisation of them is a large share of its compile time. XLA:CPU's
`CPU_OPT_PRESET_FAST_COMPILE` preset shortens that compile without a measurable change in run
time, whose bulk is convolution library calls that LLVM does not generate (figures in
experiments/RESULTS.md).
A preset the user chose in `XLA_FLAGS` (or a flag file there) is left alone; an XLA without the
option gets none; `DARTS_EQX_XLA_PRESET=default` turns ours off.

`release_compiler_memory` hands the heap XLA's compiler freed back to the operating system after
each large compile, before the program runs (glibc keeps it otherwise, and the run's buffers come
on top of it). `short_locations` keeps whole Python tracebacks out of these programs' source
locations. `loop_jit` applies all of it.
"""

import contextlib
import ctypes
import functools
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import cast

import equinox as eqx
import jax

_PRESETS = {"fast_compile": "CPU_OPT_PRESET_FAST_COMPILE", "default": None}


def check_preset(choice: str, what: str = "xla_preset") -> str:
    if choice not in _PRESETS:
        raise ValueError(f"{what} (={choice!r}) must be one of {sorted(_PRESETS)}")
    return choice


def loop_compiler_options(preset: str | None = None) -> dict[str, str] | None:
    """`compiler_options` for `jax.jit` of a search or training chunk on the current backend, with
    XLA:CPU preset `preset` (`fast_compile` or `default`; None: `$DARTS_EQX_XLA_PRESET`, else
    `fast_compile`)."""
    if preset is None:
        choice = check_preset(os.environ.get("DARTS_EQX_XLA_PRESET") or "fast_compile", "DARTS_EQX_XLA_PRESET")
    else:
        choice = check_preset(preset)
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


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_LARGE_COMPILE_S = 1.0  # eager ops compile in milliseconds: trimming after each would cost more


def _trim() -> None:
    ctypes.CDLL(None).malloc_trim(0)


@functools.cache
def release_compiler_memory() -> bool:
    """Once per process: after every XLA compile longer than a second, return the freed heap to
    the OS (glibc's `malloc_trim`). The compiler's memory is freed when it finishes, but glibc
    keeps those pages in its per-thread arenas, and the program's own buffers, allocated from
    other threads, then come on top, raising the peak RSS (experiments/RESULTS.md). False where
    there is no `malloc_trim` (not glibc)."""
    try:
        ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return False

    def after_compile(event: str, duration_secs: float, **_) -> None:
        if event == _COMPILE_EVENT and duration_secs > _LARGE_COMPILE_S:
            _trim()

    jax.monitoring.register_event_duration_secs_listener(after_compile)
    return True


_FULL_TRACEBACKS = "jax_include_full_tracebacks_in_locations"


def _full_tracebacks_option() -> Callable[[bool], AbstractContextManager] | None:
    """The option's thread-local context manager (JAX's own, restoring the previous value), or None
    where this JAX does not expose one: `jax.config.update` would change it for every thread."""
    option = getattr(jax.config, "_value_holders", {}).get(_FULL_TRACEBACKS)
    # A callable holder is JAX's `State`, whose call with a value is that value's context manager.
    return cast(Callable[[bool], AbstractContextManager], option) if callable(option) else None


@contextlib.contextmanager
def short_locations():
    """Lower inside this to give each operation the source location of its innermost user frame
    (file and line, what profiles and XLA's errors show) instead of JAX's default, its whole Python
    traceback, which XLA keeps through its compile. The option is set for this thread only and
    restored after; a no-op where the user turned it off or this JAX has no thread-local switch."""
    option = _full_tracebacks_option()
    if option is None or not getattr(jax.config, _FULL_TRACEBACKS, False):
        yield
        return
    with option(False):
        yield


class _ShortLocations:
    """A jitted function whose calls and `lower` run inside `short_locations` (its first call
    traces, lowers and compiles)."""

    def __init__(self, jitted):
        self._jitted = jitted
        functools.update_wrapper(self, jitted, updated=())  # its name and doc, not its fields

    def __call__(self, *args, **kwargs):
        with short_locations():
            return self._jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with short_locations():
            return self._jitted.lower(*args, **kwargs)


def loop_jit(fn, *, preset: str | None = None, release_memory: bool = True):
    """`fn` jitted as the library's large scan-fused loops (search and training chunks) are: every
    argument's buffers but the first's donated, XLA's preset `preset` (`loop_compiler_options`),
    the compiler's heap returned after each large compile (`release_compiler_memory`, unless
    `release_memory` is False), short source locations (`short_locations`), and a second trace an
    error: it would mean a recompile per chunk, minutes on CPU."""
    if release_memory:
        release_compiler_memory()
    # equinox's `filter_jit` overloads leave out the `jax.jit` keywords it passes on (`compiler_options`).
    jit = eqx.filter_jit(  # pyright: ignore[reportCallIssue]
        donate="all-except-first", compiler_options=loop_compiler_options(preset)
    )
    jitted = jit(eqx.debug.assert_max_traces(fn, max_traces=1))
    return _ShortLocations(jitted)
