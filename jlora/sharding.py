"""Shardings of the LoRA factors, derived from the frozen weight's.

A follows W0's input axes and B its output axes; stack axes lead in both and
the rank axis is replicated, so a sharded base needs no extra code.
"""

from __future__ import annotations

from typing import Any

from jax.sharding import NamedSharding, PartitionSpec

from jlora.layout import Layout


def factor_shardings(sharding: Any, layout: Layout, ndim: int
                     ) -> tuple[NamedSharding | None, NamedSharding | None]:
  """``(A's, B's)`` NamedSharding for a weight of ``sharding``; None for others.

  Example:
    >>> import jax
    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> w = NamedSharding(mesh, PartitionSpec(None, "model"))
    >>> a, b = factor_shardings(w, Layout((0,), (1,)), 2)
    >>> a.spec, b.spec
    (P(None, None), P(None, 'model'))
  """
  if not isinstance(sharding, NamedSharding):
    return None, None
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  stack = tuple(spec[i] for i in layout.stack_axes)
  a_spec = stack + tuple(spec[i] for i in layout.in_axes) + (None,)
  b_spec = stack + (None,) + tuple(spec[i] for i in layout.out_axes)
  return (NamedSharding(sharding.mesh, PartitionSpec(*a_spec)),
          NamedSharding(sharding.mesh, PartitionSpec(*b_spec)))


def leaf_sharding(leaf: Any) -> Any:
  """The sharding of a concrete or abstract array; None for a tracer or a
  leaf without one."""
  try:
    return getattr(leaf, "sharding", None)
  except Exception:  # tracers under jit have no concrete sharding
    return None


def array_sharding(sharding: Any, axes: tuple[int | None, ...], ndim: int
                   ) -> NamedSharding | None:
  """The NamedSharding of an adapter array whose axes follow the weight axes
  ``axes`` (None: an axis of its own, replicated), for a weight of ``sharding``.

  Example:
    >>> import jax
    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> w = NamedSharding(mesh, PartitionSpec(None, "model"))
    >>> array_sharding(w, (None, 1), 2).spec          # a magnitude-like (r, out) array
    P(None, 'model')
  """
  if not isinstance(sharding, NamedSharding):
    return None
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  return NamedSharding(sharding.mesh,
                       PartitionSpec(*(None if ax is None else spec[ax] for ax in axes)))
