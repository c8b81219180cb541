"""The C++ depthwise-convolution kernel for XLA:CPU (`_native/depthwise.cc`), built on first use.

XLA:CPU has no fast depthwise convolution, and a dense convolution with the composed
depthwise-times-pointwise kernel does k*k*c*c multiply-adds per pixel where k*k*c + c*c are needed.
The kernel is a few loops over contiguous rows, reached through the XLA FFI, so it runs inside
the scan-fused search like any XLA op. It is compiled once per machine and jaxlib with the
system's C++ compiler (`$CXX`, else `c++`, `g++` or `clang++`) against the FFI headers jaxlib ships
(a few seconds), and cached under `$XDG_CACHE_HOME` or `~/.cache`, `/darts_eqx/native` (or a
per-user folder in the temporary directory when that cannot be written). It needs a jax with
`jax.ffi` and FFI thread pools (every version darts_eqx supports has them).

The build is portable: it targets the compiler's default instruction set, not the building CPU's,
so a library cached in a home directory shared between machines runs on all of them, and the
kernel's rounding is the same on every CPU of an architecture (no fused multiply-adds that only
some CPUs have). `DARTS_EQX_CXXFLAGS` adds compiler flags, e.g. `-march=native` for the building
CPU's vector instructions; a build with added flags is cached per CPU model and instruction set.

`DARTS_EQX_DEPTHWISE` picks the formulation on CPU: `auto` (the default: the kernel when it
builds, else the composed dense convolution, after a one-line logged warning), `kernel` (the
kernel or a clear error) or `composed` (XLA only). Accelerators use XLA's own convolutions.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from typing import cast

import jax

_MODES = ("auto", "kernel", "composed")
_SOURCE = os.path.join(os.path.dirname(__file__), "_native", "depthwise.cc")
_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-w")
TARGETS = {
    "forward": ("darts_eqx_depthwise_forward", "DartsEqxDepthwiseForward"),
    "input_gradient": ("darts_eqx_depthwise_input_gradient", "DartsEqxDepthwiseInputGradient"),
    "kernel_gradient": ("darts_eqx_depthwise_kernel_gradient", "DartsEqxDepthwiseKernelGradient"),
}
_log = logging.getLogger("darts_eqx")


def check_depthwise_mode(mode: str, what: str = "depthwise formulation") -> str:
    if mode not in _MODES:
        raise ValueError(f"{what} (={mode!r}) must be one of {_MODES}")
    return mode


def depthwise_mode() -> str:
    """`DARTS_EQX_DEPTHWISE`, checked (default `auto`)."""
    return check_depthwise_mode(os.environ.get("DARTS_EQX_DEPTHWISE") or "auto", "DARTS_EQX_DEPTHWISE")


def _compiler() -> list[str] | None:
    """The C++ compiler command: `$CXX` (which may carry arguments, e.g. `ccache g++`), else the
    first of c++, g++, clang++ on the PATH."""
    if os.environ.get("CXX"):
        command = shlex.split(os.environ["CXX"])
        return command if command and shutil.which(command[0]) else None
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return [cast(str, shutil.which(name))]  # found on the PATH just above
    return None


def extra_flags() -> list[str]:
    """`DARTS_EQX_CXXFLAGS`, split as a shell would (e.g. `-march=native`); added after the
    portable flags."""
    return shlex.split(os.environ.get("DARTS_EQX_CXXFLAGS") or "")


def _cpu_identity() -> str:
    # Code built with added flags such as `-march=native` may run only on CPUs with the builder's
    # instruction sets: a home directory shared across machines must not hand it to another.
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("flags", "model name", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _library_name(compiler: list[str], flags: list[str]) -> str:
    """The file name of the kernel built by `compiler` with `flags` for this source, jaxlib,
    compiler version and architecture (and CPU, when flags were added)."""
    import jaxlib

    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    digest = hashlib.sha256()
    with open(_SOURCE, "rb") as f:
        digest.update(f.read())
    parts = (
        # jaxlib re-exports it by a plain `from .version import __version__`, which pyright takes as private
        jaxlib.__version__,  # pyright: ignore[reportPrivateImportUsage]
        " ".join(compiler),
        version,
        " ".join(flags),
        platform.machine(),
        _cpu_identity() if flags != list(_FLAGS) else "",
    )
    for part in parts:
        digest.update(part.encode())
    return f"depthwise-{digest.hexdigest()[:16]}.so"


def cache_dirs() -> list[str]:
    """Where built kernels are kept: `$XDG_CACHE_HOME` or `~/.cache`, `/darts_eqx/native`, and
    a per-user folder in the temporary directory for when that one cannot be written."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return [os.path.join(base, "darts_eqx", "native"), os.path.join(tempfile.gettempdir(), f"darts_eqx-native-{user}")]


def _build(compiler: list[str], path: str, flags: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Built beside its final name and renamed into place: processes building at once (test
    # workers, data-parallel hosts) each get a complete library.
    fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=os.path.dirname(path))
    os.close(fd)
    command = [*compiler, *flags, "-I", jax.ffi.include_dir(), _SOURCE, "-o", partial]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            # The compiler and its error, not the whole command line: the warning is one line.
            error = f":\n{done.stderr[-2000:]}" if done.stderr.strip() else ""
            raise RuntimeError(f"the compiler `{' '.join(compiler)}` failed (exit {done.returncode}){error}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _register(path: str) -> None:
    library = ctypes.cdll.LoadLibrary(path)
    for target, symbol in TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")


def _build_and_register() -> str:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"no C++ compiler found ($CXX={os.environ.get('CXX')!r}, c++, g++, clang++)")
    flags = [*_FLAGS, *extra_flags()]
    name, errors = _library_name(compiler, flags), []
    for directory in cache_dirs():
        path = os.path.join(directory, name)
        try:
            if os.path.exists(path):
                try:
                    _register(path)
                    return path
                except OSError:  # a damaged or foreign file under our name: build it again
                    os.remove(path)
            _build(compiler, path, flags)
            _register(path)
            return path
        except OSError as error:  # this folder cannot be written: try the next one
            errors.append(f"{directory}: {error}")
    raise RuntimeError("no folder to build the kernel in: " + "; ".join(errors))


@functools.cache
def _load() -> tuple[str | None, str | None]:
    """(path, None) once the kernel is built (once per machine) and registered, else (None, why)."""
    try:
        return _build_and_register(), None
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as error:
        # AttributeError: a jax without `jax.ffi` or a library without the handlers
        return None, str(error)


_warned = []


def _one_line(text: str, limit: int = 500) -> str:
    """`text` (a compiler's error output, say) on one line, its end kept when it is long."""
    text = " ".join(text.split())
    return text if len(text) <= limit else "..." + text[-limit:]


def require_depthwise_kernel() -> str:
    """The built kernel's path, or a RuntimeError saying why it could not be built."""
    path, error = _load()
    if path is None:
        raise RuntimeError(
            f"the C++ depthwise kernel could not be built (DARTS_EQX_DEPTHWISE=composed uses XLA's "
            f"convolutions instead): {error}"
        )
    return path


def use_depthwise_kernel(mode: str | None = None) -> bool:
    """Whether CPU separable convolutions are traced with the C++ depthwise kernel under `mode`
    (`auto`, `kernel`, `composed`; None: `depthwise_mode()`)."""
    mode = mode or depthwise_mode()
    if jax.default_backend() != "cpu" or mode == "composed":
        return False
    if mode == "kernel":
        require_depthwise_kernel()
        return True
    path, error = _load()
    if path is None:
        if not _warned:
            _warned.append(True)
            _log.warning(
                "darts_eqx: the C++ depthwise kernel could not be built (%s); using XLA's dense convolution with "
                "composed kernels instead, about half as fast on CPU. Set DARTS_EQX_DEPTHWISE=composed to skip "
                "the attempt.",
                _one_line(str(error)),
            )
        return False
    return True
