"""A ``dot_general`` seen from the adapted weight's side, and its two plans.

Every adapted matmul is computed in one of two shapes:

* ``FlatPlan``, when the weight has no batch axes (every Dense, DenseGeneral
  and Einsum kernel): x is brought to (M, K) and W0 to (K, N), so the base
  dot and the two low-rank dots run in the layouts the backends run
  natively, and plain autodiff emits its backward dots in those layouts too.
  The low-rank path costs 2Mr(K+N) FLOPs beside the base's 2MKN. (A
  hand-written custom VJP measured no faster on XLA:CPU, 0.69 against 0.66
  train-step ratio, and would rule out forward-mode AD.)
* ``LabelledPlan``, when the weight has batch axes (per-expert einsums): the
  base dot keeps the model's dimension numbers, and the factors are
  contracted by axis labels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NN = (((1,), (0,)), ((), ()))   # (M, K) @ (K, N)


@dataclasses.dataclass(frozen=True)
class Dot:
  """One ``dot_general`` of an adapted weight W with an operand x.

  Attributes:
    w_is_rhs: whether W is the right-hand operand (``x @ W``).
    w_contract, x_contract: paired contracted axes of W and x.
    w_batch, x_batch: paired batch axes.
    w_ndim, x_ndim: the operands' ranks.
    x_shape: the other operand's shape.
    precision, preferred_element_type: as the model's equation gives them;
      every dot emitted for it (base and low-rank) keeps them.
    out_dtype: the dtype of the equation's result.
  """

  w_is_rhs: bool
  w_contract: tuple[int, ...]
  x_contract: tuple[int, ...]
  w_batch: tuple[int, ...]
  x_batch: tuple[int, ...]
  w_ndim: int
  x_ndim: int
  x_shape: tuple[int, ...]
  precision: Any
  preferred_element_type: Any
  out_dtype: Any

  @classmethod
  def of(cls, params: dict[str, Any], lhs_shape: Sequence[int], rhs_shape: Sequence[int],
         w_is_rhs: bool, out_dtype: Any) -> "Dot":
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    lc, rc, lb, rb = map(tuple, (lc, rc, lb, rb))
    if w_is_rhs:
      wc, xc, wb, xb, w_shape, x_shape = rc, lc, rb, lb, rhs_shape, lhs_shape
    else:
      wc, xc, wb, xb, w_shape, x_shape = lc, rc, lb, rb, lhs_shape, rhs_shape
    return cls(w_is_rhs, wc, xc, wb, xb, len(w_shape), len(x_shape), tuple(x_shape),
               params.get("precision"), params.get("preferred_element_type"),
               jnp.dtype(out_dtype))

  @property
  def w_free(self) -> tuple[int, ...]:
    """W's free axes, in the order ``dot_general`` puts them in its result."""
    return tuple(i for i in range(self.w_ndim)
                 if i not in self.w_contract and i not in self.w_batch)

  @property
  def x_free(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.x_ndim)
                 if i not in self.x_contract and i not in self.x_batch)

  def dimension_numbers(self):
    if self.w_is_rhs:
      return (self.x_contract, self.w_contract), (self.x_batch, self.w_batch)
    return (self.w_contract, self.x_contract), (self.w_batch, self.x_batch)

  def base_dot(self, x: jax.Array, w: jax.Array) -> jax.Array:
    """The model's own dot, with W0 in W's place."""
    operands = (x, w) if self.w_is_rhs else (w, x)
    return lax.dot_general(*operands, self.dimension_numbers(), precision=self.precision,
                           preferred_element_type=self.preferred_element_type)

  def low_rank_type(self, factor_dtype: Any) -> Any:
    """``preferred_element_type`` for the low-rank dots: the model's, widened
    to the factors' dtype (the low-rank path runs in the factors' dtype)."""
    if self.preferred_element_type is None:
      return None
    return jnp.promote_types(self.preferred_element_type, factor_dtype)


@dataclasses.dataclass(frozen=True)
class FlatPlan:
  """``(M, K) @ (K, N)``: x's free axes flattened to M (``m_shape``), W's
  contracted axes to K in the order ``k_axes`` (paired with x's), W's free
  axes to N in the order ``n_axes`` (``dot_general``'s order); ``w0`` is the
  frozen weight as that (K, N) matrix (for terms that need it, as DoRA's norm)."""

  dot: Dot
  m_shape: tuple[int, ...]
  k_axes: tuple[int, ...]
  n_axes: tuple[int, ...]
  w0: Any = None


@dataclasses.dataclass(frozen=True)
class LabelledPlan:
  """Axis labels for a dot with batch axes: x's and W's axes are named, a
  contracted or batch axis of W shares its label with x's."""

  dot: Dot
  x_labels: tuple[str, ...]
  w_labels: tuple[str, ...]
  out_labels: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Take:
  """A ``gather`` that takes whole slices of a 2-D weight along one axis, as
  an embedding lookup does (``W[tokens]``, or ``W.T[:, tokens]``).

  Attributes:
    axis: the weight axis the indices pick from.
    offset_dim: where the other axis goes in the result.
    mode, fill_value: the gather's handling of out-of-range indices.
  """

  axis: int
  offset_dim: int
  mode: Any
  fill_value: Any

  def rows(self, factor: jax.Array, axis: int, indices: jax.Array) -> jax.Array:
    """The same gather on a 2-D ``factor`` along its ``axis``:
    ``(*indices.shape[:-1], other axis)``."""
    dims = lax.GatherDimensionNumbers(offset_dims=(indices.ndim - 1,),
                                      collapsed_slice_dims=(axis,), start_index_map=(axis,))
    sizes = tuple(1 if i == axis else d for i, d in enumerate(factor.shape))
    return lax.gather(factor, indices, dims, sizes, mode=self.mode, fill_value=self.fill_value)


@dataclasses.dataclass(frozen=True)
class Conv:
  """A convolution of an input with the adapted kernel.

  Attributes:
    rhs_spec: the kernel's (out feature, in feature, *spatial) axes.
    out_feature: the result's feature axis.
    grouped: a feature or batch group count other than 1.
    apply: the model's convolution on other operands (the same strides,
      padding, dilations, precision), ``apply(x, kernel)``.
  """

  rhs_spec: tuple[int, ...]
  out_feature: int
  grouped: bool
  apply: Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class RaggedDot:
  """``jax.lax.ragged_dot(x, W, group_sizes)``: rows of x grouped, W one
  (K, N) matrix per group, as mixture-of-experts layers compute.

  Attributes:
    standard: x (M, K) ragged on axis 0, W (G, K, N) with the group axis 0.
    apply: the model's ragged dot on other operands (same group sizes),
      ``apply(x, w)``.
  """

  standard: bool
  apply: Callable[[jax.Array, jax.Array], jax.Array]


def flat_plan(dot: Dot, x_shape: Sequence[int]) -> FlatPlan:
  return FlatPlan(dot, tuple(x_shape[i] for i in dot.x_free), dot.w_contract, dot.w_free)


def labelled_plan(dot: Dot) -> LabelledPlan:
  x_labels = [f"x{i}" for i in range(dot.x_ndim)]
  w_labels = [f"w{i}" for i in range(dot.w_ndim)]
  for i, j in zip(dot.x_contract + dot.x_batch, dot.w_contract + dot.w_batch):
    w_labels[j] = x_labels[i]
  batch = [x_labels[i] for i in dot.x_batch]
  x_free = [x_labels[i] for i in dot.x_free]
  w_free = [w_labels[i] for i in dot.w_free]
  out = batch + (x_free + w_free if dot.w_is_rhs else w_free + x_free)
  return LabelledPlan(dot, tuple(x_labels), tuple(w_labels), tuple(out))


def matmul(x: jax.Array, w: jax.Array, precision: Any = None,
           preferred_element_type: Any = None) -> jax.Array:
  """``(M, K) @ (K, N)``."""
  return lax.dot_general(x, w, _NN, precision=precision,
                         preferred_element_type=preferred_element_type)


def contract(x: jax.Array, x_labels: Sequence[str], f: jax.Array, f_labels: Sequence[str],
             keep: Collection[str], precision: Any = None,
             preferred_element_type: Any = None) -> tuple[jax.Array, list[str]]:
  """One labelled ``dot_general``: labels in both operands are contracted,
  unless in ``keep`` (then they are batch axes). Returns (result, labels)."""
  common = [l for l in x_labels if l in f_labels]
  batch = [l for l in common if l in keep]
  summed = [l for l in common if l not in keep]
  dims = ((tuple(x_labels.index(l) for l in summed), tuple(f_labels.index(l) for l in summed)),
          (tuple(x_labels.index(l) for l in batch), tuple(f_labels.index(l) for l in batch)))
  out = lax.dot_general(x, f, dims, precision=precision,
                        preferred_element_type=preferred_element_type)
  labels = (batch + [l for l in x_labels if l not in common]
            + [l for l in f_labels if l not in common])
  return out, labels
