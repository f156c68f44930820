"""Shared fixtures."""

import pytest

# XLA's own defaults on CPU (jaxlib 0.10: xla/debug_options_flags.cc), as compile options, which
# override XLA_FLAGS: ``make test`` compiles with cheaper settings, and the tests that compare
# against (or read) what a user's default compilation does ask for it with these.
XLA_DEFAULTS = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}


@pytest.fixture
def xla_defaults():
    return dict(XLA_DEFAULTS)
