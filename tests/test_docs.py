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
