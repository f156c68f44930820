"""Per-worker persistent compilation cache.

``make test`` gives the run one cache directory (``JAX_COMPILATION_CACHE_DIR``). JAX writes an
entry without a lock or an atomic rename, so two pytest workers sharing it could read each
other's half-written entries: JAX then warns and recompiles, and a test that turns warnings into
errors fails. Each worker therefore takes a subdirectory of its own, which its subprocesses and
notebook kernels inherit (they run while the worker waits, never beside it).
"""

import os

import pytest


def pytest_configure(config):
    base, worker = os.environ.get("JAX_COMPILATION_CACHE_DIR"), os.environ.get(
        "PYTEST_XDIST_WORKER")
    if not (base and worker):
        return
    path = os.path.join(base, worker)
    os.makedirs(path, exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    import sys

    if "jax" in sys.modules:  # read at the first compilation, so not too late here
        sys.modules["jax"].config.update("jax_compilation_cache_dir", path)


# XLA's own defaults on CPU (jaxlib 0.10: xla/debug_options_flags.cc), as compile options, which
# override XLA_FLAGS: ``make test`` compiles with cheaper settings, and the tests that compare
# against (or read) what a user's default compilation does ask for it with these.
XLA_DEFAULTS = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}


@pytest.fixture
def xla_defaults():
    return dict(XLA_DEFAULTS)
