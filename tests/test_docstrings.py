"""The examples in jlora's docstrings run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import jlora


def _modules():
  """Every module of jlora, subpackages (jlora.peft, jlora.orbax) included."""
  names = ["jlora"] + [m.name for m in pkgutil.walk_packages(jlora.__path__, "jlora.")]
  return sorted(names)


def test_subpackages_are_collected():
  assert {"jlora.peft.export", "jlora.orbax.manager", "jlora.base"} <= set(_modules())


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
