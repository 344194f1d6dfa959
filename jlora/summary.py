"""``summary``: what an adapter costs, before it is built."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jlora._paths import flatten_with_paths
from jlora.lora_param import LoraParam
from jlora.transform import lora_transform
from jlora.layout import Layout
from jlora.spec import LoraSpec


@dataclasses.dataclass(frozen=True)
class TargetRow:
  path: str
  shape: tuple[int, ...]
  rank: int
  a_shape: tuple[int, ...]
  b_shape: tuple[int, ...]
  params: int


@dataclasses.dataclass(frozen=True)
class LoraSummary:
  """Parameter counts and bytes of a LoRA setup.

  Attributes:
    base_params: elements in the original parameters.
    lora_params: elements in all A and B factors.
    extra_params: elements of the extra trainable leaves.
    trainable_params: ``lora_params + extra_params``.
    total_params: ``base_params + lora_params`` (as PEFT counts "all params").
    trainable_bytes: bytes of the trainable part.
    frozen_bytes: bytes of the frozen part.
    rows: one row per adapted weight.
  """

  base_params: int
  lora_params: int
  extra_params: int
  trainable_bytes: int
  frozen_bytes: int
  rows: tuple[TargetRow, ...]

  @property
  def trainable_params(self) -> int:
    return self.lora_params + self.extra_params

  @property
  def total_params(self) -> int:
    return self.base_params + self.lora_params

  @property
  def trainable_percent(self) -> float:
    return 100.0 * self.trainable_params / max(self.total_params, 1)

  def __str__(self) -> str:
    width = max([len(r.path) for r in self.rows] + [6])
    lines = [f"{'target':<{width}}  {'shape':>16}  {'r':>4}  {'A':>14}  {'B':>14}  {'params':>10}"]
    for r in self.rows:
      lines.append(f"{r.path:<{width}}  {str(r.shape):>16}  {r.rank:>4}  {str(r.a_shape):>14}  "
                   f"{str(r.b_shape):>14}  {r.params:>10,}")
    lines.append(
        f"trainable params: {self.trainable_params:,} (LoRA {self.lora_params:,} + extra "
        f"{self.extra_params:,}) || all params: {self.total_params:,} || trainable%: "
        f"{self.trainable_percent:.4f}")
    lines.append(f"trainable bytes: {_human(self.trainable_bytes)} || frozen bytes: "
                 f"{_human(self.frozen_bytes)}")
    return "\n".join(lines)


def _human(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
    n /= 1024
  return f"{n} B"


def _size(leaf: Any) -> int:
  return math.prod(leaf.shape)


def _bytes(leaf: Any) -> int:
  return _size(leaf) * jnp.dtype(leaf.dtype).itemsize


def summary(params: Any, spec: LoraSpec, *, layouts: Mapping[str, Layout] | None = None
            ) -> LoraSummary:
  """Counts what ``lora_transform(params, spec)`` would produce, without
  allocating it (``params`` may be abstract, e.g. from ``jax.eval_shape``).

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> s = jlora.summary({"w": jnp.zeros((64, 64))}, jlora.LoraSpec(rank=4, targets=["w"]))
    >>> s.lora_params
    512
  """
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  frozen, trainable = lora_transform(abstract, spec, layouts=layouts)
  f_pairs, _ = flatten_with_paths(frozen)
  t_pairs, _ = flatten_with_paths(trainable, is_leaf=lambda x: isinstance(x, LoraParam))
  rows, lora_n, extra_n, t_bytes = [], 0, 0, 0
  base_n = sum(_size(leaf) for _, leaf in flatten_with_paths(abstract)[0] if leaf is not None)
  f_bytes = sum(_bytes(leaf) for _, leaf in f_pairs if leaf is not None)
  for (path, w0), (_, t) in zip(f_pairs, t_pairs):
    if isinstance(t, LoraParam):
      n = _size(t.a) + _size(t.b)
      lora_n += n
      t_bytes += _bytes(t.a) + _bytes(t.b)
      rows.append(TargetRow(path, tuple(w0.shape), t.rank, tuple(t.a.shape),
                            tuple(t.b.shape), n))
    elif t is not None:
      extra_n += _size(t)
      t_bytes += _bytes(t)
  return LoraSummary(base_n, lora_n, extra_n, t_bytes, f_bytes, tuple(rows))
