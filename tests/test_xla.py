"""Compiler options of the search and training chunks."""

import threading

import jax
import jax.numpy as jnp
import pytest
from helpers import tiny_arrays

import darts_eqx as dx
from darts_eqx import _xla
from darts_eqx._xla import loop_compiler_options


def test_cpu_chunks_compile_with_the_fast_compile_preset(monkeypatch):
    monkeypatch.delenv("DARTS_EQX_XLA_PRESET", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    options = loop_compiler_options()
    if jax.default_backend() != "cpu":
        assert options is None
        return
    if not _xla._accepted("CPU_OPT_PRESET_FAST_COMPILE"):
        pytest.skip("this XLA has no xla_cpu_opt_preset option (older jaxlib)")
    assert options == {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE"}
    assert float(jax.jit(lambda x: x * 2, compiler_options=options)(1.5)) == 3.0


def test_the_preset_can_be_turned_off_and_a_users_own_is_kept(monkeypatch):
    monkeypatch.setenv("DARTS_EQX_XLA_PRESET", "default")
    assert loop_compiler_options() is None
    monkeypatch.setenv("DARTS_EQX_XLA_PRESET", "fast_compile")
    for flags in ("--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME", "--flagfile=/etc/xla.flags"):
        monkeypatch.setenv("XLA_FLAGS", flags)
        assert loop_compiler_options() is None


def test_an_xla_without_the_option_gets_none():
    # XLA rejects an unknown value (as an older XLA rejects the option): no options, not a failed compile
    assert not _xla._accepted("CPU_OPT_PRESET_NO_SUCH")
    if jax.__version_info__ >= (0, 10):  # the first jaxlib with the option
        assert _xla._accepted("CPU_OPT_PRESET_FAST_COMPILE")


def test_bad_preset_names_the_value(monkeypatch):
    monkeypatch.setenv("DARTS_EQX_XLA_PRESET", "turbo")
    message = r"DARTS_EQX_XLA_PRESET \(='turbo'\) must be one of \['default', 'fast_compile'\]"
    with pytest.raises(ValueError, match=message):
        loop_compiler_options()


def test_search_and_training_chunks_are_compiled_with_the_options(monkeypatch):
    # A value XLA rejects must reach the compile of each chunk, so the options are passed (an
    # older XLA rejects the option itself).
    bogus = {"xla_cpu_opt_preset": "CPU_OPT_PRESET_NO_SUCH"}
    rejected = "CPU_OPT_PRESET_NO_SUCH|No such compile option: 'xla_cpu_opt_preset'"
    monkeypatch.setattr(_xla, "loop_compiler_options", lambda preset=None: bogus)
    data = dx.data.from_arrays(*tiny_arrays(n=32))
    with pytest.raises(Exception, match=rejected):
        dx.search(jax.random.key(0), data, space="seed", channels=4, layers=1, epochs=1, batch_size=16, progress=False)
    genotype = dx.GENOTYPES["DARTS_V2"]
    data = tiny_arrays(n=16, size=8) + tiny_arrays(n=8, size=8)
    with pytest.raises(Exception, match=rejected):
        options = dict(channels=4, layers=3, epochs=1, batch_size=8, auxiliary=False, progress=False)
        dx.train(jax.random.key(0), genotype, data, **options)


def test_large_compiles_hand_the_compilers_heap_back(monkeypatch):
    # glibc's malloc_trim after each XLA compile longer than the threshold, not after small ones
    if not _xla.release_compiler_memory():
        pytest.skip("no malloc_trim here (not glibc)")
    calls = []
    monkeypatch.setattr(_xla, "_trim", lambda: calls.append(1))
    monkeypatch.setattr(_xla, "_LARGE_COMPILE_S", 1e9)
    jax.jit(lambda x: x * 3 + 1).lower(1.0).compile()
    assert calls == []
    monkeypatch.setattr(_xla, "_LARGE_COMPILE_S", 0.0)
    _xla.release_compiler_memory()  # again (as every chunk does): still one listener
    jax.jit(lambda x: x * 5 - 2).lower(1.0).compile()
    assert calls == [1]


def _inner(x):
    return jnp.sin(x) * 2


def _outer(x, y):
    return _inner(x) + y


def _full_tracebacks() -> bool:
    return jax.config.jax_include_full_tracebacks_in_locations


def test_loop_programs_lower_with_short_source_locations():
    # JAX's default gives every op its whole Python traceback as a chain of call sites, which XLA
    # keeps through the compile; loop programs keep the innermost frame.
    if _xla._full_tracebacks_option() is None or not _full_tracebacks():
        pytest.skip("this JAX lacks the option, or it is turned off here")
    x = jnp.ones(3)
    assert "callsite" in jax.jit(_outer).lower(x, x).as_text(debug_info=True)
    short = _xla.loop_jit(_outer).lower(x, x).lowered.as_text(debug_info=True)
    assert "callsite" not in short and "test_xla.py" in short
    assert _full_tracebacks()  # restored

    seen = []  # a call traces and lowers inside it too
    program = _xla.loop_jit(lambda x, y: (seen.append(_full_tracebacks()), x + y)[1])
    program(x, jnp.ones(3))  # its second argument is donated
    assert seen == [False] and _full_tracebacks()

    with _xla.short_locations():  # for this thread only
        assert not _full_tracebacks()
        other = []
        thread = threading.Thread(target=lambda: other.append(jax.jit(_outer).lower(x, x).as_text(debug_info=True)))
        thread.start()
        thread.join()
        assert "callsite" in other[0]
    with pytest.raises(RuntimeError, match="inside"), _xla.short_locations():
        raise RuntimeError("inside")
    assert _full_tracebacks()  # restored after an error too


def test_short_locations_keeps_a_users_choice():
    jax.config.update(_xla._FULL_TRACEBACKS, False)
    try:
        with _xla.short_locations():
            assert not _full_tracebacks()
        assert not _full_tracebacks()
    finally:
        jax.config.update(_xla._FULL_TRACEBACKS, True)


def test_a_loop_program_traced_twice_is_an_error():
    # a second trace of a chunk would be a second compile per chunk (minutes on CPU)
    program = _xla.loop_jit(_outer)
    assert float(program(jnp.ones(2), jnp.ones(2))[0]) == pytest.approx(2 * float(jnp.sin(1.0)) + 1)
    with pytest.raises(Exception, match="traced"):
        program(jnp.ones(3), jnp.ones(3))


def test_an_executions_choices_reach_the_compile_and_the_trace(monkeypatch):
    # The preset comes from the execution before the environment; the formulations hold while a
    # chunk is traced inside `Execution.tracing` and not after it.
    from darts_eqx._conv import conv_impl, uses_depthwise_kernel

    monkeypatch.setenv("DARTS_EQX_XLA_PRESET", "fast_compile")
    assert _xla.loop_compiler_options("default") is None
    with pytest.raises(ValueError, match=r"`xla_preset` \(='turbo'\) must be one of"):
        dx.Execution(xla_preset="turbo")
    x = jnp.ones((1, 4, 4, 2))
    before = uses_depthwise_kernel(x), conv_impl()
    with dx.Execution(depthwise="composed", conv="native").tracing():
        assert not uses_depthwise_kernel(x) and conv_impl() == "native"
        with dx.Execution().tracing():  # None keeps the enclosing choice
            assert conv_impl() == "native"
    assert (uses_depthwise_kernel(x), conv_impl()) == before
