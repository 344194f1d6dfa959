"""The kinds of PyTorch module PEFT adapts, and how a jlora adapter maps onto each.

PEFT stores each kind's factors differently; jlora holds every kind as
``a (*stack, *in, r)``, ``b (*stack, r, *out)`` (and a DoRA magnitude
``(*stack, *out)``). One *slice* below is the weight of one PyTorch module
(the ``nn.scan`` stack axes removed):

* ``linear`` (``nn.Linear``, ``transformers``' ``Conv1D``): ``lora_A.weight``
  ``(r, in)``, ``lora_B.weight`` ``(out, r)``, multi-axis kernels flattened in
  the weight's axis order; DoRA ``lora_magnitude_vector`` ``(out,)``.
* ``conv`` (``nn.Conv1d/2d/3d``, Flax kernel ``(*window, in, out)``):
  ``lora_A.weight`` ``(r, in, *window)`` (a convolution with the kernel's
  window), ``lora_B.weight`` ``(out, r, 1, ...)`` (a 1x1 convolution); DoRA
  ``lora_magnitude_vector`` ``(1, out, 1, ...)``.
* ``embedding`` (``nn.Embedding``, table ``(vocab, d)``): ``lora_embedding_A``
  ``(r, vocab)``, ``lora_embedding_B`` ``(d, r)``, the update
  ``(B A)^T``; DoRA ``lora_magnitude_vector`` ``(d,)`` (norms over the vocabulary).
* ``parameter`` (a bare ``nn.Parameter``, PEFT's ``target_parameters``, such as
  fused experts ``(E, X, Y)``): ``lora_A.weight`` ``(r E, Y)`` and
  ``lora_B.weight`` ``(X, r E)`` (expert-major rows of A, rank-major columns
  of B), the update of expert ``e`` being ``B[:, r_e] A[r_e, :]`` in the
  parameter's own ``(X, Y)`` order; a module whose ``is_transposed`` is true
  swaps the axes the two cover. A 2-D parameter ``(X, Y)`` is handled as a
  Linear weight: ``lora_A`` ``(r, Y)``, ``lora_B`` ``(X, r)``.

Whatever the kind, the mapping is exact: each slice's update ``s B A`` is
the same array on both sides.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jlora.errors import LoraPeftError
from jlora.layout import Layout
from jlora.peft.axes import factors_from_torch, factors_to_torch

LINEAR, CONV, EMBEDDING, PARAMETER = "linear", "conv", "embedding", "parameter"
KINDS = (LINEAR, CONV, EMBEDDING, PARAMETER)


def slice_layout(layout: Layout, n_modules: int) -> Layout:
  """The layout of one module's slice: the first ``n_modules`` stack axes (one
  PyTorch module per index) removed and the others renumbered.

  Example:
    >>> slice_layout(Layout((2,), (3,), (0, 1)), 1)
    Layout(in_axes=(1,), out_axes=(2,), stack_axes=(0,))
  """
  gone = layout.stack_axes[:n_modules]
  kept = [ax for ax in range(layout.ndim) if ax not in gone]
  renum = lambda axes: tuple(kept.index(ax) for ax in axes)  # noqa: E731
  return Layout(renum(layout.in_axes), renum(layout.out_axes),
                renum(layout.stack_axes[n_modules:]))


def default_layout(kind: str, ndim: int, n_stack: int, transposed: bool,
                   tied: bool = False) -> Layout:
  """The layout a module kind gives its weight when none is passed, with
  ``n_stack`` leading module-stack axes: a convolution's ``(*window, in, out)``,
  an embedding's ``(vocab, d)`` looked up by row (by the output head's
  contraction over ``d`` for a tied table), a parameter as PEFT reads it
  (``(E, in, out)``, or ``(E, out, in)`` transposed; a 2-D one ``(out, in)``)."""
  stack = tuple(range(n_stack))
  k = n_stack
  if kind == CONV:
    return Layout(tuple(range(k, ndim - 1)), (ndim - 1,), stack)
  if kind == EMBEDDING:
    return Layout((k + 1,), (k,), stack) if tied else Layout((k,), (k + 1,), stack)
  if ndim - k == 3:
    ins, outs = ((k + 1,), (k + 2,)) if not transposed else ((k + 2,), (k + 1,))
    return Layout(ins, outs, stack + (k,))
  return Layout((k + 1,), (k,), stack)


def check_slice(kind: str, path: str, lay: Layout) -> None:
  """Refuses a slice layout the module kind cannot hold, naming the weight."""
  ndim = lay.ndim
  if kind in (LINEAR, CONV) and lay.stack_axes:
    raise LoraPeftError(f"'{path}': stack axes {lay.stack_axes} beyond the module-name "
                        f"fields; one PyTorch {kind} module holds one weight")
  if kind == CONV:
    want = Layout(tuple(range(ndim - 1)), (ndim - 1,))
    if ndim < 3 or lay != want:
      raise LoraPeftError(
          f"'{path}': a PyTorch convolution needs a Flax kernel (*window, in, out) with "
          f"layout {want} (A covers the window and the input channels), got {lay}")
  if kind == EMBEDDING and (ndim != 2 or lay.stack_axes):
    raise LoraPeftError(f"'{path}': an nn.Embedding table is 2-D (vocab, d), got layout {lay}")
  if kind == PARAMETER:
    ok = ((ndim == 2 and not lay.stack_axes)
          or (ndim == 3 and lay.stack_axes == (0,) and len(lay.in_axes) == 1))
    if not ok:
      raise LoraPeftError(
          f"'{path}': PEFT's target_parameters adapts a 2-D parameter or a 3-D one whose "
          f"first axis holds the experts (E, X, Y), with one pair per expert; got layout {lay}")


def _left_right(a: np.ndarray, b: np.ndarray, lay: Layout) -> tuple[np.ndarray, np.ndarray]:
  """A 2-D slice's update as ``L @ R`` in its own axis order: ``L (n0, r)``,
  ``R (r, n1)`` (a leading expert axis on both for 3-D)."""
  stacked = bool(lay.stack_axes)
  first = lay.in_axes[0] == (1 if stacked else 0)   # A covers the first non-stack axis
  if first:
    return a, b
  swap = lambda x: np.swapaxes(x, -1, -2)  # noqa: E731
  return swap(b), swap(a)


def _from_left_right(left: np.ndarray, right: np.ndarray, lay: Layout
                     ) -> tuple[np.ndarray, np.ndarray]:
  """The inverse of ``_left_right``."""
  first = lay.in_axes[0] == (1 if lay.stack_axes else 0)
  if first:
    return left, right
  swap = lambda x: np.swapaxes(x, -1, -2)  # noqa: E731
  return swap(right), swap(left)


def to_torch(kind: str, a: np.ndarray, b: np.ndarray, lay: Layout,
             transposed: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """One slice's ``(a, b)`` -> PEFT's ``(A, B)`` tensors of module kind ``kind``."""
  if kind == LINEAR:
    return factors_to_torch(a, b, lay)
  if kind == CONV:
    n = a.ndim - 1                                     # a: (*window, in, r)
    lora_a = np.transpose(a, [n, n - 1] + list(range(n - 1)))
    lora_b = b.T.reshape(b.shape[1], b.shape[0], *([1] * (n - 1)))
    return np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)
  left, right = _left_right(a, b, lay)                 # update = L @ R
  if kind == EMBEDDING:                                # A covers vocab (axis 0), B d
    return np.ascontiguousarray(left.T), np.ascontiguousarray(right.T)
  if left.ndim == 2:                                   # a 2-D parameter, as a Linear
    return np.ascontiguousarray(right), np.ascontiguousarray(left)
  e, n1, r = left.shape
  n2 = right.shape[-1]
  if not transposed:   # B covers X: (X, r E) rank-major; A covers Y: (E r, Y) expert-major
    lora_b = np.transpose(left, (1, 2, 0)).reshape(n1, r * e)
    lora_a = right.reshape(e * r, n2)
  else:                # A covers X: (E r, X); B covers Y: (Y, r E)
    lora_a = np.transpose(left, (0, 2, 1)).reshape(e * r, n1)
    lora_b = np.transpose(right, (2, 1, 0)).reshape(n2, r * e)
  return np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)


def torch_shapes(kind: str, shape: Sequence[int], lay: Layout, r: int,
                 transposed: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The shapes PEFT gives ``(A, B)`` for a slice of ``shape`` at rank ``r``."""
  shape = tuple(shape)
  if kind == LINEAR:
    return (r, lay.fan_in(shape)), (lay.fan_out(shape), r)
  if kind == CONV:
    window, cin, cout = shape[:-2], shape[-2], shape[-1]
    return (r, cin) + window, (cout, r) + (1,) * len(window)
  if kind == EMBEDDING:
    return (r, shape[0]), (shape[1], r)
  if len(shape) == 2:
    return (r, shape[1]), (shape[0], r)
  e, n1, n2 = shape
  return ((e * r, n2), (n1, r * e)) if not transposed else ((e * r, n1), (n2, r * e))


def rank_of(kind: str, lora_a: np.ndarray, shape: Sequence[int]) -> int | None:
  """The rank of a slice from PEFT's A (None if its shape cannot say)."""
  if kind == PARAMETER and len(shape) == 3:
    rows, e = lora_a.shape[0], shape[0]
    return rows // e if rows % e == 0 else None
  return int(lora_a.shape[0])


def from_torch(kind: str, lora_a: np.ndarray, lora_b: np.ndarray, lay: Layout,
               shape: Sequence[int], r: int, transposed: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
  """PEFT's ``(A, B)`` -> one slice's ``(a, b)``; shapes are checked by the caller
  against ``torch_shapes``."""
  if kind == LINEAR:
    return factors_from_torch(lora_a, lora_b, lay, shape)
  if kind == CONV:
    n = lora_a.ndim - 1                                # (r, in, *window)
    a = np.transpose(lora_a, list(range(2, n + 1)) + [1, 0])
    b = lora_b.reshape(lora_b.shape[0], r).T
    return a, b
  if kind == EMBEDDING:
    return _from_left_right(lora_a.T, lora_b.T, lay)
  if len(shape) == 2:
    return _from_left_right(lora_b, lora_a, lay)
  e, n1, n2 = shape
  if not transposed:
    left = np.transpose(lora_b.reshape(n1, r, e), (2, 0, 1))
    right = lora_a.reshape(e, r, n2)
  else:
    left = np.transpose(lora_a.reshape(e, r, n1), (0, 2, 1))
    right = np.transpose(lora_b.reshape(n2, r, e), (2, 1, 0))
  return _from_left_right(left, right, lay)


def magnitude_to_torch(kind: str, m: np.ndarray, lay: Layout, path: str) -> np.ndarray:
  """A DoRA magnitude ``(*out)`` -> PEFT's ``lora_magnitude_vector``."""
  if kind == LINEAR:
    order = sorted(range(len(lay.out_axes)), key=lambda i: lay.out_axes[i])
    return np.ascontiguousarray(np.transpose(m, order).reshape(-1))
  if kind == CONV:
    return np.ascontiguousarray(m.reshape((1, -1) + (1,) * (lay.ndim - 2)))
  if kind == EMBEDDING:
    if lay.out_axes != (1,):
      raise LoraPeftError(
          f"'{path}': PEFT's DoRA on an nn.Embedding keeps one magnitude per embedding "
          f"dimension (norms over the vocabulary); this adapter's layout {lay} puts the "
          f"vocabulary on the output axis, so its magnitude is per token")
    return np.ascontiguousarray(m)
  raise LoraPeftError(f"'{path}': PEFT has no DoRA for target_parameters")


def magnitude_from_torch(kind: str, m: np.ndarray, lay: Layout, shape: Sequence[int]
                         ) -> np.ndarray:
  """PEFT's ``lora_magnitude_vector`` -> a DoRA magnitude ``(*out)``."""
  if kind == LINEAR:
    out_sorted = sorted(lay.out_axes)
    m = m.reshape([shape[i] for i in out_sorted])
    return np.transpose(m, [out_sorted.index(ax) for ax in lay.out_axes])
  return m.reshape(-1)


def magnitude_shape(kind: str, shape: Sequence[int], lay: Layout) -> tuple[int, ...]:
  """The shape PEFT gives a slice's ``lora_magnitude_vector``."""
  if kind == LINEAR:
    return (lay.fan_out(shape),)
  if kind == CONV:
    return (1, shape[-1]) + (1,) * (len(shape) - 2)
  return (shape[lay.out_axes[0]],)
