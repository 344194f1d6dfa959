"""Modules imported at their first use: PyTorch, PEFT, transformers and
bitsandbytes for the tests that compare with them.

Importing those takes about 8 s of CPU. Every pytest-xdist worker collects
every test file, so a file that imported them at its top made each of the
three workers pay that, although only one of them runs such a file
(``conftest.py`` sends them all to one worker). A file names them at its top
with ``lazy("torch")`` instead: the module is imported when a test first
reads one of its attributes, and where it cannot be imported that test is
skipped, as ``pytest.importorskip`` at the top skipped the whole file.

Example::

    torch = lazy("torch")

    def test_something():
      x = torch.zeros(3)      # imports torch here, or skips this test
"""

from __future__ import annotations

import types

import pytest


class LazyModule(types.ModuleType):
  """Stands for the module ``name`` until an attribute is read."""

  def __init__(self, name: str, minversion: str | None = None):
    super().__init__(name)
    self.__dict__["_lazy_minversion"] = minversion
    self.__dict__["_lazy_module"] = None

  def __getattr__(self, attr: str):
    # Tools that inspect every module global look for private names
    # (pytest's collection asks each for `_mock_name` and `__wrapped__`):
    # those must not import the module, so a private name is only read
    # from a module already imported.
    module = self.__dict__["_lazy_module"]
    if module is None:
      if attr.startswith("_"):
        raise AttributeError(attr)
      module = pytest.importorskip(self.__name__, minversion=self.__dict__["_lazy_minversion"])
      self.__dict__["_lazy_module"] = module
    return getattr(module, attr)


def lazy(name: str, minversion: str | None = None) -> types.ModuleType:
  """``name`` (a dotted module path), imported when first used."""
  return LazyModule(name, minversion)


def skip_without(module: types.ModuleType, attr: str, reason: str) -> None:
  """Skips the calling test where ``module`` (importing it if needed) lacks ``attr``."""
  if not hasattr(module, attr):
    pytest.skip(reason)
