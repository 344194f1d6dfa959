"""Where each weight axis lives in a pair of LoRA factors, through view ops.

A pair laid out by ``layout`` has the shapes::

  a: (*stack, *inner, *in, r)      b: (*stack, *inner, r, *out)

``inner`` axes belong to the factors only (a bank's adapter axis); a weight
axis is an input axis (it lives in A), an output axis (in B) or a stack axis
(leading in both: one pair per slice). The functions here move axes between
the factors as a view op moves them in the weight, so terms built on a pair
(``LoraTerm``, ``BankTerm``) follow casts, transposes, reshapes, slices and
scans without forming the weight.
"""

from __future__ import annotations

from typing import Any, Sequence

from jax import lax

from jlora.errors import LoraLayoutError
from jlora.interpret import axes as axes_lib
from jlora.interpret import dot as dot_lib
from jlora.layout import Layout


def role(layout: Layout, axis: int) -> str:
  if axis in layout.in_axes:
    return "in"
  if axis in layout.out_axes:
    return "out"
  return "stack"


def factor_axes(layout: Layout, axis: int, inner: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Where a weight axis lives in A and in B (empty: not there)."""
  ns = len(layout.stack_axes)
  if axis in layout.stack_axes:
    k = layout.stack_axes.index(axis)
    return (k,), (k,)
  if axis in layout.in_axes:
    return (ns + inner + layout.in_axes.index(axis),), ()
  return (), (ns + inner + 1 + layout.out_axes.index(axis),)


class LayoutMismatchError(LoraLayoutError):
  """A dot contracts a weight otherwise than its factors' layout says.

  Raised in terms of the view the dot sees (``shape``, ``layout``, ``dot``);
  ``AdaptedValue``, which knows how the weight is stored, restates it with
  ``restated``."""

  path: str
  shape: tuple[int, ...]
  layout: Layout
  dot: Any

  def restated(self, stored_shape: tuple[int, ...], given: Layout) -> LoraLayoutError:
    """The error for a weight stored with ``stored_shape`` whose factors were
    made with layout ``given``: the stored shape and the given layout first,
    then the view the model contracts."""
    view, lay, dot = self.shape, self.layout, self.dot
    if tuple(stored_shape) == tuple(view) and given == lay:
      return self
    msg = (f"'{self.path}': its LoRA factors were laid out for the weight as stored (shape "
           f"{tuple(stored_shape)}) with input axes {given.in_axes}, output axes "
           f"{given.out_axes} and stack axes {given.stack_axes}, but the model uses a view of "
           f"it (shape {tuple(view)}, where those are axes {lay.in_axes}, {lay.out_axes} and "
           f"{lay.stack_axes}) and contracts the view over axes {dot.w_contract} with batch "
           f"axes {dot.w_batch}")
    fit = _stored_layout(stored_shape, given, view, lay, dot)
    if fit is not None:
      msg += f"; this use needs {fit} for the stored weight"
    return LoraLayoutError(
        msg + ". Build the adapter with layouts=jlora.infer_layouts(fn, params, ...) or give "
        "LoraSpec(layouts={...}) for this path.")


def _stored_layout(stored_shape, given: Layout, view, lay: Layout, dot: Any) -> Layout | None:
  """The layout of the stored weight that the dot's use implies, when the view
  is the stored weight with its axes permuted (each view axis traced back to
  one stored axis of the same length); None otherwise."""
  if len(view) != len(stored_shape):
    return None
  back = {}
  for v_axes, s_axes in ((lay.in_axes, given.in_axes), (lay.out_axes, given.out_axes),
                         (lay.stack_axes, given.stack_axes)):
    if len(v_axes) != len(s_axes):
      return None
    for v, s in zip(v_axes, s_axes):
      if view[v] != stored_shape[s]:
        return None
      back[v] = s
  if sorted(back) != list(range(len(view))):
    return None
  to_stored = lambda axes: tuple(sorted(back[a] for a in axes))  # noqa: E731
  if not dot.w_contract or not dot.w_free:
    return None
  return Layout(to_stored(dot.w_contract), to_stored(dot.w_free), to_stored(dot.w_batch))


def check_layout(path: str, shape: tuple[int, ...], layout: Layout, dot: dot_lib.Dot) -> None:
  """Raises LayoutMismatchError unless the dot contracts the weight over the
  layout's input axes, batches it over its stack axes, and keeps its output
  axes."""
  if (set(dot.w_contract) != set(layout.in_axes) or set(dot.w_batch) != set(layout.stack_axes)
      or set(dot.w_free) != set(layout.out_axes)):
    err = LayoutMismatchError(
        f"'{path}': the model contracts this weight (shape {shape}) over axes "
        f"{dot.w_contract} with batch axes {dot.w_batch}, but its LoRA factors were "
        f"laid out for input axes {layout.in_axes}, output axes {layout.out_axes} and stack "
        f"axes {layout.stack_axes}. Build the adapter with "
        f"layouts=jlora.infer_layouts(fn, params, ...) or give "
        f"LoraSpec(layouts={{...}}) for this path.")
    err.path, err.shape, err.layout, err.dot = path, tuple(shape), layout, dot
    raise err


def transpose(layout: Layout, perm: Sequence[int]) -> Layout:
  """The layout after the weight's axes are permuted (the factors stay)."""
  new_pos = {old: new for new, old in enumerate(perm)}
  return Layout(tuple(new_pos[i] for i in layout.in_axes),
                tuple(new_pos[i] for i in layout.out_axes),
                tuple(new_pos[i] for i in layout.stack_axes))


def slice_pair(a: Any, b: Any, layout: Layout, inner: int, slicer) -> tuple[Any, Any]:
  """Applies ``slicer(array, {array axis: weight axis})`` to both factors."""
  a_map, b_map = {}, {}
  for axis in range(layout.ndim):
    in_a, in_b = factor_axes(layout, axis, inner)
    for k in in_a:
      a_map[k] = axis
    for k in in_b:
      b_map[k] = axis
  return slicer(a, a_map), slicer(b, b_map)


def squeeze_pair(a: Any, b: Any, layout: Layout, inner: int, dims: Sequence[int]):
  """``(a, b, layout)`` without the unit weight axes ``dims``; None when a
  factor would lose its only input or output axis."""
  drop = set(dims)
  for d in drop:
    side = layout.in_axes if d in layout.in_axes else (
        layout.out_axes if d in layout.out_axes else ())
    if len(side) == 1:
      return None
  a_drop = sorted(k for d in drop for k in factor_axes(layout, d, inner)[0])
  b_drop = sorted(k for d in drop for k in factor_axes(layout, d, inner)[1])
  renum = {old: old - sum(1 for d in drop if d < old) for old in range(layout.ndim)}
  keep = lambda axes: tuple(renum[x] for x in axes if x not in drop)  # noqa: E731
  return (lax.squeeze(a, tuple(a_drop)), lax.squeeze(b, tuple(b_drop)),
          Layout(keep(layout.in_axes), keep(layout.out_axes), keep(layout.stack_axes)))


def reshape_pair(a: Any, b: Any, layout: Layout, inner: int, shape: Sequence[int],
                 groups: axes_lib.ReshapeGroups):
  """``(a, b, layout)`` for the weight reshaped to ``shape``. Lazy when every
  merged or split group of axes stays inside one factor and keeps that
  factor's axis order; None otherwise."""
  group_of = {}
  for gi, (old, _) in enumerate(groups):
    if len({role(layout, ax) for ax in old}) != 1:
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

  new_in, new_out, new_stack = (regroup(layout.in_axes), regroup(layout.out_axes),
                                regroup(layout.stack_axes))
  if new_in is None or new_out is None or new_stack is None or not new_in or not new_out:
    return None
  new = Layout(new_in, new_out, new_stack)
  ns, r = len(layout.stack_axes), a.shape[-1]
  inner_shape = tuple(a.shape[ns:ns + inner])
  stack = tuple(shape[i] for i in new.stack_axes)
  a_shape = stack + inner_shape + tuple(shape[i] for i in new.in_axes) + (r,)
  b_shape = stack + inner_shape + (r,) + tuple(shape[i] for i in new.out_axes)
  return axes_lib.reshape(a, a_shape), axes_lib.reshape(b, b_shape), new


def pair_specs(layout: Layout, inner: int, spec: Any) -> tuple[Any, Any]:
  """``PartitionSpec``s of the factors when the weight is sliced by ``spec``:
  each factor axis as its weight axis, the inner and rank axes whole."""
  from jax.sharding import PartitionSpec
  entries = tuple(spec) + (None,) * (layout.ndim - len(tuple(spec)))
  stack = tuple(entries[i] for i in layout.stack_axes)
  a = stack + (None,) * inner + tuple(entries[i] for i in layout.in_axes) + (None,)
  b = stack + (None,) * inner + (None,) + tuple(entries[i] for i in layout.out_axes)
  return PartitionSpec(*a), PartitionSpec(*b)


def unstack_layout(layout: Layout) -> Layout | None:
  """The layout of one slice along weight axis 0; None unless axis 0 is the
  first stack axis (so it leads both factors)."""
  if not layout.stack_axes or layout.stack_axes[0] != 0:
    return None
  dec = lambda axes: tuple(x - 1 for x in axes)  # noqa: E731
  return Layout(dec(layout.in_axes), dec(layout.out_axes), dec(layout.stack_axes[1:]))


def stack_layout(layout: Layout) -> Layout:
  """The layout of slices stacked along a new weight axis 0."""
  inc = lambda axes: tuple(x + 1 for x in axes)  # noqa: E731
  return Layout(inc(layout.in_axes), inc(layout.out_axes), (0,) + inc(layout.stack_axes))


def flat_factors(a: Any, b: Any, layout: Layout, inner: int, k_axes: Sequence[int],
                 n_axes: Sequence[int]) -> tuple[Any, Any]:
  """The factors of a weight without stack axes as ``(*inner, K, r)`` and
  ``(*inner, r, N)``, K's axes in ``k_axes`` order and N's in ``n_axes``."""
  lead = list(range(inner))
  r = a.shape[-1]
  inner_shape = tuple(a.shape[:inner])
  a = axes_lib.transpose(a, lead + [inner + layout.in_axes.index(x) for x in k_axes]
                         + [inner + len(layout.in_axes)])
  a = axes_lib.reshape(a, inner_shape + (-1, r))
  b = axes_lib.transpose(b, lead + [inner] + [inner + 1 + layout.out_axes.index(x)
                                              for x in n_axes])
  b = axes_lib.reshape(b, inner_shape + (r, -1))
  return a, b
