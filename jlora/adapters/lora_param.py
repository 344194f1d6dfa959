"""LoraParam: the trainable factors of one adapted weight."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from jlora.adapters.adapter import Adapter, register_kind
from jlora.layout import Layout


@register_kind
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraParam(Adapter):
  """The low-rank pair that adapts one frozen weight W0.

  A pytree node whose leaves are ``a`` and ``b`` (what optax trains); the
  scale and layout are static metadata. The adapted weight is
  ``W0 + scale * B A``, with factor shapes given by ``layout``::

    a: (*stack, *in, r)      b: (*stack, r, *out)

  Attributes:
    a: the down-projection factor.
    b: the up-projection factor (zeros at initialisation).
    scale: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
    layout: which weight axes A and B cover.
    dropout: rate of the dropout on the LoRA path's input (when a dropout key
      is given to the transformed function).
    residual: None for an adapter of the original W0. For one made by an init
      that moves part of W0 into the factors (``"pissa"``, ``"olora"``...),
      that init's name: the adapter is relative to the *residual* W0 that
      ``lora_transform`` returned in ``frozen``, not to the original weights,
      and the file formats keep it from being loaded onto another base.
  """

  a: Any
  b: Any
  scale: float = dataclasses.field(metadata=dict(static=True))
  layout: Layout = dataclasses.field(metadata=dict(static=True))
  dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
  residual: str | None = dataclasses.field(default=None, metadata=dict(static=True))

  kind: ClassVar[str] = "lora"

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  def factor_shapes(self, weight_shape) -> tuple[tuple[int, ...], ...]:
    r = self.rank
    return self.layout.a_shape(weight_shape, r), self.layout.b_shape(weight_shape, r)

  def array_shapes(self) -> tuple[tuple[int, ...], ...]:
    return tuple(self.a.shape), tuple(self.b.shape)

  @classmethod
  def array_axes(cls, layout: Layout) -> dict[str, tuple[int | None, ...]]:
    return pair_axes(layout)

  def merged(self, w0: jax.Array) -> jax.Array:
    return w0 + self.delta(w0.dtype)

  def unmerged(self, w: jax.Array) -> jax.Array:
    return w - self.delta(w.dtype)

  def delta(self, dtype: Any = jnp.float32) -> jax.Array:
    """Returns ``scale * B A`` in the frozen weight's axis order."""
    return lowrank_product(self.a, self.b, self.scale, self.layout, dtype)


def weight_shape_of(a: Any, b: Any, layout: Layout) -> tuple[int, ...] | None:
  """The shape of the weight that factors ``a (*stack, *in, r)`` and ``b
  (*stack, r, *out)`` laid out by ``layout`` adapt; None when they do not fit
  together (ranks, stack axes or axis counts disagree).

  Example:
    >>> import jax.numpy as jnp
    >>> weight_shape_of(jnp.zeros((8, 2)), jnp.zeros((2, 4)), Layout((0,), (1,)))
    (8, 4)
  """
  ns, n_in, n_out = len(layout.stack_axes), len(layout.in_axes), len(layout.out_axes)
  a_shape, b_shape = tuple(a.shape), tuple(b.shape)
  if (len(a_shape) != ns + n_in + 1 or len(b_shape) != ns + 1 + n_out
      or a_shape[:ns] != b_shape[:ns] or a_shape[-1] != b_shape[ns]):
    return None
  shape = [0] * layout.ndim
  for axes, dims in ((layout.stack_axes, a_shape[:ns]), (layout.in_axes, a_shape[ns:-1]),
                     (layout.out_axes, b_shape[ns + 1:])):
    for axis, d in zip(axes, dims):
      shape[axis] = int(d)
  return tuple(shape)


def lowrank_product(a: jax.Array, b: jax.Array, scale: float, layout: Layout,
                    dtype: Any = jnp.float32) -> jax.Array:
  """``scale * B A`` laid out like the weight the layout describes."""
  ns = len(layout.stack_axes)
  stack = tuple(range(ns))
  prod = lax.dot_general(
      a.astype(dtype), b.astype(dtype),
      (((a.ndim - 1,), (ns,)), (stack, stack)),
      preferred_element_type=dtype)
  # prod axes: stack..., in..., out...; send each back to its weight axis.
  order = layout.stack_axes + layout.in_axes + layout.out_axes
  inverse = [order.index(axis) for axis in range(len(order))]
  return jnp.transpose(prod, inverse) * jnp.asarray(scale, dtype)


def pair_axes(layout: Layout) -> dict[str, tuple[int | None, ...]]:
  """The weight axes of a pair's ``a (*stack, *in, r)`` and ``b (*stack, r, *out)``.

  Example:
    >>> pair_axes(Layout((0,), (1,)))
    {'a': (0, None), 'b': (None, 1)}
  """
  stack = layout.stack_axes
  return {"a": stack + layout.in_axes + (None,), "b": stack + (None,) + layout.out_axes}
