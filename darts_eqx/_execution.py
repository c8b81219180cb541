"""How a search or a training runs, apart from what it computes: `Execution`.

Chunk length, one traced gradient per step or one per phase, the depthwise and convolution
formulations, XLA's preset, the compile cache, the devices and the allocator trim change how fast a
run goes and how much memory it holds, never what it means: they are not part of a config, nor of
what a checkpoint must match, so a run checkpointed under one execution resumes under another.
Each field left None is chosen per backend when the run starts (`Execution.resolve`).
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import jax

from . import _conv, _native, _xla
from ._checks import positive_ints


@dataclass(frozen=True)
class Execution:
    """How a run executes (see the module docstring); None picks the default.

    - `steps_per_chunk`: steps fused into one jitted `lax.scan` call (default: a whole epoch, or
      its largest divisor of at most `checkpoint_every` steps when checkpointing); an epoch is
      cut to a whole number of chunks.
    - `shared_trace`: trace the supernet's gradient once per step for all its phases (first
      order, or second order with `finite_difference`) instead of once per phase: the same search
      up to floating-point rounding, with a smaller program (faster compile, less memory) that runs
      a little slower. Default: on CPU for second order with finite differences, else off.
    - `depthwise`: `auto` (the C++ depthwise kernel on CPU when it builds, else XLA's dense
      convolution with composed kernels), `kernel` (the kernel or an error), `composed` (XLA only).
      Default: `$DARTS_EQX_DEPTHWISE`, else `auto`.
    - `conv`: the convolutions' gradient formulation, `canonical` (hand-written canonical backward
      convolutions, fast inside loops on XLA:CPU) or `native` (JAX's own rule). Default:
      `$DARTS_EQX_CONV`, else canonical on CPU and native elsewhere.
    - `xla_preset`: `fast_compile` or `default` (XLA:CPU's optimisation preset for the chunks).
      Default: `$DARTS_EQX_XLA_PRESET`, else `fast_compile`.
    - `devices`: data-parallel over this many of `jax.devices()`, or a list of devices (default:
      all of them).
    - `compile_cache`: a directory for JAX's persistent compilation cache (process-wide, as JAX's
      cache is), or None to leave JAX's own setting as it is.
    - `release_compiler_memory`: hand the heap XLA's compiler freed back to the OS after each
      large compile (glibc).
    """

    steps_per_chunk: int | None = None
    shared_trace: bool | None = None
    depthwise: str | None = None
    conv: str | None = None
    xla_preset: str | None = None
    devices: int | Sequence | None = None
    compile_cache: str | os.PathLike | None = None
    release_compiler_memory: bool = True

    def __post_init__(self):
        positive_ints(self, "steps_per_chunk", optional=True)
        if self.shared_trace is not None and not isinstance(self.shared_trace, bool):
            raise ValueError(f"`shared_trace` (={self.shared_trace!r}) must be True, False or None (automatic)")
        if self.depthwise is not None:
            _native.check_depthwise_mode(self.depthwise, "`depthwise`")
        if self.conv is not None and self.conv not in ("canonical", "native"):
            raise ValueError(f"`conv` (={self.conv!r}) must be 'canonical' or 'native'")
        if self.xla_preset is not None:
            _xla.check_preset(self.xla_preset, "`xla_preset`")

    def replace(self, **changes) -> "Execution":
        return replace(self, **changes)

    def resolve(self, config) -> "Execution":
        """This execution with `shared_trace` chosen for the search `config` (a `SearchConfig`) on
        the current backend; an explicit choice the config cannot take is an error."""
        can_share = config.order == 1 or config.estimator == "finite_difference"
        if self.shared_trace and not can_share:
            raise ValueError(
                f"`shared_trace` with order 2 needs estimator 'finite_difference', not {config.estimator!r} "
                "(the exact estimator differentiates through the virtual step)"
            )
        if self.shared_trace is not None:
            return self
        # The shared trace gates the convolutions' kernel gradients on CPU only; it has not been
        # measured on accelerators. In first order on CPU it runs slower for a smaller compile.
        shared = can_share and config.order == 2 and jax.default_backend() == "cpu"
        return self.replace(shared_trace=shared)

    def tracing(self, mesh=None):
        """The context to trace a chunk in: this execution's formulations, the batch split over
        `mesh` where given (the C++ depthwise kernel then runs on each device's part)."""
        return _conv.traced_with(self.depthwise, self.conv, mesh)

    def jit(self, fn):
        """`fn` jitted as a scan-fused chunk (`_xla.loop_jit`) with this execution's options."""
        return _xla.loop_jit(fn, preset=self.xla_preset, release_memory=self.release_compiler_memory)

    def use_compile_cache(self) -> str | None:
        """Turn on JAX's persistent compilation cache at `compile_cache` (if given); returns it."""
        if self.compile_cache is None:
            return None
        return use_compile_cache(os.fspath(self.compile_cache), "`compile_cache`")

    def chunking(self, steps_per_epoch: int, checkpoint_every: int | None) -> tuple[int, int]:
        """`(steps per chunk, chunks per epoch)`. With `steps_per_chunk` set, the epoch is cut to
        whole chunks; otherwise a chunk is the whole epoch, or, when checkpointing, its largest
        divisor of at most `checkpoint_every` steps, so that checkpoints fall on chunk ends and the
        epoch is not cut. The chunk length does not change the result: every chunk runs the same
        scan body."""
        if self.steps_per_chunk is not None:
            chunk_len = min(self.steps_per_chunk, steps_per_epoch)
        elif checkpoint_every is not None:
            limit = min(checkpoint_every, steps_per_epoch)
            chunk_len = max(d for d in range(1, limit + 1) if steps_per_epoch % d == 0)
        else:
            chunk_len = steps_per_epoch
        return chunk_len, steps_per_epoch // chunk_len


def as_execution(execution: "Execution | None") -> Execution:
    if execution is None:
        return Execution()
    if not isinstance(execution, Execution):
        raise ValueError(f"execution must be an Execution, got {type(execution).__name__}")
    return execution


def default_compile_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "darts_eqx", "xla")


def use_compile_cache(path: str | None, what: str = "--compile-cache") -> str | None:
    """Turn on JAX's persistent compilation cache at `path` ("off": turn it off; None:
    `$DARTS_EQX_COMPILE_CACHE`, else JAX's own `$JAX_COMPILATION_CACHE_DIR`, else
    `default_compile_cache()`), before anything compiles. JAX keys each entry by the program,
    compile options, backend and versions, so a hit is the same executable. Our own directories are
    bounded to 2 GiB (LRU); a directory of JAX's own settings keeps its settings. Returns the
    directory in use; errors name the setting as `what`."""
    source = what
    if path is None and os.environ.get("DARTS_EQX_COMPILE_CACHE"):
        path, source = os.environ["DARTS_EQX_COMPILE_CACHE"], "$DARTS_EQX_COMPILE_CACHE"
    if path is not None and path.strip().lower() == "off":
        jax.config.update("jax_enable_compilation_cache", False)  # also over $JAX_COMPILATION_CACHE_DIR
        return None
    # The user's own JAX setting, as it is. (`jax.config` adds its options as attributes at run time,
    # which its annotations do not declare, hence the ignores here and below.)
    if path is None and jax.config.jax_compilation_cache_dir:  # pyright: ignore[reportAttributeAccessIssue]
        return jax.config.jax_compilation_cache_dir  # pyright: ignore[reportAttributeAccessIssue]
    path = default_compile_cache() if path is None else os.path.expanduser(path)
    if not path.strip():
        raise ValueError(f"{source} needs a directory (or off), got {path!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{source} {path!r} is not a directory")
    jax.config.update("jax_compilation_cache_dir", path)
    # -1 is unbounded: bound it (LRU eviction)
    if jax.config.jax_compilation_cache_max_size == -1:  # pyright: ignore[reportAttributeAccessIssue]
        jax.config.update("jax_compilation_cache_max_size", 2 * 1024**3)
    return path
