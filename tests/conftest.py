"""Shared fixtures."""

import importlib

import pytest

_compile = importlib.import_module("vi_engine._compile")
_fit = importlib.import_module("vi_engine.fit")

# XLA's own defaults on CPU (jaxlib 0.10: xla/debug_options_flags.cc), as compile options, which
# override XLA_FLAGS: ``make test`` compiles with cheaper settings, and the tests that compare
# against (or read) what a user's default compilation does ask for it with these. (Its one LLVM
# module per program stays: that splits code generation only, not the HLO or the numbers.)
XLA_DEFAULTS = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compile_effort: vi_engine compiles with the efforts it chooses itself "
        "(the other tests compile all its programs with the least effort)")


@pytest.fixture
def xla_defaults():
    return dict(XLA_DEFAULTS)


def _least_effort(lowered, tiers, jaxpr=None):
    return "minimal"


@pytest.fixture(autouse=True)
def _compile_effort(request, monkeypatch):
    """vi_engine's programs at the least compile effort (LLVM -O0, as ``make test``'s XLA_FLAGS
    give every other program): the tests run short fits, so compiling is most of their time,
    and a fit window's LLVM -O1 (``_compile.WINDOW``) cost test_fit.py 10-20% more. The efforts
    agree to float rounding (test_cheaper_compilation_computes_the_same_window). Tests marked
    ``compile_effort`` get vi_engine's own choice, with a cache of executables of their own
    (it is keyed by signature, not effort)."""
    if request.node.get_closest_marker("compile_effort") is not None:
        monkeypatch.setattr(_fit, "_EXECUTABLES", {})
    else:
        monkeypatch.setattr(_compile, "choose", _least_effort)
