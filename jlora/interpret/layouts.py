"""``infer_layouts``: learn how a model contracts each weight from its jaxpr.

The interpreter runs the model abstractly (nothing is computed) with a
layout probe as the adapter of every floating weight of two or more axes.
Wherever a probe meets a ``dot_general``, the contracted axes are the
weight's input axes (A's), the free axes its output axes (B's), and batch
axes or an axis a scan iterates over are stack axes (one pair per slice).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jlora._paths import flatten_with_paths
from jlora.interpret import interpreter, probe, tracing
from jlora.interpret.values import AdaptedValue, as_base
from jlora.layout import Layout


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
  tracing.check_param_leaves(pairs)
  leaves = [leaf for _, leaf in pairs]
  traced = tracing.trace(fn, leaves, treedef, args, kwargs, abstract=True)
  recorder = probe.LayoutRecorder()

  def run(param_arrays, dyn_args):
    invals = []
    for i, arr in zip(traced.present, param_arrays):
      path, leaf = pairs[i]
      if _is_weight(leaf):
        arr = AdaptedValue(as_base(arr), (probe.probe(recorder, path, arr.ndim),), path)
      invals.append(arr)
    outs = interpreter.eval_jaxpr(traced.jaxpr, invals + list(dyn_args), interpreter.Context())
    return interpreter.dense_all(outs, "is returned")

  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
  jax.eval_shape(run, [abstract(leaves[i]) for i in traced.present],
                 [abstract(x) for x in tracing.dynamic_args(args, kwargs)])
  layouts = {}
  for i in traced.present:
    path, leaf = pairs[i]
    roles = recorder.roles.get(path)
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
