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

from jlora.interpret import axes as axes_lib
from jlora.interpret import dot as dot_lib
from jlora.interpret import factors
from jlora.interpret import values
from jlora.layout import Layout
from jlora.adapters.lora_param import LoraParam, lowrank_product


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

  def check_dot(self, ctx: Any, path: str, shape: tuple[int, ...], dot: dot_lib.Dot) -> None:
    factors.check_layout(path, shape, self.layout, dot)

  def add_flat(self, ctx: Any, y: jax.Array, x: jax.Array, plan: dot_lib.FlatPlan
               ) -> jax.Array:
    dot = plan.dot
    a, b = factors.flat_factors(self.a, self.b, self.layout, 0, plan.k_axes, plan.n_axes)
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

  def add_take(self, ctx: Any, y: jax.Array, indices: jax.Array, take: dot_lib.Take
               ) -> jax.Array | None:
    # Rows of the factor that holds the indexed axis, times the other factor:
    # the slices of s B A without forming it (PEFT's embedding LoRA).
    if self.layout.ndim != 2 or self.layout.stack_axes:
      return None
    if take.axis in self.layout.in_axes:        # A (V, r): its rows, then @ B (r, D)
      rows, other = take.rows(self.a, 0, indices), self.b
    else:                                       # B (r, V): its columns, then @ A^T
      rows, other = take.rows(self.b, 1, indices), self.a.T
    # One (M, r) @ (r, D) matmul over the flattened lookups, as for a dense
    # layer: with the lookup axes kept, the backward's dB contracts two axes
    # and XLA:CPU makes a transposed (D, M) copy of the whole cotangent for
    # it (1.2 s of a 3.2 s step on the benchmark LM).
    lead = rows.shape[:-1]
    low = dot_lib.matmul(rows.reshape(-1, rows.shape[-1]), other)
    low = low.reshape(*lead, other.shape[-1])
    low = jnp.moveaxis(low * jnp.asarray(self.scale, low.dtype), -1, take.offset_dim)
    return y + low.astype(y.dtype)

  def add_conv(self, ctx: Any, y: jax.Array, x: jax.Array, conv: dot_lib.Conv
               ) -> jax.Array | None:
    # PEFT's Conv LoRA: A as a convolution with the kernel's window into r
    # channels, then B as a 1x1 convolution (a matmul over channels).
    lay = self.layout
    out_ch, in_ch, *spatial = conv.rhs_spec
    if (conv.grouped or lay.stack_axes or lay.out_axes != (out_ch,)
        or set(lay.in_axes) != {in_ch, *spatial}):
      return None
    n_in = len(lay.in_axes)
    kernel = axes_lib.transpose(self.a, [n_in if p == out_ch else lay.in_axes.index(p)
                                         for p in range(lay.ndim)])
    z = conv.apply(ctx.lora_dropout(x, self.dropout).astype(self.a.dtype), kernel)
    low = lax.dot_general(z, self.b, (((conv.out_feature,), (0,)), ((), ())))
    low = jnp.moveaxis(low, -1, conv.out_feature) * jnp.asarray(self.scale, low.dtype)
    return y + low.astype(y.dtype)

  def add_ragged(self, ctx: Any, y: jax.Array, x: jax.Array, ragged: dot_lib.RaggedDot
                 ) -> jax.Array | None:
    # One pair per group (expert): the same ragged dot with A, then with B.
    if not ragged.standard or self.layout != Layout((1,), (2,), (0,)):
      return None
    xa = ragged.apply(ctx.lora_dropout(x, self.dropout).astype(self.a.dtype), self.a)
    low = ragged.apply(xa, self.b) * jnp.asarray(self.scale, xa.dtype)
    return y + low.astype(y.dtype)

  def merge_into(self, w: jax.Array) -> jax.Array:
    return w + lowrank_product(self.a, self.b, self.scale, self.layout, w.dtype)

  # -- view ops ----------------------------------------------------------------------

  def transpose(self, perm: Sequence[int]) -> "LoraTerm":
    return dataclasses.replace(self, layout=factors.transpose(self.layout, perm))

  def slice_axes(self, slicer: values.Slicer) -> "LoraTerm":
    a, b = factors.slice_pair(self.a, self.b, self.layout, 0, slicer)
    return dataclasses.replace(self, a=a, b=b)

  def squeeze(self, dims: Sequence[int]) -> "LoraTerm | None":
    out = factors.squeeze_pair(self.a, self.b, self.layout, 0, dims)
    return None if out is None else dataclasses.replace(self, a=out[0], b=out[1], layout=out[2])

  def reshape(self, shape: Sequence[int], groups: axes_lib.ReshapeGroups,
              old_shape: Sequence[int]) -> "LoraTerm | None":
    out = factors.reshape_pair(self.a, self.b, self.layout, 0, shape, groups)
    return None if out is None else dataclasses.replace(self, a=out[0], b=out[1], layout=out[2])

  def scan_over_axis0(self) -> "LoraTerm | None":
    layout = factors.unstack_layout(self.layout)
    return None if layout is None else dataclasses.replace(self, layout=layout)

  def shard_specs(self, spec: Any) -> "LoraTerm":
    a, b = factors.pair_specs(self.layout, 0, spec)
    return dataclasses.replace(self, a=a, b=b)

  def stacked_on_axis0(self) -> "LoraTerm":
    return dataclasses.replace(self, layout=factors.stack_layout(self.layout))


values.register_term(LoraParam, LoraTerm.of)
