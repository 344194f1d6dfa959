"""The rules: what each primitive does when an adapted weight reaches it.

A rule is ``rule(ctx, eqn, invals) -> outvals`` (a list when the primitive
has several results). It runs only for equations that have an
``AdaptedValue`` among their inputs, under the equation's source
information, and it calls value methods only, never fields. A primitive
with no rule gets the dense weight (``W0 + s B A``, formed for that use)
and a ``LoraMaterializeWarning`` naming the parameter and the primitive.

The same rules serve ``infer_layouts``: it runs this interpreter with a
layout probe as each weight's adapter term (``jlora.interpret.probe``),
so what a rule does to an adapted weight is what it tells layout inference.

Adding a rule:

1. Write ``def _my_rule(ctx, eqn, invals)`` below; use ``_lazy`` for a view
   op (one value operand, returns a value or None), ``materialize`` to give
   up, and ``interpreter.eval_jaxpr`` to enter an inner jaxpr.
2. Add the primitive's name to ``jlora._compat`` and register the rule with
   ``@register(_compat.NAME)``.
3. Add a test that compares the transformed function with the merged
   weight's, forward and gradients, under ``jit`` and without.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from jlora import _compat
from jlora.interpret import interpreter
from jlora.interpret.dot import Conv, Dot, RaggedDot, Take
from jlora.interpret.values import is_value

Rule = Callable[[Any, Any, list], Any]
_RULES: dict[str, Rule] = {}


def register(*names: str) -> Callable[[Rule], Rule]:
  """Registers a rule under the primitive names given."""
  def deco(rule: Rule) -> Rule:
    for name in names:
      _RULES[name] = rule
    return rule
  return deco


def lookup(name: str) -> Rule:
  """The rule of a primitive; ``materialize`` when it has none."""
  return _RULES.get(name, materialize)


def registered() -> list[str]:
  """The primitive names that have a rule."""
  return sorted(_RULES)


def materialize(ctx, eqn, invals):
  """The fallback: the equation on dense weights."""
  del ctx
  reason = f"is used by '{_compat.eqn_name(eqn)}', which has no low-rank rule"
  return _compat.rebind(eqn, interpreter.dense_all(invals, reason))


def _lazy(ctx, eqn, invals, op: Callable[[Any], Any]):
  """A view op of the first operand; materializes when it cannot stay lazy."""
  value, rest = invals[0], invals[1:]
  out = None
  if is_value(value) and not any(map(is_value, rest)):
    out = op(value)
  return materialize(ctx, eqn, invals) if out is None else out


# -- dot_general -------------------------------------------------------------------


@register(_compat.DOT_GENERAL)
def _dot_general(ctx, eqn, invals):
  lhs, rhs = invals
  lhs_aval, rhs_aval = _compat.in_avals(eqn)
  out_dtype = _compat.out_avals(eqn)[0].dtype
  params = _compat.eqn_params(eqn)
  shapes = tuple(lhs_aval.shape), tuple(rhs_aval.shape)
  if is_value(lhs) and is_value(rhs):
    lhs.note_dense_dot(Dot.of(params, *shapes, False, out_dtype))
    lhs = interpreter.dense(lhs, "is multiplied with another adapted weight")
  w_is_rhs = is_value(rhs)
  w, x = (rhs, lhs) if w_is_rhs else (lhs, rhs)
  return w.dot_general(ctx, x, Dot.of(params, *shapes, w_is_rhs, out_dtype))


# -- casts and elementwise ops on the frozen weight ---------------------------------


@register(_compat.CONVERT_ELEMENT_TYPE)
def _convert_element_type(ctx, eqn, invals):
  new_dtype = _compat.eqn_params(eqn)["new_dtype"]
  if not jnp.issubdtype(new_dtype, jnp.floating):
    return materialize(ctx, eqn, invals)
  return _lazy(ctx, eqn, invals, lambda v: v.astype(new_dtype))


@register(_compat.REDUCE_PRECISION)
def _reduce_precision(ctx, eqn, invals):
  # A fake quantization of the weight rounds W0 where it happens.
  return _lazy(ctx, eqn, invals, lambda v: v.map_base(lambda w: _compat.rebind(eqn, [w])))


@register(_compat.COPY)
def _copy(ctx, eqn, invals):
  return _lazy(ctx, eqn, invals, lambda v: v)


@register(_compat.SHARDING_CONSTRAINT)
def _sharding_constraint(ctx, eqn, invals):
  # The constraint describes W; W0 takes it, the factors follow through the
  # shardings lora_transform derived for them.
  return _lazy(ctx, eqn, invals, lambda v: v.constrain(lambda w: _compat.rebind(eqn, [w])))


@register(_compat.PVARY)
def _pvary(ctx, eqn, invals):
  # Marks an array as varying over a shard_map's axes, values unchanged: W0's
  # and the factors' arrays alike (theirs vary over no axis W0's does not).
  del ctx
  (value,) = invals
  return jax.tree_util.tree_map(lambda leaf: _compat.rebind(eqn, [leaf]), value)


@register(_compat.OPTIMIZATION_BARRIER)
def _optimization_barrier(ctx, eqn, invals):
  # The barrier holds every array it is given: a value's arrays included.
  del ctx
  leaves, tree = jax.tree_util.tree_flatten(list(invals))
  return jax.tree_util.tree_unflatten(tree, list(_compat.rebind(eqn, leaves)))


# -- structural view ops -------------------------------------------------------------


@register(_compat.TRANSPOSE)
def _transpose(ctx, eqn, invals):
  perm = _compat.eqn_params(eqn)["permutation"]
  return _lazy(ctx, eqn, invals, lambda v: v.transpose(perm))


@register(_compat.RESHAPE)
def _reshape(ctx, eqn, invals):
  p = _compat.eqn_params(eqn)
  if p.get("dimensions") is not None or len(invals) != 1:
    return materialize(ctx, eqn, invals)
  return _lazy(ctx, eqn, invals, lambda v: v.reshape(p["new_sizes"]))


@register(_compat.SQUEEZE)
def _squeeze(ctx, eqn, invals):
  dims = _compat.eqn_params(eqn)["dimensions"]
  return _lazy(ctx, eqn, invals, lambda v: v.squeeze(dims))


@register(_compat.SLICE)
def _slice(ctx, eqn, invals):
  p = _compat.eqn_params(eqn)
  start, limit = p["start_indices"], p["limit_indices"]
  strides = p["strides"] or (1,) * len(start)

  def slicer(arr, axis_map):
    s, l, st = [0] * arr.ndim, list(arr.shape), [1] * arr.ndim
    for k, axis in axis_map.items():
      s[k], l[k], st[k] = start[axis], limit[axis], strides[axis]
    return lax.slice(arr, s, l, st)

  return _lazy(ctx, eqn, invals, lambda v: v.slice_axes(slicer))


@register(_compat.DYNAMIC_SLICE)
def _dynamic_slice(ctx, eqn, invals):
  starts = invals[1:]
  sizes = _compat.eqn_params(eqn)["slice_sizes"]

  def slicer(arr, axis_map):
    s = [jnp.zeros((), jnp.int32)] * arr.ndim
    z = list(arr.shape)
    for k, axis in axis_map.items():
      s[k], z[k] = starts[axis], sizes[axis]
    return lax.dynamic_slice(arr, s, z)

  return _lazy(ctx, eqn, invals, lambda v: v.slice_axes(slicer))


@register(_compat.GATHER)
def _gather(ctx, eqn, invals):
  # An embedding lookup of an adapted table: rows of W0, plus rows of the
  # factor that holds the indexed axis times the other factor.
  operand, indices = invals
  take = _whole_slices(eqn) if is_value(operand) and not is_value(indices) else None
  out = None
  if take is not None:
    out = operand.take(ctx, indices, take, lambda w: _compat.rebind(eqn, [w, indices]))
  return materialize(ctx, eqn, invals) if out is None else out


def _whole_slices(eqn):
  """The Take of a gather of whole slices of a 2-D operand along one axis;
  None for any other gather."""
  p = _compat.eqn_params(eqn)
  operand, indices = _compat.in_avals(eqn)
  dims = p["dimension_numbers"]
  if (len(operand.shape) != 2 or indices.shape[-1:] != (1,) or len(dims.start_index_map) != 1
      or tuple(dims.collapsed_slice_dims) != tuple(dims.start_index_map)
      or dims.operand_batching_dims or len(dims.offset_dims) != 1):
    return None
  axis = dims.start_index_map[0]
  if tuple(p["slice_sizes"]) != tuple(1 if i == axis else d for i, d in enumerate(operand.shape)):
    return None
  return Take(axis, dims.offset_dims[0], p["mode"], p["fill_value"])


@register(_compat.CONV)
def _conv(ctx, eqn, invals):
  x, kernel = invals
  out = None
  if is_value(kernel) and not is_value(x):
    p = _compat.eqn_params(eqn)
    dims = p["dimension_numbers"]
    conv = Conv(tuple(dims.rhs_spec), dims.out_spec[1],
                p["feature_group_count"] != 1 or p["batch_group_count"] != 1,
                lambda lhs, rhs: _compat.rebind(eqn, [lhs, rhs]))
    out = kernel.conv(ctx, x, conv)
  return materialize(ctx, eqn, invals) if out is None else out


@register(_compat.RAGGED_DOT)
def _ragged_dot(ctx, eqn, invals):
  x, w, *rest = invals
  out = None
  if is_value(w) and not is_value(x) and not any(map(is_value, rest)):
    p = _compat.eqn_params(eqn)
    dims = p["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = dims.dot_dimension_numbers
    x_aval = _compat.in_avals(eqn)[0]
    standard = (len(x_aval.shape) == 2 and w.ndim == 3 and tuple(lc) == (1,)
                and tuple(rc) == (1,) and not lb and not rb
                and tuple(dims.lhs_ragged_dimensions) == (0,)
                and tuple(dims.rhs_group_dimensions) == (0,))
    ragged = RaggedDot(standard, lambda lhs, rhs: _compat.rebind(eqn, [lhs, rhs, *rest]))
    out = w.ragged_dot(ctx, x, ragged)
  return materialize(ctx, eqn, invals) if out is None else out


@register(_compat.SPLIT)
def _split(ctx, eqn, invals):
  # A fused qkv kernel split into its parts: each part is a slice of W0 and
  # of the factor that holds the split axis.
  p = _compat.eqn_params(eqn)
  axis, outs, start = p["axis"], [], 0
  for size in p["sizes"]:
    def slicer(arr, axis_map, start=start, size=size):
      for k, weight_axis in axis_map.items():
        if weight_axis == axis:
          return lax.slice_in_dim(arr, start, start + size, axis=k)
      return arr
    part = invals[0].slice_axes(slicer)
    if part is None:
      return materialize(ctx, eqn, invals)
    outs.append(part)
    start += size
  return outs


# -- higher-order primitives ------------------------------------------------------------


@register(_compat.JIT, _compat.CLOSED_CALL)
def _call(ctx, eqn, invals):
  # Inlined: values flow in and out of the call, so a helper that returns a
  # weight (`w.T`, one layer of a stack, NNX module state) keeps it low-rank.
  p = _compat.eqn_params(eqn)
  return interpreter.eval_jaxpr(p.get("jaxpr", p.get("call_jaxpr")), invals, ctx)


@register(_compat.REMAT)
def _remat(ctx, eqn, invals):
  p = _compat.eqn_params(eqn)

  def body(*args):
    return interpreter.eval_jaxpr(p["jaxpr"], args, ctx)

  return list(jax.checkpoint(body, prevent_cse=p.get("prevent_cse", True),
                             policy=p.get("policy"))(*invals))


# A weight that a loop hands back unchanged is no carry: JAX makes it a
# loop constant when it traces the loop. A carry that does change cannot
# stay one low-rank value from one iteration to the next.
_CHANGED_CARRY = "is a loop carry that the loop body changes"


@register(_compat.SCAN)
def _scan(ctx, eqn, invals):
  p = _compat.eqn_params(eqn)
  nc, ncar = p["num_consts"], p["num_carry"]
  consts, carry, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
  carry = interpreter.dense_all(carry, _CHANGED_CARRY)
  scanned = []
  for v in xs:
    if is_value(v):
      per_slice = v.scan_over_axis0()
      v = per_slice if per_slice is not None else interpreter.dense(
          v, "is scanned over its axis 0, which is not a stack axis of its adapter")
    scanned.append(v)
  keys = None
  if ctx.dropout_key is not None:
    keys = jax.random.split(ctx.next_key(), p["length"])

  def step(carry, xs_key):
    xs_now, key = xs_key
    outs = interpreter.eval_jaxpr(p["jaxpr"], list(consts) + list(carry) + list(xs_now),
                                  ctx.child(key))
    return interpreter.dense_all(outs[:ncar], _CHANGED_CARRY), outs[ncar:]

  carry_out, ys = lax.scan(step, carry, (scanned, keys), length=p["length"],
                           reverse=p["reverse"], unroll=p["unroll"])
  # A weight returned per iteration (NNX scans hand back the layer state)
  # comes out stacked, and stays low-rank.
  ys = [y.stacked_on_axis0() if is_value(y) else y for y in ys]
  return list(carry_out) + ys


@register(_compat.WHILE)
def _while(ctx, eqn, invals):
  p = _compat.eqn_params(eqn)
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]

  def cond_fn(carry):
    return interpreter.eval_jaxpr(p["cond_jaxpr"], list(cconsts) + list(carry), ctx)[0]

  def body_fn(carry):
    outs = interpreter.eval_jaxpr(p["body_jaxpr"], list(bconsts) + list(carry), ctx)
    return interpreter.dense_all(outs, _CHANGED_CARRY)

  return list(lax.while_loop(cond_fn, body_fn, interpreter.dense_all(init, _CHANGED_CARRY)))


@register(_compat.COND)
def _cond(ctx, eqn, invals):
  index, *ops = invals
  index = interpreter.dense(index, "selects a lax.cond branch")
  branches = _compat.eqn_params(eqn)["branches"]

  def run(branch, keep, probe_ctx):
    def fn(*args):
      outs = interpreter.eval_jaxpr(branch, args, probe_ctx)
      return [o if keep[i] else interpreter.dense(o, "is returned by a lax.cond branch")
              for i, o in enumerate(outs)]
    return fn

  # An output stays low-rank when every branch returns a value of one
  # structure there; the branches are traced abstractly once to see.
  n_out = len(_compat.out_avals(eqn))
  everything = [True] * n_out
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    shapes = [jax.eval_shape(run(b, everything, dataclasses.replace(ctx)), *ops)
              for b in branches]
  keep = [all(is_value(s[i]) for s in shapes)
          and len({jax.tree_util.tree_structure(s[i]) for s in shapes}) == 1
          and len({tuple((l.shape, l.dtype) for l in jax.tree_util.tree_leaves(s[i]))
                   for s in shapes}) == 1
          for i in range(n_out)]
  return list(lax.switch(index, [run(b, keep, ctx) for b in branches], *ops))


@register(_compat.SHARD_MAP)
def _shard_map(ctx, eqn, invals):
  # Each adapted weight enters as its arrays, the factors sliced along the
  # weight axes they hold by W0's spec: no dense per-shard delta.
  p = _compat.eqn_params(eqn)
  specs = []
  for value, spec in zip(invals, p["in_specs"]):
    if is_value(value):
      spec = value.shard_specs(spec)
      if spec is None:
        return materialize(ctx, eqn, invals)
    specs.append(spec)

  def body(*args):
    outs = interpreter.eval_jaxpr(p["jaxpr"], args, ctx)
    return tuple(interpreter.dense_all(outs, "is returned by a shard_map"))

  f = jax.shard_map(body, mesh=p["mesh"], in_specs=tuple(specs), out_specs=p["out_specs"],
                    axis_names=p["newly_manual_axes"], check_vma=p["check_vma"])
  return list(f(*invals))


def _custom_call_parts(ctx, eqn):
  """The low-rank primal of a custom_jvp/custom_vjp call, and the original
  call on dense weights, whose own derivative rule then applies."""
  name = _compat.eqn_name(eqn)
  call_jaxpr = _compat.eqn_params(eqn)["call_jaxpr"]

  def lowrank_call(*vals):
    return interpreter.dense_all(interpreter.eval_jaxpr(call_jaxpr, vals, ctx),
                                 f"is returned by a {name} function")

  def dense_call(*vals):
    reason = f"is used by the custom derivative rule of a {name} function"
    return list(_compat.bind(eqn, interpreter.dense_all(vals, reason)))

  return lowrank_call, dense_call


@register(_compat.CUSTOM_JVP_CALL)
def _custom_jvp_call(ctx, eqn, invals):
  lowrank_call, dense_call = _custom_call_parts(ctx, eqn)
  call = jax.custom_jvp(lowrank_call)
  call.defjvp(lambda primals, tangents: jax.jvp(dense_call, primals, tangents))
  return list(call(*invals))


@register(_compat.CUSTOM_VJP_CALL)
def _custom_vjp_call(ctx, eqn, invals):
  lowrank_call, dense_call = _custom_call_parts(ctx, eqn)
  call = jax.custom_vjp(lowrank_call)
  call.defvjp(lambda *vals: jax.vjp(dense_call, *vals), lambda vjp, g: tuple(vjp(g)))
  return list(call(*invals))
