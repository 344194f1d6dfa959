"""jlora.__version__ has one source (jlora/_version.py) that the package
metadata, the changelog and the command line agree with."""

import ast
import json
import pathlib
import re
import tomllib
from importlib import metadata

import pytest

import jlora

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_pyproject_reads_the_version_from_jlora_version():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
  attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
  module, _, name = attr.rpartition(".")
  # What setuptools does first: read the assignment without importing jlora.
  tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
  values = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == [name]]
  assert values == [jlora.__version__]


def test_the_version_is_a_release_in_the_changelog():
  assert re.fullmatch(r"\d+\.\d+\.\d+", jlora.__version__)
  changelog = (ROOT / "CHANGELOG.md").read_text()
  releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", changelog, flags=re.M)
  assert releases and releases[0] == jlora.__version__


def _installed_here():
  """Whether the installed distribution 'jlora' is the jlora imported here:
  a wheel whose files hold this jlora/__init__.py, or an editable install of
  this source tree. None when no 'jlora' distribution is installed."""
  try:
    dist = metadata.distribution("jlora")
  except metadata.PackageNotFoundError:
    return None
  here = pathlib.Path(jlora.__file__).resolve()
  for f in dist.files or ():
    if str(f).replace("\\", "/") == "jlora/__init__.py":
      return pathlib.Path(dist.locate_file(f)).resolve() == here
  direct = json.loads(dist.read_text("direct_url.json") or "{}")
  if direct.get("dir_info", {}).get("editable") and direct["url"].startswith("file://"):
    return pathlib.Path(direct["url"][len("file://"):]).resolve() == here.parent.parent
  return False


def test_installed_metadata_has_the_same_version():
  here = _installed_here()
  if not here:
    pytest.skip("no jlora distribution installed" if here is None else
                f"the installed jlora {metadata.version('jlora')} is another tree than "
                f"{jlora.__file__} (.ci/package.sh checks built wheels and sdists)")
  # An editable install's metadata is a snapshot from when it was installed:
  # after a version change, reinstall it (.ci/run does at every run).
  assert metadata.version("jlora") == jlora.__version__, (
      f"installed metadata says {metadata.version('jlora')}, jlora/_version.py "
      f"{jlora.__version__}; reinstall jlora")
