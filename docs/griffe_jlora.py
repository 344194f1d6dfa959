"""A Griffe extension for the API pages, so that they show what Python sees.

* jlora's docstrings head their doctests ``Example:``, which doctest and
  Napoleon read but Griffe's Google parser knows only as ``Examples:``: the
  heading is renamed when the package is loaded, so each doctest renders as
  a code block. The source is not touched.
* A package that imports a function under the name of one of its own
  submodules (``jlora.plan``, the function, from ``jlora/plan.py``) binds
  the function at run time, but Griffe keeps the submodule under that name.
  The submodule's place is given to the imported object, so that
  ``::: jlora.plan`` (and ``jlora.peft.load``, ``jlora.lora``, ...) documents
  the public function. Aliases into the submodule (``jlora.Plan``) are
  resolved before the swap and keep their targets.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Iterator

import griffe

_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


def _walk(obj: griffe.Object) -> Iterator[griffe.Object | griffe.Alias]:
  for member in list(obj.members.values()):
    yield member
    if not member.is_alias:
      yield from _walk(member)


def _bound_by_imports(module: griffe.Module) -> dict[str, str]:
  """name -> the path it is imported from, for a package's top-level
  ``from X import Y [as Z]`` statements."""
  if module.filepath is None or module.filepath.name != "__init__.py":
    return {}
  out = {}
  for node in ast.parse(module.filepath.read_text()).body:
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for name in node.names:
        out[name.asname or name.name] = f"{node.module}.{name.name}"
  return out


class JloraDocs(griffe.Extension):

  def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
    members = [pkg, *_walk(pkg)]
    for obj in members:
      if not obj.is_alias and obj.docstring is not None:
        obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
    # The imported objects that shadow a submodule at run time, found while
    # the tree still holds every submodule.
    swaps = []
    for module in members:
      if module.is_alias or not module.is_module:
        continue
      for name, path in _bound_by_imports(module).items():
        member = module.members.get(name)
        if member is None or member.is_alias or not member.is_module:
          continue
        try:
          target = loader.modules_collection.get_member(path)
          target = target.final_target if target.is_alias else target
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
          continue
        if not target.is_module:
          swaps.append((module, name, member, target))
    aliases = [m for m in members if m.is_alias]
    for alias in aliases:
      try:
        alias.resolve_target()
      except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        pass   # outside jlora (jax, numpy, ...): left to mkdocstrings
    replaced = {}
    for module, name, submodule, target in swaps:
      module.set_member(name, griffe.Alias(name, target, parent=module))
      replaced[id(submodule)] = target
    for alias in aliases:
      if alias.resolved and id(alias.target) in replaced:
        alias.target = replaced[id(alias.target)]
