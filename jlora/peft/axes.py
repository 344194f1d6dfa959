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
  the in axes come before the out axes. ``lora_A``'s width says where the in
  axes end; a shape that allows two splits is refused, naming the weight.

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
    splits = [k for k in range(1, ndim - n) if math.prod(shape[n:n + k]) == fan_ins[module]]
    if len(splits) != 1:
      raise LoraPeftError(
          f"'{path}' {shape}: cannot tell its layout from the adapter (lora_A of "
          f"'{module}' has {fan_ins[module]} inputs; {n} leading stack axes); pass its "
          f"layout (layouts={{path: jlora.Layout(...)}}, or on the command line "
          f"--layout '{re.escape(path)}=IN:OUT[:STACK]')")
    k = splits[0]
    out[path] = Layout(tuple(range(n, n + k)), tuple(range(n + k, ndim)), tuple(range(n)))
  return out
