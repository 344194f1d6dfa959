"""DoraTerm: DoRA as an adapter term (see ``jlora.adapters.dora``).

It scales every output column of ``x (W0 + s B A)`` by ``m / ||W0 + s B A||``.
The column norms come from W0's, ``W0^T A`` and ``A^T A``, never from the
merged weight, and are held constant in the backward pass, as PEFT does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from jlora.adapters.dora import DoraParam
from jlora.errors import LoraLayoutError
from jlora.interpret import axes as axes_lib
from jlora.interpret import dot as dot_lib
from jlora.interpret import factors, values
from jlora.layout import Layout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DoraTerm(values.AdapterTerm):
  """``m * (W + s B A) / ||W + s B A||`` for the weight ``W`` so far::

    a: (*stack, *in, r)      b: (*stack, r, *out)      m: (*stack, *out)
  """

  a: Any
  b: Any
  m: Any
  scale: float = dataclasses.field(metadata=dict(static=True))
  layout: Layout = dataclasses.field(metadata=dict(static=True))
  dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

  @classmethod
  def of(cls, param: DoraParam) -> "DoraTerm":
    return cls(param.a, param.b, param.magnitude, param.scale, param.layout, param.dropout)

  def check_dot(self, ctx: Any, path: str, shape: tuple[int, ...], dot: dot_lib.Dot) -> None:
    factors.check_layout(path, shape, self.layout, dot)
    if dot.w_batch:
      raise LoraLayoutError(
          f"'{path}': DoRA on a weight the model contracts with batch axes {dot.w_batch} "
          f"(a per-expert einsum) is not supported; a layer taken out of a stack (nn.scan, "
          f"w[i]) is")

  def add_flat(self, ctx: Any, y: jax.Array, x: jax.Array, plan: dot_lib.FlatPlan
               ) -> jax.Array:
    dot = plan.dot
    a, b = factors.flat_factors(self.a, self.b, self.layout, 0, plan.k_axes, plan.n_axes)
    m = axes_lib.transpose(self.m, [self.layout.out_axes.index(i) for i in plan.n_axes])
    m = m.reshape(-1)
    pet = dot.low_rank_type(a.dtype)
    xd = ctx.lora_dropout(x, self.dropout)
    xa = dot_lib.matmul(xd.astype(a.dtype), a, dot.precision, pet)
    low = dot_lib.matmul(xa, b, dot.precision, pet) * jnp.asarray(self.scale, xa.dtype)
    norm = _column_norm(plan.w0, a, b, self.scale)
    factor = m.astype(norm.dtype) / norm
    return ((y.astype(factor.dtype) + low.astype(factor.dtype)) * factor).astype(y.dtype)

  def add_labelled(self, ctx: Any, y: jax.Array, x: jax.Array,
                   plan: dot_lib.LabelledPlan) -> jax.Array:
    raise AssertionError("check_dot refuses DoRA on weights with batch axes")

  def merge_into(self, w: jax.Array) -> jax.Array:
    return DoraParam(self.a, self.b, self.m, self.scale, self.layout).merged(w)

  # -- view ops: the pair's, and the magnitude's (stack and output axes) ---------------

  def _m_map(self) -> dict[int, int]:
    return {k: axis for k, axis in enumerate(self.layout.stack_axes + self.layout.out_axes)}

  def transpose(self, perm: Sequence[int]) -> "DoraTerm":
    return dataclasses.replace(self, layout=factors.transpose(self.layout, perm))

  def slice_axes(self, slicer: values.Slicer) -> "DoraTerm":
    a, b = factors.slice_pair(self.a, self.b, self.layout, 0, slicer)
    return dataclasses.replace(self, a=a, b=b, m=slicer(self.m, self._m_map()))

  def squeeze(self, dims: Sequence[int]) -> "DoraTerm | None":
    out = factors.squeeze_pair(self.a, self.b, self.layout, 0, dims)
    if out is None:
      return None
    m_drop = tuple(k for k, axis in self._m_map().items() if axis in set(dims))
    return dataclasses.replace(self, a=out[0], b=out[1], layout=out[2],
                               m=lax.squeeze(self.m, m_drop))

  def reshape(self, shape: Sequence[int], groups: axes_lib.ReshapeGroups,
              old_shape: Sequence[int]) -> "DoraTerm | None":
    out = factors.reshape_pair(self.a, self.b, self.layout, 0, shape, groups)
    if out is None:
      return None
    lay = out[2]
    m = axes_lib.reshape(self.m, tuple(shape[i] for i in lay.stack_axes + lay.out_axes))
    return dataclasses.replace(self, a=out[0], b=out[1], layout=lay, m=m)

  def scan_over_axis0(self) -> "DoraTerm | None":
    layout = factors.unstack_layout(self.layout)
    return None if layout is None else dataclasses.replace(self, layout=layout)

  def shard_specs(self, spec: Any) -> "DoraTerm":
    a, b = factors.pair_specs(self.layout, 0, spec)
    entries = tuple(spec) + (None,) * (self.layout.ndim - len(tuple(spec)))
    m = PartitionSpec(*(entries[i] for i in self.layout.stack_axes + self.layout.out_axes))
    return dataclasses.replace(self, a=a, b=b, m=m)

  def stacked_on_axis0(self) -> "DoraTerm":
    return dataclasses.replace(self, layout=factors.stack_layout(self.layout))


def _column_norm(w0: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``||W0 + s A B||`` per column of the (K, N) weight, from W0's squared
  column norms, ``W0^T A`` and ``A^T A``: no (K, N) temporary but W0 itself.
  Constant for the backward pass, as in PEFT."""
  w0, a, b = (lax.stop_gradient(t).astype(jnp.float32) for t in (w0, a, b))
  s = jnp.float32(scale)
  sq = jnp.sum(jnp.square(w0), axis=0)
  cross = jnp.sum((w0.T @ a) * b.T, axis=1)                 # <W0_j, (A B)_j>
  low = jnp.sum(((a.T @ a) @ b) * b, axis=0)                # ||(A B)_j||^2
  return jnp.sqrt(jnp.maximum(sq + 2 * s * cross + s * s * low, 0.0))


values.register_term(DoraParam, DoraTerm.of)
