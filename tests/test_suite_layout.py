"""The suite's own layout: which test files import PyTorch, and when.

``conftest.TORCH_FILES`` sends the files that use PyTorch, PEFT, transformers
or bitsandbytes to one pytest-xdist worker, and those files import them at
first use (``tests/lazy.py``), so collecting them costs the other workers
nothing. Both hold only while every such file is listed and none imports
them while it is collected; this reads the files' syntax, nothing is run.
"""

from __future__ import annotations

import ast
import pathlib

import conftest

TESTS = pathlib.Path(__file__).resolve().parent
HEAVY = ("torch", "peft", "transformers", "bitsandbytes", "safetensors.torch")


def _imports_heavy(name: str) -> bool:
  return any(name == h or name.startswith(h + ".") for h in HEAVY)


def _heavy_imports(tree: ast.AST) -> list[tuple[int, str]]:
  """(line, module) of every import of a HEAVY module, anywhere in the file,
  ``pytest.importorskip("...")`` and ``lazy("...")`` included."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names if _imports_heavy(a.name)]
    elif isinstance(node, ast.ImportFrom) and node.module and _imports_heavy(node.module):
      found.append((node.lineno, node.module))
    elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str) and _imports_heavy(node.args[0].value)
          and getattr(node.func, "attr", getattr(node.func, "id", None))
          in ("importorskip", "lazy")):
      found.append((node.lineno, node.args[0].value))
  return found


def _run_at_import(tree: ast.Module) -> list[ast.AST]:
  """The statements a module runs when imported, with function bodies left out
  (decorators and default values are run)."""
  out = []

  def visit(node):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      out.extend(node.decorator_list + node.args.defaults
                 + [d for d in node.args.kw_defaults if d is not None])
    elif isinstance(node, ast.ClassDef):
      out.extend(node.decorator_list + node.bases)
      for stmt in node.body:
        visit(stmt)
    else:
      out.append(node)

  for stmt in tree.body:
    visit(stmt)
  return out


def _tree(path: pathlib.Path) -> ast.Module:
  return ast.parse(path.read_text(encoding="utf-8"), str(path))


def test_every_file_that_imports_pytorch_is_listed():
  unlisted = [f"{p.name}:{line} ({module})" for p in sorted(TESTS.glob("test_*.py"))
              for line, module in _heavy_imports(_tree(p)) if p.name not in conftest.TORCH_FILES]
  assert not unlisted, f"add these files to conftest.TORCH_FILES: {unlisted}"
  missing = sorted(n for n in conftest.TORCH_FILES if not (TESTS / n).is_file())
  assert not missing, f"conftest.TORCH_FILES names files that do not exist: {missing}"


def test_no_file_imports_pytorch_when_collected():
  # These need google-tunix or the gemma library, which they ask for first:
  # without them (as in CI) they skip before importing anything else.
  skipped_first = {"test_hf_tunix.py", "test_peft_tunix.py", "test_peft_gemma.py",
                   "test_nnx_tunix.py"}
  eager = []
  for path in sorted(TESTS.glob("*.py")):
    if path.name in skipped_first:
      continue
    for stmt in _run_at_import(_tree(path)):
      for line, module in _heavy_imports(stmt):
        called = [n for n in ast.walk(stmt) if isinstance(n, ast.Call)
                  and getattr(n.func, "id", None) == "lazy"]
        if not called:
          eager.append(f"{path.name}:{line} ({module})")
  assert not eager, (f"imported while pytest collects the file; use lazy() from "
                     f"tests/lazy.py: {eager}")


def test_the_guard_sees_an_eager_import():
  eager = ast.parse("import torch\nx = 1\n")
  lazy_ = ast.parse("from lazy import lazy\ntorch = lazy('torch')\n")
  in_function = ast.parse("def f():\n  import torch\n")
  assert [m for s in _run_at_import(eager) for _, m in _heavy_imports(s)] == ["torch"]
  assert [m for s in _run_at_import(in_function) for _, m in _heavy_imports(s)] == []
  assert [m for _, m in _heavy_imports(lazy_)] == ["torch"]
