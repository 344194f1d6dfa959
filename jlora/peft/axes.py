"""Factor axes between PyTorch and jlora, and layouts read from a file's shapes.

PyTorch's ``nn.Linear`` computes ``x @ W.T`` with ``W (out, in)``; PEFT's
factors follow it: ``lora_A (r, in)``, ``lora_B (out, r)``. jlora's factors
follow the weight's layout: ``a (*in, r)``, ``b (r, *out)``, with the in and
out axes of a multi-axis kernel kept apart. A multi-axis kernel is flattened
to PyTorch's 2-D shape in the weight's own axis order, as a reshape would.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from jlora.errors import LoraPeftError
from jlora.layout import Layout
from jlora.peft import names


def _argsort(axes: Sequence[int]) -> list[int]:
  return sorted(range(len(axes)), key=lambda i: axes[i])


def factors_to_torch(a: np.ndarray, b: np.ndarray, layout: Layout
                     ) -> tuple[np.ndarray, np.ndarray]:
  """One slice's ``a (*in, r)``, ``b (r, *out)`` -> ``lora_A (r, in)``, ``lora_B (out, r)``.

  The in (out) axes are flattened in the weight's own axis order, as a
  reshape of the weight to 2-D would.
  """
  r = a.shape[-1]
  ni = len(layout.in_axes)
  a = np.transpose(a, _argsort(layout.in_axes) + [ni]).reshape(-1, r)
  b = np.transpose(b, [0] + [1 + i for i in _argsort(layout.out_axes)]).reshape(r, -1)
  return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)


def factors_from_torch(lora_a: np.ndarray, lora_b: np.ndarray, layout: Layout,
                       shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Inverse of ``factors_to_torch`` for a weight (slice) of ``shape``."""
  r = lora_a.shape[0]
  in_sorted = sorted(layout.in_axes)
  out_sorted = sorted(layout.out_axes)
  a = lora_a.T.reshape([shape[i] for i in in_sorted] + [r])
  a = np.transpose(a, [in_sorted.index(ax) for ax in layout.in_axes] + [len(in_sorted)])
  b = lora_b.T.reshape([r] + [shape[i] for i in out_sorted])
  b = np.transpose(b, [0] + [1 + out_sorted.index(ax) for ax in layout.out_axes])
  return a, b


def kernel_layout(order: str) -> Layout:
  """The layout of a 2-D kernel stored ``"in_out"`` or ``"out_in"``.

  Example:
    >>> kernel_layout("out_in")
    Layout(in_axes=(1,), out_axes=(0,), stack_axes=())
  """
  return Layout((0,), (1,)) if order == "in_out" else Layout((1,), (0,))


def layout_order(layout: Layout) -> str | None:
  """"in_out" or "out_in" for a 2-D layout (one axis each, no stack); else None."""
  if layout.stack_axes or len(layout.in_axes) != 1 or len(layout.out_axes) != 1:
    return None
  return "in_out" if layout.in_axes[0] < layout.out_axes[0] else "out_in"


def splits(shape: Sequence[int], n_stack: int, fan_in: int, order: str | None,
           fan_out: int | None = None) -> list[Layout]:
  """The layouts of a weight of ``shape`` (``n_stack`` leading stack axes) whose
  in axes hold ``fan_in`` elements: in axes before out axes for "in_out"
  (Flax's ``DenseGeneral``), after them for "out_in", either for None.

  Example:
    >>> splits((16, 16), 0, 16, None)      # a square kernel: two readings
    [Layout(in_axes=(0,), out_axes=(1,), stack_axes=()), Layout(in_axes=(1,), out_axes=(0,), stack_axes=())]
    >>> splits((4, 8, 2, 4), 1, 8, "in_out")
    [Layout(in_axes=(1,), out_axes=(2, 3), stack_axes=(0,))]
  """
  ndim = len(shape)
  stack = tuple(range(n_stack))
  rest = list(range(n_stack, ndim))
  out: list[Layout] = []
  for k in range(1, len(rest)):
    first, second = tuple(rest[:k]), tuple(rest[k:])
    for o, (ins, outs) in (("in_out", (first, second)), ("out_in", (second, first))):
      if order not in (None, o):
        continue
      if math.prod(shape[i] for i in ins) != fan_in:
        continue
      if fan_out is not None and math.prod(shape[i] for i in outs) != fan_out:
        continue
      layout = Layout(ins, outs, stack)
      if layout not in out:
        out.append(layout)
  return out


def kernel_order_hint(path: str) -> str:
  """How to say which way a kernel is stored, for error messages."""
  return (f"pass its layout: layouts=jlora.infer_layouts(fn, params, *args) (read from the "
          f"model) or {{'{path}': jlora.Layout(...)}}, or the rules' kernel_order "
          f"('in_out' as Flax's Dense, 'out_in' as PyTorch, Equinox and transformers' Flax "
          f"GPT-2 store them); on the command line --layout '{re.escape(path)}=IN:OUT' or "
          f"--kernel-order")


def lora_a_widths(weights: str | os.PathLike) -> dict[str, int]:
  """module -> the width (fan-in) of its lora_A, read from the file's header."""
  from safetensors import safe_open
  out: dict[str, int] = {}
  with safe_open(os.fspath(weights), "numpy") as f:
    for key in f.keys():
      parsed = names.parse_lora_key(key)
      if parsed and parsed[1] == "A" and key.startswith(names.KEY_PREFIX):
        shape = f.get_slice(key).get_shape()
        if len(shape) == 2:
          out[parsed[0]] = int(shape[1])
  return out


def layouts_from_shapes(folder: str | os.PathLike, params: Any, rules: Any,
                        layouts: Mapping[str, Layout] | None = None) -> dict[str, Layout]:
  """Layouts of the stacked and multi-axis weights a PEFT folder adapts,
  read from the tensors' shapes.

  PyTorch flattens a multi-axis kernel to ``(out, in)``; the stack axes (one
  per stack field of the module name) lead, as ``nn.scan`` puts them, and
  the in axes come before the out axes (after them with the rules'
  ``kernel_order="out_in"``; either with None). ``lora_A``'s width says where
  the in axes end; a shape that allows two readings is refused, naming the
  weight.

  Args:
    folder: the PEFT adapter folder.
    params: the base parameters (a tree, or a mapping path -> array).
    rules: a ``jlora.peft.Rules``.
    layouts: regex -> Layout for weights whose layout is known (matched in
      full against the path); they are returned as given.

  Returns:
    path -> Layout for the weights whose layout the shapes determine (2-D
    kernels of one slice are left to the loader).

  Raises:
    LoraPeftError: a weight's shape splits into inputs and outputs two ways.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"mix": {"kernel": jnp.ones((4, 3, 5))}}
    >>> spec = jlora.LoraSpec(rank=2, targets=["mix/kernel"],
    ...                       layouts={"mix/kernel": jlora.Layout((0, 1), (2,))})
    >>> _, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
    >>> folder = tempfile.mkdtemp()
    >>> _ = jlora.peft.save(folder, trainable, jlora.peft.Rules())
    >>> layouts_from_shapes(folder, params, jlora.peft.Rules())
    {'mix/kernel': Layout(in_axes=(0, 1), out_axes=(2,), stack_axes=())}
  """
  from jlora._paths import flatten_with_paths
  weights = os.path.join(os.fspath(folder), names.WEIGHTS_NAME)
  try:
    fan_ins = lora_a_widths(weights)
  except Exception:  # the loader reports an unreadable file with its own message
    return {}
  overrides = [(re.compile(k), v) for k, v in (layouts or {}).items()]
  out: dict[str, Layout] = {}
  for path, leaf in flatten_with_paths(params)[0]:
    if leaf is None:
      continue
    chosen = next((layout for regex, layout in overrides if regex.fullmatch(path)), None)
    if chosen is not None:
      out[path] = chosen
      continue
    if path.rpartition("/")[2] not in rules.kernel_leaves:
      continue
    template = rules(path)
    if not template:
      continue
    n = names.n_stack(template)
    ndim = len(leaf.shape)
    module = names.first_module(template)
    if module not in fan_ins or ndim - n < 2 or (n == 0 and ndim == 2):
      continue
    shape = tuple(leaf.shape)
    found = splits(shape, n, fan_ins[module], rules.kernel_order)
    if len(found) != 1:
      raise LoraPeftError(
          f"'{path}' {shape}: cannot tell its layout from the adapter (lora_A of "
          f"'{module}' has {fan_ins[module]} inputs; {n} leading stack axes; "
          f"{'two readings fit' if found else 'no reading fits'} with kernel_order="
          f"{rules.kernel_order!r}); {kernel_order_hint(path)}")
    out[path] = found[0]
  return out
