"""The README's Python code blocks run, and print what the README says.

Blocks run in order in one fresh interpreter (later sections continue the
Quickstart), in a temporary working directory. A block preceded by the line
``<!-- readme-test: own-process -->`` runs alone in its own interpreter (it
sets up JAX differently, e.g. simulated devices). The comment lines that
directly follow a ``print(...)`` statement are its expected output, and a
one-line ``print(...)  # text`` expects ``text``; ``...`` matches anything,
as in doctest. A block that states no output is only run.
"""

from __future__ import annotations

import ast
import doctest
import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
OWN_PROCESS = "<!-- readme-test: own-process -->"
_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_SEPARATOR = "=====readme-test-block====="


def _blocks() -> list[tuple[str, bool]]:
  text = README.read_text()
  out = []
  for m in _BLOCK.finditer(text):
    if m.group(1) != "python":
      continue
    before = text[:m.start()].rstrip().splitlines()
    own = bool(before) and before[-1].strip() == OWN_PROCESS
    out.append((m.group(2), own))
  return out


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


def _run(codes: list[str], tmp_path: pathlib.Path) -> list[str]:
  """Runs the blocks in one interpreter; returns each block's stdout."""
  program = "\n".join(f"{code}\nprint({_SEPARATOR!r})" for code in codes)
  env = dict(os.environ, PYTHONWARNINGS="ignore", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, f"README code failed:\n{done.stderr[-4000:]}"
  return done.stdout.split(_SEPARATOR + "\n")[:len(codes)]


def _check(code: str, got: str) -> None:
  want = _expected(code)
  if not want:
    return   # the block states no output
  checker = doctest.OutputChecker()
  flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  assert checker.check_output(want + "\n", got.strip() + "\n", flags), (
      f"README block printed:\n{got}\nbut the README says:\n{want}\n--- block:\n{code}")


def test_the_readme_has_code_to_run():
  blocks = _blocks()
  assert len(blocks) >= 5
  assert sum(bool(_expected(code)) for code, _ in blocks) >= 3


def test_readme_blocks_in_order(tmp_path):
  shared = [code for code, own in _blocks() if not own]
  for code, got in zip(shared, _run(shared, tmp_path)):
    _check(code, got)


@pytest.mark.parametrize("index", [i for i, (_, own) in enumerate(_blocks()) if own])
def test_readme_block_in_its_own_process(index, tmp_path):
  code = _blocks()[index][0]
  (got,) = _run([code], tmp_path)
  _check(code, got)
