"""Per-worker persistent compilation cache.

``make test`` gives the run one cache directory (``JAX_COMPILATION_CACHE_DIR``). JAX writes an
entry without a lock or an atomic rename, so two pytest workers sharing it could read each
other's half-written entries: JAX then warns and recompiles, and a test that turns warnings into
errors fails. Each worker therefore takes a subdirectory of its own, which its subprocesses and
notebook kernels inherit (they run while the worker waits, never beside it).
"""

import os


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
