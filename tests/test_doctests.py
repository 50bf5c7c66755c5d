"""The ``>>>`` examples in kronfact's docstrings run and print what they show."""

import doctest
import importlib
import pkgutil

import pytest

import kronfact

MODULES = sorted(i.name for i in pkgutil.iter_modules(kronfact.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_hold(name):
    result = doctest.testmod(importlib.import_module(f"kronfact.{name}"), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_the_examples_exist():
    total = sum(doctest.testmod(importlib.import_module(f"kronfact.{n}")).attempted for n in MODULES)
    assert total >= 7
