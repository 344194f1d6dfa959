"""DoRA: weight-decomposed low-rank adaptation.

``W' = m * (W0 + s B A) / ||W0 + s B A||``: the direction of the weight is
adapted by a LoRA pair and its magnitude by a trained vector ``m``, one entry
per output column (the norm runs over the input axes). ``m`` starts at the
column norms of W0, so the adapted model starts equal to the base. As in
PEFT, the norm is treated as a constant in the backward pass.

The transformed forward never forms ``W0 + s B A``: a column's squared norm
is ``||W0||^2 + 2 s <W0, B A> + s^2 ||B A||^2``, and the last two terms come
from ``W0^T A`` (fan_out x r) and ``A^T A`` (r x r).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp

from jlora.adapters.adapter import Adapter, register_kind
from jlora.errors import LoraTreeError
from jlora.layout import Layout
from jlora.adapters.lora_param import lowrank_product, pair_axes


@register_kind
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DoraParam(Adapter):
  """A LoRA pair and a magnitude vector that adapt one frozen weight.

  A pytree node whose leaves are ``a``, ``b`` and ``magnitude``::

    a: (*stack, *in, r)      b: (*stack, r, *out)      magnitude: (*stack, *out)

  Attributes:
    a, b: the low-rank pair, as in ``LoraParam``.
    magnitude: each output column's norm in the adapted weight.
    scale: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
    layout: which weight axes the factors cover.
    dropout: the LoRA dropout rate.
    residual: as for ``LoraParam``: the base-changing init that made it, if any.
  """

  a: Any
  b: Any
  magnitude: Any
  scale: float = dataclasses.field(metadata=dict(static=True))
  layout: Layout = dataclasses.field(metadata=dict(static=True))
  dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
  residual: str | None = dataclasses.field(default=None, metadata=dict(static=True))

  kind: ClassVar[str] = "dora"

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  def factor_shapes(self, weight_shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    r, lay = self.rank, self.layout
    return (lay.a_shape(weight_shape, r), lay.b_shape(weight_shape, r),
            tuple(weight_shape[i] for i in lay.stack_axes + lay.out_axes))

  def array_shapes(self) -> tuple[tuple[int, ...], ...]:
    return tuple(self.a.shape), tuple(self.b.shape), tuple(self.magnitude.shape)

  @classmethod
  def array_axes(cls, layout: Layout) -> dict[str, tuple[int | None, ...]]:
    # The magnitude follows W0's stack and output axes.
    return {**pair_axes(layout), "magnitude": layout.stack_axes + layout.out_axes}

  def merged(self, w0: jax.Array) -> jax.Array:
    v = w0 + lowrank_product(self.a, self.b, self.scale, self.layout, w0.dtype)
    norm = column_norm(v, self.layout, keepdims=True)
    return v * (to_weight_axes(self.magnitude, self.layout).astype(v.dtype) / norm)

  def unmerged(self, w: jax.Array) -> jax.Array:
    raise LoraTreeError(
        "a DoRA merge cannot be undone from the merged weight alone (it divides by the norm "
        "of W0 + s B A, which the merged weight no longer holds); keep the frozen tree")


def column_norm(w: jax.Array, layout: Layout, keepdims: bool = False) -> jax.Array:
  """The norm of each output column of a weight: over its input axes.

  Example:
    >>> import jax.numpy as jnp
    >>> column_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]]), Layout((0,), (1,))).tolist()
    [5.0, 1.0]
  """
  norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=layout.in_axes, keepdims=True))
  if keepdims:
    return norm
  # (*stack, *out) in the layout's order, as DoraParam.magnitude holds it.
  kept = [i for i in range(w.ndim) if i not in layout.in_axes]
  norm = jnp.squeeze(norm, layout.in_axes)
  order = [kept.index(i) for i in layout.stack_axes + layout.out_axes]
  return jnp.transpose(norm, order)


def to_weight_axes(magnitude: jax.Array, layout: Layout) -> jax.Array:
  """A magnitude ``(*stack, *out)`` broadcastable against the weight (size 1
  on its input axes)."""
  axes = layout.stack_axes + layout.out_axes
  m = jnp.transpose(magnitude, [axes.index(i) for i in sorted(axes)])
  return jnp.expand_dims(m, layout.in_axes)
