"""The examples in jlora's docstrings run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import jlora


def _modules():
  names = ["jlora"] + [f"jlora.{m.name}" for m in pkgutil.iter_modules(jlora.__path__)]
  return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
