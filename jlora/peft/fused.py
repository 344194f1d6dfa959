"""Fused kernels: one Flax kernel that is several PyTorch modules.

Gemma's ``kv_einsum`` ``(2, K, D, H)`` holds the weights of Hugging Face's
``k_proj`` and ``v_proj``, stacked along its first output axis. A rule names
such a kernel with a last segment that joins the modules with ``+``
(``model.layers.0.self_attn.k_proj+v_proj``, ``names.fused_parts``).

jlora adapts the kernel with one pair: ``a (D, r)`` shared by the modules
and ``b (r, 2, K, H)``. PyTorch flattens the output axes in the kernel's own
order, so the first output axis leads and ``lora_B`` splits into equal row
blocks, one per module; each module gets the same ``lora_A``: the function
is the same, module by module.

Read back, a folder must adapt every module of the kernel (PEFT trains them
apart, jlora holds them as one weight). Factors that jlora wrote (one
``lora_A`` for all, one scale) join into one pair of rank ``r``; factors
trained in PyTorch (a ``lora_A`` each) into one pair of rank ``r_k + r_v``:
``A`` the modules' ``lora_A`` stacked, ``B`` block-diagonal, each block
rescaled to the first module's scale, which is the same function.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from jlora.errors import LoraPeftError
from jlora.layout import Layout
from jlora.peft import config as peft_config
from jlora.peft import kinds, match, names


def split(path: str, module: str, kind: str, dora: bool, lay: Layout,
          b_shape: tuple[int, ...], lora_b: np.ndarray) -> list[tuple[str, np.ndarray]]:
  """``(module, lora_B)`` per PyTorch module of one weight slice: the module
  itself, or each module of a fused kernel with its block of rows."""
  parts = names.fused_parts(module)
  if len(parts) == 1:
    return [(module, lora_b)]
  if kind != kinds.LINEAR or dora:
    what = "a DoRA adapter" if dora else f"a {kind} weight"
    raise LoraPeftError(f"'{path}': the rules name it '{module}', a fused kernel of "
                        f"{len(parts)} PyTorch modules, which jlora writes for a LoRA of a "
                        f"linear kernel only, not {what}")
  first = min(lay.out_axes)
  size = b_shape[1 + lay.out_axes.index(first)]
  if size != len(parts):
    raise LoraPeftError(f"'{path}': the rules name it '{module}', {len(parts)} PyTorch "
                        f"modules stacked along its first output axis ({first}), but that "
                        f"axis has {size} entries (layout {lay})")
  return list(zip(parts, (np.ascontiguousarray(x) for x in np.split(lora_b, len(parts)))))


def _fused_names(index: match.Index) -> dict[str, set[str]]:
  """Last name of a module -> last names of the fused kernels it is part of."""
  out: dict[str, set[str]] = {}
  for e in index.entries:
    last = e.template.rpartition(".")[2]
    if e.is_kernel and "+" in last:
      for part in last.split("+"):
        out.setdefault(part, set()).add(last)
  return out


def join(lora: dict[str, Any], index: match.Index, config: dict[str, Any], weights: str
         ) -> tuple[dict[str, Any], dict[str, Any]]:
  """The file's modules with those of each fused kernel joined into one
  module under the kernel's name, and the config with that module's rank and
  alpha (anchored ``rank_pattern``/``alpha_pattern`` keys put first)."""
  fused = _fused_names(index)
  if not fused:
    return lora, config
  groups: dict[str, dict[str, Any]] = {}
  for name in lora:
    prefix, dot, last = name.rpartition(".")
    for kernel in sorted(fused.get(last, ())):
      candidate = f"{prefix}{dot}{kernel}"
      if index.find(candidate):
        groups.setdefault(candidate, {})[name] = lora[name]
        break
  if not groups:
    return lora, config
  out = dict(lora)
  ranks: dict[str, int] = {}
  alphas: dict[str, Any] = {}
  rslora = bool(config.get("use_rslora"))
  for kernel, got in groups.items():
    parts = names.fused_parts(kernel)
    path = index.find(kernel)[0][0].path
    missing = [p for p in parts if p not in got]
    if missing:
      raise LoraPeftError(
          f"'{weights}': module '{next(iter(got))}' is adapted but '{missing[0]}' is not; "
          f"'{path}' holds {list(parts)} as one kernel with one adapter: adapt all of them "
          f"(target_modules {[p.rpartition('.')[2] for p in parts]}) or none")
    pairs, scales = [], []
    for part in parts:
      fields = got[part]
      if "m" in fields or "embA" in fields or "embB" in fields:
        raise LoraPeftError(f"'{weights}': module '{part}' is part of the fused kernel "
                            f"'{path}', which jlora reads as a plain LoRA only (no DoRA "
                            f"magnitude, no embedding factors)")
      (key_a, a), (key_b, b) = match.halves(fields, part, False, weights)
      match.check_pair(kinds.LINEAR, key_a, a, key_b, b, weights)
      if peft_config.targets(config, part) is False:
        raise LoraPeftError(
            f"'{weights}': key '{key_a}' is for module '{part}', which target_modules "
            f"{config.get('target_modules')!r} does not select; PEFT would ignore it")
      r = int(a.shape[0])
      want_r = peft_config.pattern_value(config.get("rank_pattern"), part, config["r"])
      if r != want_r:
        raise LoraPeftError(f"'{weights}': '{key_a}' has rank {r} but adapter_config.json "
                            f"gives module '{part}' rank {want_r}")
      alpha = peft_config.pattern_value(config.get("alpha_pattern"), part, config["lora_alpha"])
      pairs.append(((key_a, a), (key_b, b)))
      scales.append(float(alpha) / (math.sqrt(r) if rslora else r))
    widths = {a.shape[1] for (_, a), _ in pairs}
    heights = {b.shape[0] for _, (_, b) in pairs}
    if len(widths) > 1 or len(heights) > 1:
      shapes = [(a.shape, b.shape) for (_, a), (_, b) in pairs]
      raise LoraPeftError(f"'{weights}': the modules {list(parts)} of the fused kernel "
                          f"'{path}' have lora_A/lora_B of shapes {shapes}; each module's "
                          f"must have as many inputs and outputs as the others'")
    (key_a, a0), (key_b, _) = pairs[0]
    shared = all(a.shape == a0.shape and np.array_equal(a, a0) for (_, a), _ in pairs) and all(
        s == scales[0] for s in scales)
    if shared:
      a = a0
      b = np.concatenate([b for _, (_, b) in pairs], axis=0)
    else:   # one pair of rank sum(r): A stacked, B block-diagonal
      a = np.concatenate([a for (_, a), _ in pairs], axis=0)
      # Blocks rescaled to the first scale: in float32 at least, not rounded twice.
      rescaled = [np.float32] if len(set(scales)) > 1 else []
      dtype = np.result_type(*rescaled, *[b.dtype for _, (_, b) in pairs])
      b = np.zeros((sum(x.shape[0] for _, (_, x) in pairs), a.shape[0]), dtype)
      row = col = 0
      for ((_, ai), (_, bi)), s in zip(pairs, scales):
        b[row:row + bi.shape[0], col:col + ai.shape[0]] = bi * (s / scales[0])
        row, col = row + bi.shape[0], col + ai.shape[0]
    for part in parts:
      del out[part]
    out[kernel] = {"A": (key_a, a), "B": (key_b, b)}
    rank = int(a.shape[0])
    key = "^" + re.escape(kernel)
    ranks[key] = rank
    alphas[key] = scales[0] * (math.sqrt(rank) if rslora else rank)
  config = dict(config)
  config["rank_pattern"] = {**ranks, **(config.get("rank_pattern") or {})}
  config["alpha_pattern"] = {**alphas, **(config.get("alpha_pattern") or {})}
  return out, config
