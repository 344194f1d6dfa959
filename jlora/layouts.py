"""``infer_layouts``: learn how a model contracts each weight from its jaxpr.

An abstract trace (no real compute) of the model follows every weight
through casts, transposes, reshapes, slices, nested calls and scans to the
``dot_general`` that consumes it: the contracted axes are the weight's input
axes (A's), the free axes its output axes (B's), and batch axes or an axis
a scan iterates over are stack axes (one low-rank pair per slice).
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
from jax.extend import core as jcore

from jlora.errors import LoraLayoutError
from jlora._paths import flatten_with_paths
from jlora._tracing import trace
from jlora.layout import Layout

# A view of a weight: for each of its current axes, the set of the original
# weight's axes it holds (a merging reshape makes that set larger than one).
_View = tuple[str, tuple[frozenset, ...]]

_PASS_THROUGH = {"convert_element_type", "copy", "copy_p", "sharding_constraint",
                 "reduce_precision", "optimization_barrier"}


class _Walker:

  def __init__(self):
    self.roles: dict[str, dict[int, tuple[str, str]]] = {}

  def record(self, path: str, axis_sets, role: str, where: str) -> None:
    seen = self.roles.setdefault(path, {})
    for axes in axis_sets:
      for ax in axes:
        prev = seen.get(ax)
        if prev is not None and prev[0] != role:
          raise LoraLayoutError(
              f"'{path}': axis {ax} is used as an {prev[0]} axis by {prev[1]} and as an "
              f"{role} axis by {where}; one LoRA layout cannot serve both uses. Give "
              f"LoraSpec(layouts={{...}}) for this path or exclude it.")
        seen[ax] = (role, where)

  def walk(self, jaxpr, views: list[_View | None]) -> list[_View | None]:
    if isinstance(jaxpr, jcore.ClosedJaxpr):
      jaxpr = jaxpr.jaxpr
    env: dict[Any, _View] = {}
    for var, view in zip(jaxpr.invars, views):
      if view is not None:
        env[var] = view
    get = lambda v: None if isinstance(v, jcore.Literal) else env.get(v)
    for eqn in jaxpr.eqns:
      ins = [get(v) for v in eqn.invars]
      if not any(v is not None for v in ins):
        continue
      outs = self.eqn(eqn, ins)
      for var, view in zip(eqn.outvars, outs):
        if view is not None and not isinstance(var, jcore.DropVar):
          env[var] = view
    return [get(v) for v in jaxpr.outvars]

  def eqn(self, eqn, ins) -> list[_View | None]:
    name, p = eqn.primitive.name, eqn.params
    none = [None] * len(eqn.outvars)
    v = ins[0]
    if name in _PASS_THROUGH or name in ("slice", "dynamic_slice"):
      return [v] + none[1:] if v is not None else none
    if name == "split":
      return [v] * len(eqn.outvars)
    if name == "transpose":
      return [(v[0], tuple(v[1][i] for i in p["permutation"]))]
    if name == "squeeze":
      drop = set(p["dimensions"])
      return [(v[0], tuple(s for i, s in enumerate(v[1]) if i not in drop))]
    if name == "reshape" and v is not None:
      return [self.reshape(v, eqn.invars[0].aval.shape, p["new_sizes"])]
    if name == "dot_general":
      (lc, rc), (lb, rb) = p["dimension_numbers"]
      for view, contract, batch in ((ins[0], lc, lb), (ins[1], rc, rb)):
        if view is None:
          continue
        path, axes = view
        where = f"a dot_general {tuple(eqn.invars[0].aval.shape)} x {tuple(eqn.invars[1].aval.shape)}"
        free = [i for i in range(len(axes)) if i not in contract and i not in batch]
        self.record(path, [axes[i] for i in contract], "in", where)
        self.record(path, [axes[i] for i in batch], "stack", where)
        self.record(path, [axes[i] for i in free], "out", where)
      return none
    if name in ("jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint",
                "custom_jvp_call", "custom_vjp_call"):
      inner = p.get("jaxpr", p.get("call_jaxpr"))
      return self.walk(inner, ins)
    if name == "scan":
      nc, ncar = p["num_consts"], p["num_carry"]
      inner = list(ins[:nc]) + [None] * ncar
      for view in ins[nc + ncar:]:
        if view is None:
          inner.append(None)
          continue
        self.record(view[0], [view[1][0]], "stack", "a scan over its axis 0")
        inner.append((view[0], view[1][1:]))
      self.walk(p["jaxpr"], inner)
      return none
    if name == "cond":
      for branch in p["branches"]:
        self.walk(branch, ins[1:])
      return none
    if name == "while":
      cn, bn = p["cond_nconsts"], p["body_nconsts"]
      n_carry = len(ins) - cn - bn
      self.walk(p["cond_jaxpr"], list(ins[:cn]) + [None] * n_carry)
      self.walk(p["body_jaxpr"], list(ins[cn:cn + bn]) + [None] * n_carry)
      return none
    return none

  @staticmethod
  def reshape(view: _View, old_shape, new_shape) -> _View | None:
    from jlora._value import _reshape_groups
    groups = _reshape_groups(tuple(old_shape), tuple(new_shape))
    if groups is None:
      return None
    axes = [frozenset()] * len(new_shape)
    for old, new in groups:
      merged = frozenset().union(*(view[1][i] for i in old))
      for j in new:
        axes[j] = merged
    return (view[0], tuple(axes))


def infer_layouts(fn: Callable[..., Any], params: Any, *args, **kwargs) -> dict[str, Layout]:
  """Traces ``fn(params, *args, **kwargs)`` abstractly and returns each
  weight's layout, keyed by parameter path.

  Only weights that reach a ``dot_general`` get a layout. ``params`` and the
  array arguments may be abstract (``jax.ShapeDtypeStruct``); nothing is
  computed. Pass the result to ``lora_transform(..., layouts=...)``.

  Raises:
    LoraLayoutError: a weight is contracted differently by two of its uses.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"w": jnp.zeros((8, 2, 4))}             # (d, heads, head_dim)
    >>> f = lambda p, x: jnp.einsum("bd,dhk->bhk", x, p["w"])
    >>> jlora.infer_layouts(f, params, jnp.zeros((3, 8)))["w"]
    Layout(in_axes=(0,), out_axes=(1, 2), stack_axes=())
  """
  pairs, treedef = flatten_with_paths(params)
  closed, _, present, dyn_args = trace(fn, [leaf for _, leaf in pairs], treedef, args, kwargs,
                                       abstract=True)
  walker = _Walker()
  views = [(pairs[i][0], tuple(frozenset([ax]) for ax in range(len(pairs[i][1].shape))))
           if _is_weight(pairs[i][1]) else None for i in present]
  walker.walk(closed, views + [None] * len(dyn_args))
  layouts = {}
  for i in present:
    path, leaf = pairs[i]
    roles = walker.roles.get(path)
    if not roles:
      continue
    by_role = {r: tuple(sorted(ax for ax, (role, _) in roles.items() if role == r))
               for r in ("in", "out", "stack")}
    # An axis that no dot sees was indexed away before the dot (a layer
    # picked out of a stack by a traced index: dynamic_slice + squeeze), so
    # each index gets its own low-rank pair: a stack axis.
    unseen = tuple(ax for ax in range(len(leaf.shape)) if ax not in roles)
    if by_role["in"] and by_role["out"]:
      layouts[path] = Layout(by_role["in"], by_role["out"],
                             tuple(sorted(by_role["stack"] + unseen)))
  return layouts


def _is_weight(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating) and len(leaf.shape) >= 2
