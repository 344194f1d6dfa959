"""LoraValue: the interpreter's view of an adapted weight, ``W0 + s B A``.

A LoraValue travels through a traced program in place of the dense weight.
Cheap structural ops (casts, transposes, reshapes, slices) act on it lazily,
by moving axes between the frozen weight and the factor that owns them, so
a bf16 cast or a head reshape never forms the merged weight.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jlora.lora_param import lowrank_product
from jlora.layout import Layout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraValue:
  """A weight ``W = cast(w0 + scale * B A)`` seen through lazy view ops.

  ``w0`` holds the current view of the frozen weight (in its stored dtype);
  ``layout`` names, in that view's axis numbering, the axes A and B cover.
  """

  w0: Any
  a: Any
  b: Any
  scale: float = dataclasses.field(metadata=dict(static=True))
  layout: Layout = dataclasses.field(metadata=dict(static=True))
  dropout: float = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(metadata=dict(static=True))
  path: str = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w0.shape)

  @property
  def ndim(self) -> int:
    return self.w0.ndim

  def role(self, axis: int) -> str:
    if axis in self.layout.in_axes:
      return "in"
    if axis in self.layout.out_axes:
      return "out"
    return "stack"

  def replace(self, **kw) -> "LoraValue":
    return dataclasses.replace(self, **kw)

  def materialize(self) -> jax.Array:
    """The dense weight, accumulated in float32 and cast to the view dtype."""
    acc = jnp.promote_types(jnp.float32, self.w0.dtype)
    delta = lowrank_product(self.a, self.b, self.scale, self.layout, acc)
    return (self.w0.astype(acc) + delta).astype(self.dtype)

  # -- lazy structural ops -------------------------------------------------

  def transpose(self, perm: Sequence[int]) -> "LoraValue":
    new_pos = {old: new for new, old in enumerate(perm)}
    lay = self.layout
    return self.replace(
        w0=jnp.transpose(self.w0, perm),
        layout=Layout(tuple(new_pos[i] for i in lay.in_axes),
                      tuple(new_pos[i] for i in lay.out_axes),
                      tuple(new_pos[i] for i in lay.stack_axes)))

  def factor_axis(self, axis: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Where a weight axis lives in A and in B (empty tuple: not there)."""
    lay = self.layout
    ns = len(lay.stack_axes)
    if axis in lay.stack_axes:
      k = lay.stack_axes.index(axis)
      return (k,), (k,)
    if axis in lay.in_axes:
      return (ns + lay.in_axes.index(axis),), ()
    return (), (ns + 1 + lay.out_axes.index(axis),)

  def slice_axes(self, slicer) -> "LoraValue":
    """Applies ``slicer(array, {axis: ...})`` per axis to w0, A and B alike.

    ``slicer(x, axis_map)`` must slice array ``x`` along each of its axes
    named in ``axis_map`` (a map from x's axis to the weight axis it holds).
    """
    a_map, b_map = {}, {}
    for axis in range(self.ndim):
      in_a, in_b = self.factor_axis(axis)
      for k in in_a:
        a_map[k] = axis
      for k in in_b:
        b_map[k] = axis
    return self.replace(w0=slicer(self.w0, {i: i for i in range(self.ndim)}),
                        a=slicer(self.a, a_map), b=slicer(self.b, b_map))

  def squeeze(self, dims: Sequence[int]) -> "LoraValue | None":
    lay = self.layout
    drop = set(dims)
    for d in drop:
      group = lay.in_axes if d in lay.in_axes else lay.out_axes if d in lay.out_axes else ()
      if len(group) == 1:   # the factor would lose its only axis on that side
        return None
    a_drop = [k for d in drop for k in self.factor_axis(d)[0]]
    b_drop = [k for d in drop for k in self.factor_axis(d)[1]]
    renum = {old: old - sum(1 for d in drop if d < old) for old in range(self.ndim)}
    keep = lambda axes: tuple(renum[a] for a in axes if a not in drop)
    return self.replace(
        w0=lax.squeeze(self.w0, tuple(sorted(drop))),
        a=lax.squeeze(self.a, tuple(sorted(a_drop))),
        b=lax.squeeze(self.b, tuple(sorted(b_drop))),
        layout=Layout(keep(lay.in_axes), keep(lay.out_axes), keep(lay.stack_axes)))

  def reshape(self, new_shape: Sequence[int]) -> "LoraValue | None":
    """Reshapes lazily when every merged/split group of axes stays inside one
    factor and keeps that factor's axis order; returns None otherwise."""
    groups = _reshape_groups(self.shape, tuple(new_shape))
    if groups is None:
      return None
    lay = self.layout
    group_of = {}
    for gi, (old, _) in enumerate(groups):
      roles = {self.role(ax) for ax in old}
      if len(roles) != 1:
        return None
      for ax in old:
        group_of[ax] = gi

    def regroup(axes: tuple[int, ...]) -> tuple[int, ...] | None:
      out, k = [], 0
      while k < len(axes):
        old, new = groups[group_of[axes[k]]]
        if tuple(axes[k:k + len(old)]) != tuple(old):
          return None   # the group's axes are not consecutive in the factor
        out.extend(new)
        k += len(old)
      return tuple(out)

    new_in, new_out, new_stack = (regroup(lay.in_axes), regroup(lay.out_axes),
                                  regroup(lay.stack_axes))
    if new_in is None or new_out is None or new_stack is None or not new_in or not new_out:
      return None
    new_layout = Layout(new_in, new_out, new_stack)
    r = self.a.shape[-1]
    return self.replace(
        w0=jnp.reshape(self.w0, new_shape),
        a=jnp.reshape(self.a, new_layout.a_shape(new_shape, r)),
        b=jnp.reshape(self.b, new_layout.b_shape(new_shape, r)),
        layout=new_layout)


def _reshape_groups(old: tuple[int, ...], new: tuple[int, ...]):
  """Splits a reshape into (old axes, new axes) groups of equal size."""
  if math.prod(old) != math.prod(new) or 0 in old:
    return None
  groups, i, j = [], 0, 0
  while i < len(old) or j < len(new):
    og, ng = [], []
    po = pn = 1
    while True:
      if po == pn and og and ng:
        break
      if (po <= pn or j >= len(new)) and i < len(old):
        po *= old[i]
        og.append(i)
        i += 1
      elif j < len(new):
        pn *= new[j]
        ng.append(j)
        j += 1
      else:
        return None
    # Unit axes that follow belong to this group.
    while i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
      og.append(i)
      i += 1
    while j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
      ng.append(j)
      j += 1
    groups.append((tuple(og), tuple(ng)))
  return groups
