"""The ``>>>`` examples in kronfact's docstrings run and print what they show."""

import doctest
import importlib
import pkgutil

import pytest

import kronfact

MODULES = sorted(m.name.removeprefix("kronfact.") for m in pkgutil.walk_packages(kronfact.__path__, "kronfact.")
                 if not m.name.endswith("__main__"))  # running it is the command


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_hold(name):
    result = doctest.testmod(importlib.import_module(f"kronfact.{name}"), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_the_examples_exist():
    total = sum(doctest.testmod(importlib.import_module(f"kronfact.{n}")).attempted for n in MODULES)
    assert total >= 7
