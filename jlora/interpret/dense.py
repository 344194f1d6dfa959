"""DenseWeight: a frozen weight stored as a plain array.

Its view ops are the ops themselves applied to W0. They cost nothing that
matters: XLA fuses a cast, transpose or slice of a parameter into its
consumer, and W0 is never differentiated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora.interpret import axes as axes_lib
from jlora.interpret import values


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseWeight(values.BaseWeight):
  """W0 as an array (the current view of it).

  Example:
    >>> import jax.numpy as jnp
    >>> DenseWeight(jnp.ones((2, 3))).transpose((1, 0)).shape
    (3, 2)
  """

  w: Any

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)

  @property
  def dtype(self) -> Any:
    return jnp.dtype(self.w.dtype)

  def materialize(self) -> jax.Array:
    return self.w

  def astype(self, dtype: Any) -> "DenseWeight":
    return self if jnp.dtype(dtype) == self.dtype else DenseWeight(self.w.astype(dtype))

  def transpose(self, perm: Sequence[int]) -> "DenseWeight":
    return DenseWeight(axes_lib.transpose(self.w, perm))

  def reshape(self, shape: Sequence[int], groups: axes_lib.ReshapeGroups) -> "DenseWeight":
    del groups
    return DenseWeight(axes_lib.reshape(self.w, shape))

  def squeeze(self, dims: Sequence[int]) -> "DenseWeight":
    return DenseWeight(lax.squeeze(self.w, tuple(dims)))

  def slice_axes(self, slicer: values.Slicer) -> "DenseWeight":
    return DenseWeight(slicer(self.w, {i: i for i in range(self.w.ndim)}))

  def map_dense(self, fn: Callable[[jax.Array], jax.Array]) -> "DenseWeight":
    return DenseWeight(fn(self.w))

  def constrain(self, fn: Callable[[jax.Array], jax.Array]) -> "DenseWeight":
    return DenseWeight(fn(self.w))

  def scan_over_axis0(self) -> "DenseWeight":
    return self

  def stacked_on_axis0(self) -> "DenseWeight":
    return self

  def shard_specs(self, spec: Any) -> "DenseWeight":
    return DenseWeight(spec)


values.register_base(jax.Array, DenseWeight)
values.register_base(np.ndarray, DenseWeight)
values.register_base(np.generic, DenseWeight)
