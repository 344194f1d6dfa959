"""Assembling the loaded factors: each weight's layout and ``a``/``b`` (and DoRA
magnitude) from its modules' tensors, one dtype for all, and the
``LoraSpec`` that describes them.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jlora.errors import LoraLayoutError, LoraPeftError, LoraSpecError
from jlora.layout import Layout
from jlora.spec import LoraSpec
from jlora.transform import resolve_layout
from jlora.peft import axes, kinds, match, names
from jlora.peft.rules import Rules


def kernel_layout(e: match.Entry, found: match.Found, rules: Rules, weights: str) -> Layout:
  """The layout of a plain 2-D kernel: as the rules' kernel_order says, checked
  against the file's shapes; with no kernel order, what the shapes tell."""
  shape = tuple(e.leaf.shape)
  key_a, lora_a, lora_b = found.key_a, found.lora_a, found.lora_b
  fan_in, fan_out = lora_a.shape[1], lora_b.shape[0]
  fits = axes.splits(shape, 0, fan_in, rules.kernel_order, fan_out)
  if len(fits) == 1:
    return fits[0]
  if len(fits) > 1:
    raise LoraLayoutError(
        f"'{e.path}' {shape}: cannot tell whether this square kernel is stored (in, out) or "
        f"(out, in): the rules do not say (kernel_order=None) and the shapes in "
        f"'{weights}' fit both; jlora does not guess; {axes.kernel_order_hint(e.path)}")
  other = axes.splits(shape, 0, fan_in, None, fan_out)
  if other:
    stored = "(out, in)" if axes.layout_order(other[0]) == "out_in" else "(in, out)"
    raise LoraPeftError(
        f"'{weights}': '{key_a}' ({lora_a.shape[0]}, {fan_in}) and its lora_B "
        f"{tuple(lora_b.shape)} fit '{e.path}' {shape} only if it is stored {stored}, but "
        f"the rules say kernel_order={rules.kernel_order!r}; "
        f"{axes.kernel_order_hint(e.path)}")
  return axes.kernel_layout(rules.kernel_order or "in_out")   # the size check below names it


def weight_factors(e: match.Entry, by_idx: Mapping[tuple[int, ...], match.Found],
                   layouts: Mapping[str, Layout] | None, rules: Rules, weights: str):
  """One weight's ``(layout, a, b, rank, alpha, magnitude)`` from its modules' tensors."""
  shape = tuple(e.leaf.shape)
  first = next(iter(by_idx.values()))
  kind = first.kind
  explicit = (layouts or {}).get(e.path)
  if kind == kinds.LINEAR:
    if explicit is None and len(shape) == 2 and e.n_stack == 0 and () in by_idx:
      layout = kernel_layout(e, by_idx[()], rules, weights)
    else:
      layout = resolve_layout(e.path, e.leaf, LoraSpec(), layouts)
  else:
    tied = bool(rules.tied_to(names.first_module(e.template)))
    layout = explicit or kinds.default_layout(kind, len(shape), e.n_stack, first.transposed, tied)
    layout.check(shape, e.path)
  n_slice_stack = len(layout.stack_axes) - e.n_stack
  if n_slice_stack != (1 if kind == kinds.PARAMETER and len(shape) - e.n_stack == 3 else 0):
    raise LoraPeftError(
        f"'{e.path}': the rules name it '{e.template}' with {e.n_stack} stack "
        f"index(es), but its layout {layout} has {len(layout.stack_axes)} stack axes")
  lay = kinds.slice_layout(layout, e.n_stack)
  kinds.check_slice(kind, e.path, lay)
  stack_shape = tuple(shape[ax] for ax in layout.stack_axes[:e.n_stack])
  want = set(np.ndindex(*stack_shape))
  beyond = sorted(set(by_idx) - want)
  if beyond:
    raise LoraPeftError(f"'{weights}': key '{by_idx[beyond[0]].key_a}' is beyond the stack "
                        f"of '{e.path}' (stack shape {stack_shape})")
  missing = sorted(want - set(by_idx))
  if missing:
    modules = [names.fill(e.template, m) for m in missing[:3]]
    raise LoraPeftError(
        f"'{weights}': missing keys '{names.lora_key(modules[0], 'A')}' / "
        f"'.lora_B.weight' ({len(missing)} module(s) of stacked '{e.path}': {modules}); "
        f"jlora never leaves a factor at its initial value")
  settings = {(f.r, f.alpha) for f in by_idx.values()}
  if len(settings) > 1:
    raise LoraPeftError(
        f"'{weights}': the modules of stacked '{e.path}' have different (rank, alpha) "
        f"{sorted(settings)}; jlora keeps one rank and scale per stacked weight")
  gone = layout.stack_axes[:e.n_stack]
  slice_shape = tuple(shape[ax] for ax in range(len(shape)) if ax not in gone)
  a_parts, b_parts, m_parts = [], [], []
  for idx in sorted(by_idx):
    f = by_idx[idx]
    want_a, want_b = kinds.torch_shapes(kind, slice_shape, lay, f.r, f.transposed)
    if tuple(f.lora_a.shape) != want_a or tuple(f.lora_b.shape) != want_b:
      raise LoraPeftError(
          f"'{weights}': '{f.key_a}' {f.lora_a.shape} and its lora_B {f.lora_b.shape} do not "
          f"fit '{e.path}' {shape} with layout {layout}: expected {want_a} and {want_b}")
    a, b = kinds.from_torch(kind, f.lora_a, f.lora_b, lay, slice_shape, f.r, f.transposed)
    a_parts.append(a)
    b_parts.append(b)
    if f.magnitude is not None:
      want_m = kinds.magnitude_shape(kind, slice_shape, lay)
      if kind == kinds.EMBEDDING and lay.out_axes != (1,):
        raise LoraPeftError(
            f"'{weights}': '{f.key_m}' is PEFT's DoRA magnitude per embedding dimension, but "
            f"the layout of '{e.path}' {layout} puts the vocabulary on the output axis")
      if tuple(f.magnitude.shape) != want_m:
        raise LoraPeftError(f"'{weights}': '{f.key_m}' has shape {f.magnitude.shape}, not "
                            f"{want_m} as '{e.path}' {shape} needs")
      m_parts.append(kinds.magnitude_from_torch(kind, f.magnitude, lay, slice_shape))
  a = np.stack(a_parts).reshape(stack_shape + a_parts[0].shape)
  b = np.stack(b_parts).reshape(stack_shape + b_parts[0].shape)
  m = np.stack(m_parts).reshape(stack_shape + m_parts[0].shape) if m_parts else None
  r, alpha = next(iter(settings))
  return layout, a, b, r, alpha, m


def factor_dtype(factors, dtype, index_of, found, weights: str) -> np.dtype:
  """One dtype for every factor: the file's, promoted so that no value changes
  (a float16 lora_A with a float32 lora_B gives float32), or ``dtype``, if no
  finite value becomes infinite in it."""
  stored = [x.dtype for _, a, b, _, _, m in factors.values() for x in (a, b, m)
            if x is not None]
  if dtype is None:
    return jnp.dtype(jnp.result_type(*stored))
  want = jnp.dtype(dtype)
  for path, i in index_of.items():
    _, a, b, _, _, m = factors[i]
    for name, x in (("lora_A", a), ("lora_B", b), ("lora_magnitude_vector", m)):
      if x is None:
        continue
      with np.errstate(over="ignore"):
        cast = np.asarray(x).astype(want)
      if np.any(np.isfinite(x) & ~np.isfinite(cast)):
        first = next(iter(found[i][1].values()))
        key = {"lora_A": first.key_a, "lora_B": first.key_b}.get(name, first.key_m)
        raise LoraPeftError(f"'{weights}': '{key}' does not fit in {want.name} (values up to "
                            f"{float(np.max(np.abs(x))):.4g} would become infinite); load it "
                            f"in a wider dtype (dtype=None keeps the file's)")
  return want


def anchored(values: Mapping[str, Any]) -> dict[str, Any]:
  """path -> value as LoraSpec patterns that match that path only: a pattern
  also matches '/'-aligned suffixes, so 'fc/kernel' alone would pick
  'block/fc/kernel' too."""
  return {"^" + re.escape(p): v for p, v in sorted(values.items())}


def spec_of(config, factors: Mapping[str, tuple], extras: Sequence[str], dtype,
             where: str) -> LoraSpec:
  """A LoraSpec naming exactly the loaded paths, with their ranks and alphas."""
  r_global, alpha_global = int(config["r"]), float(config["lora_alpha"])
  ranks = {p: f[3] for p, f in factors.items()}
  alphas = {p: float(f[4]) for p, f in factors.items()}
  layouts = {p: f[0] for p, f in factors.items()
             if f[0] != Layout.default(f[0].ndim)}
  try:
    return LoraSpec(
        rank=r_global, alpha=alpha_global,
        targets="|".join(re.escape(p) for p in sorted(factors)),
        rank_pattern=anchored({p: r for p, r in ranks.items() if r != r_global}),
        alpha_pattern=anchored(
            {p: a for p, a in alphas.items() if a != alpha_global}),
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)),
        dropout=float(config.get("lora_dropout") or 0.0), dtype=dtype,
        extra_trainable="|".join(re.escape(p) for p in extras) if extras else None,
        layouts=anchored(layouts))
  except LoraSpecError as err:
    raise LoraPeftError(f"'{where}': {err}") from None
