"""Every docstring example in the library runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import vi_engine

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(vi_engine.__path__, prefix="vi_engine.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_readme_examples_run():
    # The README's Python blocks, in order and in one namespace (each builds on the previous),
    # as a reader would paste them; the values they claim in comments are checked here too.
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 3
    ns: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), ns)
    res, problem = ns["res"], ns["problem"]
    assert res.posterior.batch_shape == (4,)  # the fit_many block, the last
    assert set(ns["draws"]) >= {"rate"} and ns["draws"]["rate"].shape == (1000,)
    assert bool((ns["draws"]["rate"] > 0).all())
    quick = ns["vi"].fit(problem.target, "fullrank", key=ns["jax"].random.key(1), progress=False)
    assert abs(float(quick.elbo.mean) - float(problem.log_evidence)) < 0.05
    assert float(ns["vi"].kl_divergence(quick.posterior, problem.posterior)) < 1e-3
