"""The weights a PEFT folder trains in full (``modules_to_save``), as plain
trainable leaves: kernels turned from PyTorch's orientation to Flax's, the
modules of a stacked weight stacked, every parameter of a saved module
required.
"""

from __future__ import annotations

import collections
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora.errors import LoraLayoutError, LoraPeftError
from jlora.layout import Layout
from jlora.peft import axes, match, names
from jlora.peft import config as peft_config
from jlora.peft.rules import Rules


def kernel(e: match.Entry, key: str, value: np.ndarray, rules: Rules,
           layouts: Mapping[str, Layout] | None, module: str, weights: str) -> np.ndarray:
  """A kernel trained in full, from PyTorch's orientation to the Flax one."""
  torch_order = "in_out" if rules.is_in_out(module) else "out_in"
  explicit = (layouts or {}).get(e.path)
  flax_order = axes.layout_order(explicit) if explicit is not None else rules.kernel_order
  if flax_order is None:
    want = tuple(e.leaf.shape[e.n_stack:]) if e.leaf is not None else None
    fits = [o for o, v in ((torch_order, value), ("flipped", value.T)) if v.shape == want]
    if len(fits) != 1:
      raise LoraLayoutError(
          f"'{e.path}': cannot tell how the kernel '{key}' {tuple(value.shape)} of "
          f"'{weights}' (trained in full) maps onto it: the rules do not say whether Flax "
          f"stores it (in, out) or (out, in) (kernel_order=None) and its shape does not "
          f"tell; {axes.kernel_order_hint(e.path)}")
    return value if fits[0] == torch_order else value.T
  return value if flax_order == torch_order else value.T


def leaves(full, index: match.Index, found, config, rules: Rules,
           weights: str, layouts: Mapping[str, Layout] | None = None
           ) -> dict[int, jax.Array]:
  """modules_to_save tensors -> plain trainable leaves, by leaf index."""
  parts: dict[int, dict[tuple[int, ...], tuple[str, np.ndarray]]] = collections.defaultdict(dict)
  entries = {e.index: e for e in index.entries}
  for (module, param), (key, value) in full.items():
    hits = [(e, i) for e, i in index.find(module) if e.torch_name == param]
    if not hits:
      raise LoraPeftError(
          f"'{weights}': key '{key}' (modules_to_save) matches no parameter under these "
          f"rules (nearest module names: {index.near(module)})")
    if len(hits) > 1:
      raise LoraPeftError(f"'{weights}': key '{key}' maps to several parameters: "
                          f"{[e.path for e, _ in hits]}")
    e, idx = hits[0]
    if e.index in found:
      raise LoraPeftError(f"'{weights}': key '{key}' trains '{e.path}' in full, which the "
                          f"file also adapts with LoRA")
    if e.is_kernel:
      if value.ndim != 2:
        raise LoraPeftError(f"'{weights}': key '{key}' has shape {value.shape}, not 2-D")
      value = kernel(e, key, value, rules, layouts, module, weights)
    parts[e.index][idx] = (key, value)
  # A saved module comes whole: each of its parameters must be in the file.
  saved_templates = {entries[i].template for i in parts}
  for e in index.entries:
    if e.leaf is None or e.index in parts or e.index in found:
      continue
    module = names.first_module(e.template)
    if e.template in saved_templates or peft_config.is_saved_module(config, module):
      raise LoraPeftError(
          f"'{weights}': no '{names.full_key(module, e.torch_name)}' for '{e.path}', although "
          f"modules_to_save {config.get('modules_to_save')!r} selects module '{module}'")
  out: dict[int, jax.Array] = {}
  for i, by_idx in parts.items():
    e = entries[i]
    first_key, first = by_idx[min(by_idx)]
    if e.n_stack:
      if e.leaf is not None:
        lead = tuple(e.leaf.shape[:e.n_stack])
      else:
        lead = tuple(max(k[j] for k in by_idx) + 1 for j in range(e.n_stack))
      bad = sorted(set(np.ndindex(*lead)) ^ set(by_idx))
      if bad:
        raise LoraPeftError(f"'{weights}': modules_to_save tensors of stacked '{e.path}' "
                            f"do not cover its stack {lead} (index {bad[0]})")
      value = np.stack([by_idx[k][1] for k in sorted(by_idx)]).reshape(lead + first.shape)
    else:
      value = first
    if e.leaf is not None and tuple(value.shape) != tuple(e.leaf.shape):
      raise LoraPeftError(f"'{weights}': key '{first_key}' gives '{e.path}' shape "
                          f"{value.shape}, but the parameter is {tuple(e.leaf.shape)}")
    out[i] = jnp.asarray(value, dtype=e.leaf.dtype if e.leaf is not None else None)
  return out
