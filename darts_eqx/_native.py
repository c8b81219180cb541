"""The C++ depthwise-convolution kernel for XLA:CPU (`_native/depthwise.cc`), built on first use.

XLA:CPU has no fast depthwise convolution, and a dense convolution with the composed
depthwise-times-pointwise kernel does k*k*c*c multiply-adds per pixel where k*k*c + c*c are needed.
The kernel is a few loops over contiguous rows, reached through the XLA FFI, so it runs inside
the scan-fused search like any XLA op. It is compiled once per machine and jaxlib with the
system's C++ compiler (`$CXX`, else `c++`, `g++` or `clang++`) against the FFI headers jaxlib ships,
and cached under `$XDG_CACHE_HOME` or `~/.cache`, `/darts_eqx/native`.

`DARTS_EQX_DEPTHWISE` picks the formulation on CPU: `auto` (the default: the kernel when it
builds, else the composed dense convolution, with one logged warning), `kernel` (the kernel or a
clear error) or `composed` (XLA only). Accelerators keep XLA's own grouped convolution.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax

_MODES = ("auto", "kernel", "composed")
_SOURCE = os.path.join(os.path.dirname(__file__), "_native", "depthwise.cc")
_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-w")
TARGETS = {
    "forward": ("darts_eqx_depthwise_forward", "DartsEqxDepthwiseForward"),
    "input_gradient": ("darts_eqx_depthwise_input_gradient", "DartsEqxDepthwiseInputGradient"),
    "kernel_gradient": ("darts_eqx_depthwise_kernel_gradient", "DartsEqxDepthwiseKernelGradient"),
}
_log = logging.getLogger("darts_eqx")


def depthwise_mode() -> str:
    """`DARTS_EQX_DEPTHWISE`, checked (default `auto`)."""
    mode = os.environ.get("DARTS_EQX_DEPTHWISE") or "auto"
    if mode not in _MODES:
        raise ValueError(f"DARTS_EQX_DEPTHWISE (={mode!r}) must be one of {_MODES}")
    return mode


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    # `-march=native` code runs only on CPUs with the builder's instruction sets: a home directory
    # shared across machines must not hand one machine's build to another.
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("flags", "model name", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def library_path(compiler: str) -> str:
    """Where the kernel built by `compiler` for this machine, jaxlib and source is cached."""
    import jaxlib

    digest = hashlib.sha256()
    with open(_SOURCE, "rb") as f:
        digest.update(f.read())
    for part in (jaxlib.__version__, compiler, " ".join(_FLAGS), platform.machine(), _cpu_identity()):
        digest.update(part.encode())
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "darts_eqx", "native", f"depthwise-{digest.hexdigest()[:16]}.so")


def _build(compiler: str, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Built beside its final name and renamed into place: processes building at once (test
    # workers, data-parallel hosts) each get a complete library.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    command = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), _SOURCE, "-o", partial]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


@functools.cache
def _load() -> str | None:
    """Build (once per machine) and register the kernel; None, with the reason logged, when it
    cannot be built here."""
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")
        path = library_path(compiler)
        if not os.path.exists(path):
            _build(compiler, path)
        library = ctypes.cdll.LoadLibrary(path)
        for target, symbol in TARGETS.values():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        return path
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as error:
        if depthwise_mode() == "kernel":
            raise RuntimeError(f"DARTS_EQX_DEPTHWISE=kernel, but the depthwise kernel could not be built: {error}")
        _log.warning(
            "darts_eqx: the C++ depthwise kernel could not be built (%s); using XLA's dense convolution with "
            "composed kernels instead, about half as fast on CPU. Set DARTS_EQX_DEPTHWISE=composed to skip "
            "the attempt.",
            error,
        )
        return None


def use_depthwise_kernel() -> bool:
    """Whether CPU separable convolutions are traced with the C++ depthwise kernel now."""
    if jax.default_backend() != "cpu" or depthwise_mode() == "composed":
        return False
    return _load() is not None
