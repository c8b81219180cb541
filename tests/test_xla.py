"""Compiler options of the search and training chunks."""

import jax
import pytest

from darts_eqx._xla import loop_compiler_options


def test_cpu_chunks_compile_with_the_fast_compile_preset(monkeypatch):
    monkeypatch.delenv("DARTS_EQX_XLA_PRESET", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    options = loop_compiler_options()
    if jax.default_backend() != "cpu":
        assert options is None
        return
    assert options == {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE"}
    # XLA accepts it (an unknown value would fail to compile, see below)
    assert float(jax.jit(lambda x: x * 2, compiler_options=options)(1.5)) == 3.0


def test_the_preset_can_be_turned_off_and_a_users_own_is_kept(monkeypatch):
    monkeypatch.setenv("DARTS_EQX_XLA_PRESET", "default")
    assert loop_compiler_options() is None
    monkeypatch.setenv("DARTS_EQX_XLA_PRESET", "fast_compile")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME")
    assert loop_compiler_options() is None


def test_bad_preset_names_the_value(monkeypatch):
    monkeypatch.setenv("DARTS_EQX_XLA_PRESET", "turbo")
    message = r"DARTS_EQX_XLA_PRESET \(='turbo'\) must be one of \['default', 'fast_compile'\]"
    with pytest.raises(ValueError, match=message):
        loop_compiler_options()
