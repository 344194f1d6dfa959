"""The documentation site covers the public API, and its pages are reachable.

Every name in ``jlora.__all__`` and in the ``__all__`` of each namespace
(``jlora.orbax``, ``jlora.peft``, ``jlora.base``, ``jlora.bnb``, ``jlora.hf``) has a
mkdocstrings entry (``::: jlora.peft.save``) in ``docs/api/``, so a new public
name without documentation fails here. Entries use the public paths only: a
private module path (``jlora.peft.export.save``) would break when modules
are moved. ``bash .ci/docs.sh`` builds the site itself (strictly).
"""

from __future__ import annotations

import pathlib
import re
import types

import pytest

import jlora

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API = DOCS / "api"
_ENTRY = re.compile(r"^::: ([\w.]+)\s*$", re.MULTILINE)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _namespaces() -> list[str]:
  return sorted(n for n in jlora.__all__ if isinstance(getattr(jlora, n), types.ModuleType))


def _entries() -> dict[str, str]:
  """identifier -> the API page that documents it."""
  out = {}
  for page in sorted(API.glob("*.md")):
    for name in _ENTRY.findall(page.read_text()):
      out[name] = page.name
  return out


# Namespaces outside jlora.__all__: imported on first use (jlora.nnx needs Flax).
_LAZY = ["nnx"]


def _public() -> set[str]:
  names = {f"jlora.{n}" for n in jlora.__all__}
  for ns in _namespaces() + _LAZY:
    names |= {f"jlora.{ns}"} | {f"jlora.{ns}.{n}" for n in getattr(jlora, ns).__all__}
  return names


def test_the_namespaces_are_the_file_formats():
  assert _namespaces() == ["base", "bnb", "hf", "orbax", "peft"]
  for ns in _namespaces():
    assert isinstance(getattr(jlora, ns).__all__, (list, tuple)), f"jlora.{ns} has no __all__"
    assert (API / f"{ns}.md").is_file(), f"jlora.{ns} has no page docs/api/{ns}.md"


def test_no_public_name_is_listed_twice():
  for module in [jlora, *(getattr(jlora, ns) for ns in _namespaces())]:
    dup = sorted({n for n in module.__all__ if list(module.__all__).count(n) > 1})
    assert not dup, f"{module.__name__}.__all__ lists {dup} more than once"


def test_every_top_level_name_is_documented():
  entries = _entries()
  missing = [f"jlora.{n}" for n in jlora.__all__ if f"jlora.{n}" not in entries]
  assert not missing, f"no '::: NAME' entry in docs/api/ for {missing}"


@pytest.mark.parametrize("ns", ["orbax", "peft", "base", "bnb", "hf", *_LAZY])
def test_every_namespace_name_is_documented(ns):
  entries = _entries()
  module = getattr(jlora, ns)
  missing = [f"jlora.{ns}.{n}" for n in module.__all__ if f"jlora.{ns}.{n}" not in entries]
  assert not missing, f"no '::: NAME' entry in docs/api/ for {missing}"
  assert entries.get(f"jlora.{ns}") == f"{ns}.md"


def test_entries_use_public_paths():
  private = sorted(set(_entries()) - _public())
  assert not private, f"docs/api/ documents names by a path that is not public: {private}"


def test_every_page_is_in_the_nav():
  nav = (ROOT / "mkdocs.yml").read_text()
  pages = [p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")]
  assert len(pages) >= 15
  missing = [p for p in pages if not re.search(rf":\s*{re.escape(p)}\s*$", nav, re.MULTILINE)]
  assert not missing, f"pages not in mkdocs.yml's nav: {missing}"


def test_readme_links_resolve():
  """The README's relative links work on a code host as in a checkout."""
  links = [l for l in _LINK.findall((ROOT / "README.md").read_text())
           if not re.match(r"[a-z]+:", l)]
  assert any(l.startswith("docs/") for l in links)
  broken = [l for l in links if not (ROOT / l.split("#")[0]).exists()]
  assert not broken, f"README.md links to missing files: {broken}"
