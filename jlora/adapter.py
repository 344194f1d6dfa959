"""Adapter: the trainable leaves that adapt one frozen weight.

``LoraParam`` (one low-rank pair) and ``LoraBank`` (several adapters
stacked) derive from ``Adapter``. Tree functions treat an adapter as one
leaf (``is_leaf=is_adapter``), so ``frozen`` and ``trainable`` pair up
path by path whatever kind of adapter a weight has.
"""

from __future__ import annotations

from typing import Any, Sequence

from jlora.layout import Layout


class Adapter:
  """Base class of trainable adapter leaves.

  Subclasses are pytree nodes (their arrays are the leaves) with a static
  ``layout`` saying which axes of the frozen weight their factors cover.
  """

  layout: Layout

  def factor_shapes(self, weight_shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The shapes the adapter's arrays must have for a weight of this shape."""
    raise NotImplementedError

  def array_shapes(self) -> tuple[tuple[int, ...], ...]:
    """The shapes its arrays have."""
    raise NotImplementedError

  def merged(self, w0: Any) -> Any:
    """The adapted weight from ``w0`` (float32 or wider), in W0's axis order."""
    raise NotImplementedError

  def unmerged(self, w: Any) -> Any:
    """``w0`` back from a merged weight; raises where it cannot be recovered."""
    raise NotImplementedError


def is_adapter(x: Any) -> bool:
  """Whether ``x`` is an adapter leaf (``LoraParam``, ``LoraBank``)."""
  return isinstance(x, Adapter)
