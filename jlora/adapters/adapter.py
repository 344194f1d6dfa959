"""Adapter: the trainable leaves that adapt one frozen weight.

``LoraParam`` (one low-rank pair), ``DoraParam`` (a pair and a magnitude) and
``LoraBank`` (several adapters stacked) derive from ``Adapter``. Tree
functions treat an adapter as one leaf (``is_leaf=is_adapter``), so
``frozen`` and ``trainable`` pair up path by path whatever kind of adapter a
weight has.

Every adapter class is a frozen dataclass registered as a pytree node: its
non-static fields are its arrays, its static fields (scale, layout, ...)
plain metadata. Each names its ``kind`` (what files record) and says which
axes of the frozen weight each of its arrays follows (``array_axes``), so
file formats store, restore and shard any kind without knowing it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

from jlora.layout import Layout

# kind name -> adapter class, filled by ``register_kind``.
_KINDS: dict[str, type] = {}


class Adapter:
  """Base class of trainable adapter leaves.

  Subclasses are pytree nodes (their arrays are the leaves) with a static
  ``layout`` saying which axes of the frozen weight their factors cover.
  """

  layout: Layout
  # The name files record for this kind of adapter ("lora", "dora", "bank").
  kind: ClassVar[str] = ""

  def factor_shapes(self, weight_shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The shapes the adapter's arrays must have for a weight of this shape."""
    raise NotImplementedError

  def array_shapes(self) -> tuple[tuple[int, ...], ...]:
    """The shapes its arrays have."""
    raise NotImplementedError

  @classmethod
  def array_axes(cls, layout: Layout) -> dict[str, tuple[int | None, ...]]:
    """For each array field, the weight axis each of its axes follows (None
    for an axis of its own: the rank, a bank's adapter axis). A sharded W0
    shards each array along the axes they share."""
    raise NotImplementedError

  def merged(self, w0: Any) -> Any:
    """The adapted weight from ``w0`` (float32 or wider), in W0's axis order."""
    raise NotImplementedError

  def unmerged(self, w: Any) -> Any:
    """``w0`` back from a merged weight; raises where it cannot be recovered."""
    raise NotImplementedError


def is_adapter(x: Any) -> bool:
  """Whether ``x`` is an adapter leaf (``LoraParam``, ``DoraParam``, ``LoraBank``)."""
  return isinstance(x, Adapter)


def register_kind(cls: type) -> type:
  """Class decorator: makes an adapter class known to the file formats by its
  ``kind``."""
  if not cls.kind or cls.kind in _KINDS and _KINDS[cls.kind] is not cls:
    raise ValueError(f"adapter kind {cls.kind!r} of {cls.__name__} is empty or taken")
  _KINDS[cls.kind] = cls
  return cls


def kind_class(kind: str) -> type | None:
  """The adapter class of a kind name; None for a kind this jlora does not know.

  Example:
    >>> import jlora
    >>> kind_class("dora") is jlora.DoraParam, kind_class("vera")
    (True, None)
  """
  return _KINDS.get(kind)


def known_kinds() -> tuple[str, ...]:
  return tuple(sorted(_KINDS))


def array_fields(cls: type) -> list[str]:
  """The names of an adapter class's arrays (its non-static fields)."""
  return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("static")]


def static_fields(cls: type) -> list[str]:
  """The names of an adapter class's static metadata fields."""
  return [f.name for f in dataclasses.fields(cls) if f.metadata.get("static")]
