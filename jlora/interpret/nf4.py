"""NF4Weight: a frozen weight stored in NF4, as a base-weight kind.

The packed arrays travel through the interpreter as they are; only the
metadata follows the view ops. The current view is

    transpose(reshape(dequantized storage, storage_shape), perm).astype(dtype)

where each slice of the leading ``n_stack`` storage axes is one quantized
slice (its arrays lead with those axes) and the other storage axes are the
slice's values in storage order, split as any row-major reshape allows. So
a transpose, a cast, a reshape that keeps the storage order, a squeeze, and
taking layers out of a stack (``slice``/``dynamic_slice`` + ``squeeze``, or
``lax.scan`` over the stack axis) stay lazy; any other view dequantizes the
weight for that use. ``materialize`` dequantizes inside the traced step, in
float32 rounded to the weight's dtype.

A dot against such a weight runs under ``jax.checkpoint``
(``recompute_in_backward``): the backward pass recomputes the dequantized
weight from the packed arrays where it needs it (for the input gradient)
instead of keeping it from the forward pass. Kept, it would be a residual of
every layer, and ``lax.scan`` would stack the residuals of a scanned model
into a dequantized copy of the whole stack.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jlora.interpret import axes as axes_lib
from jlora.interpret import values
from jlora.quant.nf4 import NF4Array, dequantize_view


def _static(**kw):
  return dataclasses.field(metadata=dict(static=True), **kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NF4Weight(values.BaseWeight):
  """An ``NF4Array`` seen through the view ops applied so far.

  Attributes:
    codes, absmax, nested_absmax, offset: the NF4Array's arrays, leading
      with the ``n_stack`` stack axes still present.
    n: values per quantized slice.
    block_size: values per absmax block.
    stored_dtype: the weight's dtype before quantization.
    storage_shape: ``(*stack, *rest)``; ``rest`` multiplies to ``n``.
    n_stack: how many leading storage axes are stack axes.
    perm: view axis i is storage axis ``perm[i]``.
    view_dtype: the dtype of the current view.
  """

  recompute_in_backward = True

  codes: Any
  absmax: Any
  nested_absmax: Any
  offset: Any
  n: int = _static()
  block_size: int = _static()
  stored_dtype: Any = _static()
  storage_shape: tuple[int, ...] = _static()
  n_stack: int = _static()
  perm: tuple[int, ...] = _static()
  view_dtype: Any = _static()

  @classmethod
  def of(cls, q: NF4Array) -> "NF4Weight":
    perm = q.storage_perm   # storage axis k is weight axis perm[k]
    storage_shape = tuple(q.shape[i] for i in perm)
    view_perm = tuple(perm.index(axis) for axis in range(len(perm)))
    return cls(q.codes, q.absmax, q.nested_absmax, q.offset, n=q.slice_size,
               block_size=q.block_size, stored_dtype=jnp.dtype(q.dtype),
               storage_shape=storage_shape, n_stack=len(q.layout.stack_axes), perm=view_perm,
               view_dtype=jnp.dtype(q.dtype))

  # -- what it stands for ----------------------------------------------------------

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.storage_shape[p] for p in self.perm)

  @property
  def dtype(self) -> Any:
    return self.view_dtype

  def materialize(self) -> jax.Array:
    return dequantize_view(self.codes, self.absmax, self.nested_absmax, self.offset, n=self.n,
                           block_size=self.block_size, storage_shape=self.storage_shape,
                           perm=self.perm, stored_dtype=self.stored_dtype,
                           view_dtype=self.view_dtype)

  # -- lazy views --------------------------------------------------------------------

  def _arrays(self) -> list[Any]:
    return [self.codes, self.absmax, self.nested_absmax, self.offset]

  def _with(self, arrays=None, **kw) -> "NF4Weight":
    codes, absmax, nested, offset = arrays if arrays is not None else self._arrays()
    return dataclasses.replace(self, codes=codes, absmax=absmax, nested_absmax=nested,
                               offset=offset, **kw)

  def astype(self, dtype: Any) -> "NF4Weight":
    return self._with(view_dtype=jnp.dtype(dtype))

  def transpose(self, perm: Sequence[int]) -> "NF4Weight":
    return self._with(perm=tuple(self.perm[p] for p in perm))

  def reshape(self, shape: Sequence[int], groups: axes_lib.ReshapeGroups
              ) -> "NF4Weight | None":
    # Each group's old view axes must be consecutive storage axes in storage
    # order (then the reshape is a reshape of the storage); a stack axis may
    # only be kept as it is.
    runs = []
    for old, new in groups:
      start = self.perm[old[0]]
      if [self.perm[a] for a in old] != list(range(start, start + len(old))):
        return None
      sizes = tuple(int(shape[a]) for a in new)
      if start < self.n_stack and (len(old) != 1 or sizes != (self.storage_shape[start],)):
        return None
      runs.append((start, new, sizes))
    runs.sort()
    storage_shape, perm = [], [0] * len(shape)
    for _, new, sizes in runs:
      for axis, size in zip(new, sizes):
        perm[axis] = len(storage_shape)
        storage_shape.append(size)
    return self._with(storage_shape=tuple(storage_shape), perm=tuple(perm))

  def squeeze(self, dims: Sequence[int]) -> "NF4Weight":
    drop = sorted(self.perm[d] for d in dims)
    stack_drop = tuple(s for s in drop if s < self.n_stack)
    arrays = [None if x is None else lax.squeeze(x, stack_drop) for x in self._arrays()]
    renum = {s: s - sum(1 for d in drop if d < s) for s in range(len(self.storage_shape))}
    keep = [p for i, p in enumerate(self.perm) if i not in set(dims)]
    return self._with(arrays,
                      storage_shape=tuple(z for s, z in enumerate(self.storage_shape)
                                          if s not in drop),
                      n_stack=self.n_stack - len(stack_drop),
                      perm=tuple(renum[p] for p in keep))

  def slice_axes(self, slicer: values.Slicer) -> "NF4Weight | None":
    # Lazy when only stack axes are sliced: each leaf leads with them.
    shape = self.shape
    out = jax.eval_shape(lambda w: slicer(w, {i: i for i in range(len(shape))}),
                         jax.ShapeDtypeStruct(shape, jnp.float32)).shape
    stack_view = {self.perm.index(s): s for s in range(self.n_stack)}
    if any(out[i] != shape[i] for i in range(len(shape)) if i not in stack_view):
      return None
    axis_map = {s: v for v, s in stack_view.items()}
    arrays = [None if x is None else slicer(x, axis_map) for x in self._arrays()]
    stack = tuple(arrays[0].shape[:self.n_stack])
    return self._with(arrays, storage_shape=stack + self.storage_shape[self.n_stack:])

  def map_dense(self, fn: Callable[[jax.Array], jax.Array]) -> None:
    return None   # changes the values: dequantized for that use

  def constrain(self, fn: Callable[[jax.Array], jax.Array]) -> "NF4Weight":
    return self   # the hint describes W, not the packed storage

  def scan_over_axis0(self) -> "NF4Weight | None":
    if not self.perm or self.perm[0] != 0 or self.n_stack == 0:
      return None
    return self._with(storage_shape=self.storage_shape[1:], n_stack=self.n_stack - 1,
                      perm=tuple(p - 1 for p in self.perm[1:]))

  def stacked_on_axis0(self) -> "NF4Weight":
    length = self.codes.shape[0]
    return self._with(storage_shape=(length,) + self.storage_shape, n_stack=self.n_stack + 1,
                      perm=(0,) + tuple(p + 1 for p in self.perm))

  @property
  def stored_bytes(self) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
               for x in self._arrays() if x is not None)


values.register_base(NF4Array, NF4Weight.of)
