"""LoraTerm: the low-rank pair ``s B A`` as an adapter term.

The term follows view ops of the weight by moving axes between its two
factors: an axis of W is an input axis (it lives in A), an output axis (in
B) or a stack axis (leading in both; one pair per slice). A bf16 cast, a
head reshape, a transpose or taking one layer out of a scanned stack never
forms the merged weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jlora.errors import LoraLayoutError
from jlora.interpret import axes as axes_lib
from jlora.interpret import dot as dot_lib
from jlora.interpret import values
from jlora.layout import Layout
from jlora.lora_param import LoraParam, lowrank_product


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraTerm(values.AdapterTerm):
  """``scale * B A``, with factor shapes given by ``layout``::

    a: (*stack, *in, r)      b: (*stack, r, *out)

  ``layout`` numbers the axes of the current view of the weight.
  """

  a: Any
  b: Any
  scale: float = dataclasses.field(metadata=dict(static=True))
  layout: Layout = dataclasses.field(metadata=dict(static=True))
  dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

  @classmethod
  def of(cls, param: LoraParam) -> "LoraTerm":
    return cls(param.a, param.b, param.scale, param.layout, param.dropout)

  # -- the dot -------------------------------------------------------------------

  def check_dot(self, path: str, shape: tuple[int, ...], dot: dot_lib.Dot) -> None:
    lay = self.layout
    if (set(dot.w_contract) != set(lay.in_axes) or set(dot.w_batch) != set(lay.stack_axes)
        or set(dot.w_free) != set(lay.out_axes)):
      raise LoraLayoutError(
          f"'{path}': the model contracts this weight (shape {shape}) over axes "
          f"{dot.w_contract} with batch axes {dot.w_batch}, but its LoRA factors were "
          f"laid out for input axes {lay.in_axes}, output axes {lay.out_axes} and stack "
          f"axes {lay.stack_axes}. Build the adapter with "
          f"layouts=jlora.infer_layouts(fn, params, ...) or give "
          f"LoraSpec(layouts={{...}}) for this path.")

  def add_flat(self, ctx: Any, y: jax.Array, x: jax.Array, plan: dot_lib.FlatPlan
               ) -> jax.Array:
    lay, dot = self.layout, plan.dot
    r = self.a.shape[-1]
    a = axes_lib.transpose(self.a, [lay.in_axes.index(ax) for ax in plan.k_axes]
                           + [len(lay.in_axes)])
    a = axes_lib.reshape(a, (x.shape[1], r))
    b = axes_lib.transpose(self.b, [0] + [1 + lay.out_axes.index(ax) for ax in plan.n_axes])
    b = axes_lib.reshape(b, (r, y.shape[1]))
    pet = dot.low_rank_type(a.dtype)
    x = ctx.lora_dropout(x, self.dropout)
    xa = dot_lib.matmul(x.astype(a.dtype), a, dot.precision, pet)
    low = dot_lib.matmul(xa, b, dot.precision, pet) * jnp.asarray(self.scale, xa.dtype)
    return y + low.astype(y.dtype)

  def add_labelled(self, ctx: Any, y: jax.Array, x: jax.Array,
                   plan: dot_lib.LabelledPlan) -> jax.Array:
    lay, dot, w_labels = self.layout, plan.dot, plan.w_labels
    a_labels = [w_labels[i] for i in lay.stack_axes + lay.in_axes] + ["r"]
    b_labels = ([w_labels[i] for i in lay.stack_axes] + ["r"]
                + [w_labels[i] for i in lay.out_axes])
    pet = dot.low_rank_type(self.a.dtype)
    x = ctx.lora_dropout(x, self.dropout)
    xa, xa_labels = dot_lib.contract(x.astype(self.a.dtype), plan.x_labels, self.a, a_labels,
                                     set(plan.out_labels) | set(b_labels), dot.precision, pet)
    low, low_labels = dot_lib.contract(xa, xa_labels, self.b, b_labels, set(plan.out_labels),
                                       dot.precision, pet)
    low = axes_lib.transpose(low, [low_labels.index(l) for l in plan.out_labels])
    low = low * jnp.asarray(self.scale, low.dtype)
    return y + low.astype(y.dtype)

  def merge_into(self, w: jax.Array) -> jax.Array:
    return w + lowrank_product(self.a, self.b, self.scale, self.layout, w.dtype)

  # -- view ops ----------------------------------------------------------------------

  def _role(self, axis: int) -> str:
    if axis in self.layout.in_axes:
      return "in"
    if axis in self.layout.out_axes:
      return "out"
    return "stack"

  def _factor_axes(self, axis: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Where a weight axis lives in A and in B (empty: not there)."""
    lay = self.layout
    ns = len(lay.stack_axes)
    if axis in lay.stack_axes:
      k = lay.stack_axes.index(axis)
      return (k,), (k,)
    if axis in lay.in_axes:
      return (ns + lay.in_axes.index(axis),), ()
    return (), (ns + 1 + lay.out_axes.index(axis),)

  def transpose(self, perm: Sequence[int]) -> "LoraTerm":
    new_pos = {old: new for new, old in enumerate(perm)}
    lay = self.layout
    return dataclasses.replace(self, layout=Layout(
        tuple(new_pos[i] for i in lay.in_axes), tuple(new_pos[i] for i in lay.out_axes),
        tuple(new_pos[i] for i in lay.stack_axes)))

  def slice_axes(self, slicer: values.Slicer) -> "LoraTerm":
    a_map, b_map = {}, {}
    for axis in range(self.layout.ndim):
      in_a, in_b = self._factor_axes(axis)
      for k in in_a:
        a_map[k] = axis
      for k in in_b:
        b_map[k] = axis
    return dataclasses.replace(self, a=slicer(self.a, a_map), b=slicer(self.b, b_map))

  def squeeze(self, dims: Sequence[int]) -> "LoraTerm | None":
    lay = self.layout
    drop = set(dims)
    for d in drop:
      side = lay.in_axes if d in lay.in_axes else lay.out_axes if d in lay.out_axes else ()
      if len(side) == 1:   # the factor would lose its only axis on that side
        return None
    a_drop = sorted(k for d in drop for k in self._factor_axes(d)[0])
    b_drop = sorted(k for d in drop for k in self._factor_axes(d)[1])
    renum = {old: old - sum(1 for d in drop if d < old) for old in range(lay.ndim)}
    keep = lambda axes: tuple(renum[a] for a in axes if a not in drop)  # noqa: E731
    return dataclasses.replace(
        self, a=lax.squeeze(self.a, tuple(a_drop)), b=lax.squeeze(self.b, tuple(b_drop)),
        layout=Layout(keep(lay.in_axes), keep(lay.out_axes), keep(lay.stack_axes)))

  def reshape(self, shape: Sequence[int], groups: axes_lib.ReshapeGroups,
              old_shape: Sequence[int]) -> "LoraTerm | None":
    """Lazy when every merged or split group of axes stays inside one factor
    and keeps that factor's axis order; None otherwise."""
    group_of = {}
    for gi, (old, _) in enumerate(groups):
      if len({self._role(ax) for ax in old}) != 1:
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

    lay = self.layout
    new_in, new_out, new_stack = (regroup(lay.in_axes), regroup(lay.out_axes),
                                  regroup(lay.stack_axes))
    if new_in is None or new_out is None or new_stack is None or not new_in or not new_out:
      return None
    layout = Layout(new_in, new_out, new_stack)
    r = self.a.shape[-1]
    return dataclasses.replace(
        self, a=axes_lib.reshape(self.a, layout.a_shape(shape, r)),
        b=axes_lib.reshape(self.b, layout.b_shape(shape, r)), layout=layout)

  def scan_over_axis0(self) -> "LoraTerm | None":
    lay = self.layout
    if not lay.stack_axes or lay.stack_axes[0] != 0:
      return None
    dec = lambda axes: tuple(a - 1 for a in axes)  # noqa: E731
    return dataclasses.replace(self, layout=Layout(dec(lay.in_axes), dec(lay.out_axes),
                                                   dec(lay.stack_axes[1:])))

  def stacked_on_axis0(self) -> "LoraTerm":
    lay = self.layout
    inc = lambda axes: tuple(a + 1 for a in axes)  # noqa: E731
    return dataclasses.replace(self, layout=Layout(inc(lay.in_axes), inc(lay.out_axes),
                                                   (0,) + inc(lay.stack_axes)))


values.register_term(LoraParam, LoraTerm.of)
