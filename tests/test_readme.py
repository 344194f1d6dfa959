"""The Python code blocks of README.md and of the guides (docs/**/*.md) run,
and print what the text says.

Each Markdown file is a page. A page's blocks run in order, each page in its
own namespace, all pages in one fresh interpreter, in a temporary working
directory that they share (so pages must not write the same file names). A
page that continues another says so on a line of its own,
``<!-- readme-test: continues docs/quickstart.md -->``: it starts from the
names that page ended with, instead of an empty namespace.

A block preceded by the line ``<!-- readme-test: own-process -->`` runs alone
in its own interpreter (it sets up JAX differently, e.g. simulated devices);
``<!-- readme-test: own-process, needs equinox -->`` also skips it where the
module named cannot be found. Blocks fenced as anything but ``python``
(``bash``, plain) are not run.

The comment lines that directly follow a ``print(...)`` statement are its
expected output, and a one-line ``print(...)  # text`` expects ``text``;
``...`` matches anything, as in doctest. A block that states no output is
only run.
"""

from __future__ import annotations

import ast
import dataclasses
import doctest
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_MARK = re.compile(r"^<!-- readme-test: (.*) -->$")
_SEPARATOR = "=====readme-test-block====="
_SPEED_FLAGS = ("xla_backend_optimization_level", "xla_cpu_use_xnnpack",
                "xla_cpu_use_fusion_emitters")

# One interpreter runs every page: each page's blocks in a namespace of its
# own (a copy of the one it continues), each block compiled under the page's
# name and its own line numbers, so a traceback points into the Markdown.
_DRIVER = r"""
import json, sys, traceback
pages = json.load(open(sys.argv[1]))
spaces = {}
for page in pages:
  ns = dict(spaces[page["continues"]]) if page["continues"] else {"__name__": "__main__"}
  for line, code in page["blocks"]:
    try:
      exec(compile("\n" * (line - 1) + code, page["name"], "exec"), ns)
    except BaseException:
      traceback.print_exc()
      sys.exit(f"{page['name']}: the block at line {line} failed")
    sys.stdout.flush()
    print(sys.argv[2], flush=True)
  spaces[page["name"]] = ns
"""


@dataclasses.dataclass(frozen=True)
class Block:
  page: str         # the file, relative to the repository root
  line: int         # the line of the block's first line of code
  code: str
  own: bool         # runs in its own interpreter
  needs: tuple[str, ...] = ()   # modules it needs (own-process blocks only)

  @property
  def name(self) -> str:
    return f"{self.page}:{self.line}"


def _rel(path: pathlib.Path) -> str:
  return path.relative_to(ROOT).as_posix()


def _marker(line: str) -> str | None:
  m = _MARK.match(line.strip())
  return m.group(1).strip() if m else None


def _block_options(page: str, line: int, marker: str | None) -> tuple[bool, tuple[str, ...]]:
  if marker is None:
    return False, ()
  words = [w.strip() for w in marker.split(",")]
  if words[0] != "own-process" or any(not re.fullmatch(r"needs [\w.]+", w) for w in words[1:]):
    raise ValueError(f"{page}:{line}: unknown readme-test marker before a block: {marker!r} "
                     "(expected 'own-process' or 'own-process, needs MODULE')")
  return True, tuple(w.split()[1] for w in words[1:])


def parse(path: pathlib.Path) -> tuple[str | None, list[Block]]:
  """A page's ``continues`` target (or None) and its Python blocks."""
  text, page = path.read_text(), _rel(path)
  continues = None
  for n, line in enumerate(text.splitlines(), 1):
    marker = _marker(line)
    if marker and marker.startswith("continues "):
      continues = marker.split(None, 1)[1]
      if not (ROOT / continues).is_file():
        raise ValueError(f"{page}:{n}: continues {continues!r}, which does not exist")
  blocks = []
  for m in _BLOCK.finditer(text):
    before = text[:m.start()].rstrip().splitlines()
    line = text.count("\n", 0, m.start(2)) + 1
    marker = _marker(before[-1]) if before else None
    if marker and marker.startswith("continues "):
      marker = None
    if m.group(1) != "python":
      if marker is not None:
        raise ValueError(f"{page}:{line}: a readme-test marker before a block that is "
                         f"not run ({m.group(1) or 'plain'})")
      continue
    own, needs = _block_options(page, line, marker)
    blocks.append(Block(page, line, m.group(2), own, needs))
  return continues, blocks


def _pages() -> list[tuple[str, str | None, list[Block]]]:
  """Every page, each after the page it continues."""
  parsed = {_rel(p): parse(p) for p in PAGES}
  order: list[str] = []

  def visit(name: str, seen: tuple[str, ...] = ()) -> None:
    if name in order:
      return
    if name in seen:
      raise ValueError(f"pages continue each other in a cycle: {seen + (name,)}")
    target = parsed[name][0]
    if target is not None:
      visit(target, seen + (name,))
    order.append(name)

  for name in parsed:
    visit(name)
  return [(name, *parsed[name]) for name in order]


def _blocks() -> list[Block]:
  return [b for _, _, blocks in _pages() for b in blocks]


def _expected(code: str) -> str:
  """The expected output: a one-line ``print(...)``'s own trailing comment, or
  the comment lines right after a ``print(...)`` statement."""
  lines = code.splitlines()
  want = []
  for node in ast.walk(ast.parse(code)):
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "id", None) == "print"):
      continue
    last = lines[node.end_lineno - 1]
    trailing = last[node.end_col_offset:].strip()
    if node.lineno == node.end_lineno and trailing.startswith("#"):
      want.append((node.lineno, [trailing[1:].strip()]))
      continue
    block = []
    for line in lines[node.end_lineno:]:
      if not line.strip().startswith("#"):
        break
      block.append(line.strip()[1:].strip())
    want.append((node.lineno, block))
  return "\n".join(line for _, block in sorted(want) for line in block)


def _run(pages: list[tuple[str, str | None, list[Block]]], tmp_path: pathlib.Path) -> list[str]:
  """Runs the pages' blocks in one interpreter; returns each block's stdout."""
  program = tmp_path / "pages.json"
  program.write_text(json.dumps([
      {"name": name, "continues": continues, "blocks": [(b.line, b.code) for b in blocks]}
      for name, continues, blocks in pages]))
  env = dict(os.environ, PYTHONWARNINGS="ignore", JAX_PLATFORMS="cpu")
  # Only the suite's compile-speed flags (tests/conftest.py) pass: they change
  # how long XLA takes to compile, not what the code computes; any other flag
  # of the caller's (simulated devices) would give the pages a machine their
  # readers do not have. The example that .ci/run runs keeps XLA's defaults.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if f.split("=")[0].lstrip("-") in _SPEED_FLAGS]
  env["XLA_FLAGS"] = " ".join(flags)
  work = tmp_path / "work"
  work.mkdir()
  done = subprocess.run([sys.executable, "-c", _DRIVER, str(program), _SEPARATOR], cwd=work,
                        env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, f"documentation code failed:\n{done.stderr[-4000:]}"
  n = sum(len(blocks) for _, _, blocks in pages)
  return done.stdout.split(_SEPARATOR + "\n")[:n]


def _check(block: Block, got: str) -> None:
  want = _expected(block.code)
  if not want:
    return   # the block states no output
  checker = doctest.OutputChecker()
  flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  assert checker.check_output(want + "\n", got.strip() + "\n", flags), (
      f"{block.name} printed:\n{got}\nbut the text says:\n{want}\n--- block:\n{block.code}")


def test_the_pages_have_code_to_run():
  pages = {name: blocks for name, _, blocks in _pages()}
  assert pages["README.md"], "README.md has no Python block"
  assert len(pages) >= 10, sorted(pages)
  blocks = _blocks()
  assert len(blocks) >= 35
  assert sum(bool(_expected(b.code)) for b in blocks) >= 25


def test_markers_are_checked(tmp_path):
  page = tmp_path / "page.md"
  page.write_text("<!-- readme-test: own-proces -->\n```python\nx = 1\n```\n")
  with pytest.raises(ValueError, match="unknown readme-test marker"):
    _block_options("page.md", 2, _marker(page.read_text().splitlines()[0]))
  assert _block_options("p.md", 1, "own-process, needs equinox") == (True, ("equinox",))


def test_blocks_in_order(tmp_path):
  pages = [(name, continues, [b for b in blocks if not b.own])
           for name, continues, blocks in _pages()]
  shared = [b for _, _, blocks in pages for b in blocks]
  for block, got in zip(shared, _run(pages, tmp_path), strict=True):
    _check(block, got)


@pytest.mark.parametrize("block", [b for b in _blocks() if b.own], ids=lambda b: b.name)
def test_block_in_its_own_process(block, tmp_path):
  for module in block.needs:
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"{block.name} needs {module}, which is not installed")
  (got,) = _run([(block.page, None, [block])], tmp_path)
  _check(block, got)
