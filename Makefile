# Two commands are all a newcomer needs: `make bench` and `make test`.
# Both set themselves up: a local .venv with the package (editable) and its extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test bench bench-full lint clean

# Bytecode for the editable package too (pip writes it for installed packages, not for an
# editable one, and PYTHONDONTWRITEBYTECODE=1 stops Python from caching it): `import vi_engine`
# compiles its sources on every start otherwise (0.035 s instead of 0.012 s, measured). Only
# changed files are recompiled; a stale .pyc is never used (Python checks the source's mtime).
install: $(STAMP)
	@$(PY) -m compileall -q vi_engine benchmarks

# ml_dtypes 0.7.0 (which jax imports) takes 0.40-0.46 s to import where 0.6.0 takes 0.003 s
# (numpy 2.3 and 2.4 alike; perf: its extension's start-up is spent in numpy's PyUFunc_AddLoop
# and tuple comparisons, registering ufunc loops). Every process pays it: each test worker,
# notebook kernel and whole-process benchmark (vi_engine and BlackJAX alike). jax needs only
# ml_dtypes >= 0.5, so this environment skips that release; the package itself does not pin it.
# Re-installs only when pyproject.toml or this file changes, so a second `make test` starts at
# once.
# The install is uv's: it fetches and unpacks the wheels in parallel and compiles their bytecode
# on every core, where pip does one at a time. A clean install without a cache (CI's case) took
# 44 s with pip (most of it compiling bytecode: 19 s without), 22 s with uv, installing uv
# itself included. uv reads PyPI, not pip's configuration. Should it fail, pip installs into a
# new venv (a failure part-way may have left packages that pip would take as installed), after
# upgrading itself (the pip of a Python 3.10.0-3.10.2 venv cannot install this project
# editable). `make install UV=false` takes that path.
EXTRAS := ".[dev,notebooks,benchmarks,vae]" "ml_dtypes!=0.7.0"
UV     ?= $(VENV)/bin/uv
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv && \
	  $(UV) pip install --python $(PY) --quiet --compile-bytecode -e $(EXTRAS) || \
	  { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV) && \
	    $(PY) -m pip install --quiet --upgrade pip && $(PY) -m pip install --quiet -e $(EXTRAS); }
	@touch $(STAMP)

# Two workers: the tests are dominated by XLA compilation, which is single-threaded. The tests
# compile hundreds of small programs and run each briefly, so they compile the way vi_engine
# compiles its run-once programs (vi_engine/_compile.py, "minimal"): LLVM's optimization level 0
# (measured: 22% less CPU time on tests/test_fit.py) and XLA's classic emitters instead of its
# MLIR fusion emitters (tests/test_kl.py, test_exact.py and test_flow.py on 2 workers: 159 s ->
# 105 s wall). Tests that compare against XLA's defaults ask for them explicitly
# (tests/conftest.py: XLA_DEFAULTS); benchmarks keep the defaults. And one LLVM module per
# program instead of parts code-generated in parallel (each part sets up its own LLVM target, and
# the two workers keep both cores busy anyway): tests/test_kl.py's closed-form, second-order and
# streaming tests, two interleaved pairs, 73-76 s -> 66-69 s wall, 76-81 s -> 71-74 s user CPU.
TEST_XLA_FLAGS ?= --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false \
                  --xla_cpu_parallel_codegen_split_count=1
# No persistent compilation cache: the tests compile thousands of small programs (4,700 in
# test_fit.py and test_kl.py), and JAX's own count of the compile time its hits saved there came
# out negative (545 hits, -4.4 s: writing each executable costs more). On other files the hits
# may pay: an interleaved A/B on test_exact, test_posteriordb, test_laplace and test_targets
# read 111-115 s with a per-worker cache, 116-121 s without. Neither is a clear gain, so none:
# the cache needed a directory per worker (JAX writes entries without a lock).
# The notebooks first: xdist hands out tests in collection order (each worker first gets an
# eighth of them, then refills), and at the end two at a time, so long tests last (the notebooks
# take 9-27 s each) could leave one worker idle while the other finishes them; at the start they
# are balanced by what follows. (test_benchmarks.py stays within one worker's first chunk: its
# module fixture runs the --tiny suite once per worker that uses it.)
test: install
	VI_ENGINE_QUICK=1 XLA_FLAGS="$(TEST_XLA_FLAGS)" \
	$(PY) -m pytest -n 2 --durations=15 --nbmake notebooks tests

bench: install
	$(PY) -m benchmarks --quick

bench-full: install
	$(PY) -m benchmarks --full

lint: install
	$(VENV)/bin/ruff check vi_engine benchmarks tests

clean:
	rm -rf $(VENV) .pytest_cache
	find vi_engine benchmarks tests -name __pycache__ -type d -prune -exec rm -rf {} +
