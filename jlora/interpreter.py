"""``jlora.lora``: the LoRA transformation of any JAX function.

The wrapped function is traced to a jaxpr with each frozen weight W0 in its
place; the jaxpr is then evaluated by the interpreter below, which carries a
LoraValue (W0, A, B, scale) wherever an adapted weight flows:

* ``dot_general`` computes ``x W0 + s (x A) B`` and never forms W0 + s B A;
* casts, transposes, reshapes, slices and sharding constraints stay lazy;
* higher-order primitives (jit, scan, remat, cond, while, custom_jvp,
  custom_vjp) are re-entered through the public ``jax.lax`` APIs;
* any other use materialises ``W0 + s B A`` for that use only, with a
  warning naming the parameter and the primitive.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from jlora.errors import LoraLayoutError, LoraMaterializeWarning
from jlora._lowrank import lora_matmul
from jlora._tracing import trace
from jlora._value import LoraValue
from jlora.transform import assemble
from jlora.layout import Layout


@dataclasses.dataclass
class _Context:
  dropout_key: jax.Array | None
  counter: int = 0

  def next_key(self) -> jax.Array | None:
    if self.dropout_key is None:
      return None
    self.counter += 1
    return jax.random.fold_in(self.dropout_key, self.counter)

  def child(self, key: jax.Array | None) -> "_Context":
    return _Context(key)


# -- evaluation ----------------------------------------------------------------


def _closed(jaxpr) -> tuple[Any, Sequence[Any]]:
  if isinstance(jaxpr, jcore.ClosedJaxpr):
    return jaxpr.jaxpr, jaxpr.consts
  return jaxpr, ()


def _is_lora(x: Any) -> bool:
  return isinstance(x, LoraValue)


def eval_jaxpr(jaxpr, args: Sequence[Any], ctx: _Context) -> list[Any]:
  """Evaluates a (closed) jaxpr whose inputs may be LoraValues."""
  jaxpr, consts = _closed(jaxpr)
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if any(map(_is_lora, invals)):
      rule = _RULES.get(eqn.primitive.name, _materialize_rule)
      outvals = rule(ctx, eqn, invals)
    else:
      outvals = _bind(eqn, invals)
    if not eqn.primitive.multiple_results:
      outvals = [outvals]
    for var, val in zip(eqn.outvars, outvals):
      if not isinstance(var, jcore.DropVar):
        env[var] = val
  return [read(v) for v in jaxpr.outvars]


def _bind(eqn, invals):
  with eqn.ctx.manager:
    return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))


def _dense(x: Any, primitive: str) -> Any:
  if not _is_lora(x):
    return x
  warnings.warn(
      f"jlora: '{x.path}' is used by '{primitive}', which has no low-rank rule; "
      f"W0 + s*B@A is formed for this use (correct, but slower and with a dense "
      f"temporary).", LoraMaterializeWarning, stacklevel=2)
  return x.materialize()


def _dense_all(values: Sequence[Any], primitive: str) -> list[Any]:
  return [_dense(v, primitive) for v in values]


def _materialize_rule(ctx, eqn, invals):
  del ctx
  return _bind(eqn, _dense_all(invals, eqn.primitive.name))


# -- lazy structural ops ---------------------------------------------------------


def _convert_rule(ctx, eqn, invals):
  (x,) = invals
  new_dtype = eqn.params["new_dtype"]
  if not jnp.issubdtype(new_dtype, jnp.floating):
    return _materialize_rule(ctx, eqn, invals)
  return x.replace(dtype=jnp.dtype(new_dtype))


def _identity_rule(ctx, eqn, invals):
  del ctx, eqn
  return invals[0]


def _transpose_rule(ctx, eqn, invals):
  del ctx
  return invals[0].transpose(eqn.params["permutation"])


def _reshape_rule(ctx, eqn, invals):
  x = invals[0]
  if eqn.params.get("dimensions") is None and len(invals) == 1:
    out = x.reshape(eqn.params["new_sizes"])
    if out is not None:
      return out
  return _materialize_rule(ctx, eqn, invals)


def _squeeze_rule(ctx, eqn, invals):
  out = invals[0].squeeze(eqn.params["dimensions"])
  return _materialize_rule(ctx, eqn, invals) if out is None else out


def _slice_rule(ctx, eqn, invals):
  del ctx
  start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
  strides = eqn.params["strides"] or (1,) * len(start)

  def slicer(arr, axis_map):
    s, l, st = [0] * arr.ndim, list(arr.shape), [1] * arr.ndim
    for k, axis in axis_map.items():
      s[k], l[k], st[k] = start[axis], limit[axis], strides[axis]
    return lax.slice(arr, s, l, st)

  return invals[0].slice_axes(slicer)


def _split_rule(ctx, eqn, invals):
  # A fused qkv kernel split into its parts: each part is a slice of W0 and
  # of the factor that holds the split axis.
  del ctx
  axis, sizes = eqn.params["axis"], eqn.params["sizes"]
  outs, start = [], 0
  for size in sizes:
    def slicer(arr, axis_map, start=start, size=size):
      for k, weight_axis in axis_map.items():
        if weight_axis == axis:
          return lax.slice_in_dim(arr, start, start + size, axis=k)
      return arr
    outs.append(invals[0].slice_axes(slicer))
    start += size
  return outs


def _dynamic_slice_rule(ctx, eqn, invals):
  x, *starts = invals
  if any(map(_is_lora, starts)):
    return _materialize_rule(ctx, eqn, invals)
  sizes = eqn.params["slice_sizes"]

  def slicer(arr, axis_map):
    zero = jnp.zeros((), jnp.int32)
    s = [zero] * arr.ndim
    z = list(arr.shape)
    for k, axis in axis_map.items():
      s[k], z[k] = starts[axis], sizes[axis]
    return lax.dynamic_slice(arr, s, z)

  return x.slice_axes(slicer)


def _sharding_constraint_rule(ctx, eqn, invals):
  del ctx
  x = invals[0]
  # The constraint describes W's layout; W0 takes it, the factors follow it
  # through the shardings lora_transform derived for them.
  return x.replace(w0=_bind(eqn, [x.w0]))


# -- dot_general ---------------------------------------------------------------


def _dropout(ctx: _Context, x: jax.Array, rate: float) -> jax.Array:
  if ctx.dropout_key is None or rate == 0.0:
    return x
  key = ctx.next_key()
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, x.shape)
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def _dot_rule(ctx, eqn, invals):
  lhs, rhs = invals
  if _is_lora(lhs) and _is_lora(rhs):
    lhs = _dense(lhs, "dot_general of two adapted weights")
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  w_is_rhs = _is_lora(rhs)
  w, x = (rhs, lhs) if w_is_rhs else (lhs, rhs)
  wc, xc, wb, xb = (rc, lc, rb, lb) if w_is_rhs else (lc, rc, lb, rb)
  wf = tuple(i for i in range(w.ndim) if i not in wc and i not in wb)
  lay = w.layout
  if (set(wc) != set(lay.in_axes) or set(wb) != set(lay.stack_axes)
      or set(wf) != set(lay.out_axes)):
    raise LoraLayoutError(
        f"'{w.path}': the model contracts this weight (shape {w.shape}) over "
        f"axes {tuple(wc)} with batch axes {tuple(wb)}, but its LoRA factors "
        f"were laid out for input axes {lay.in_axes}, output axes "
        f"{lay.out_axes} and stack axes {lay.stack_axes}. Build the adapter "
        f"with layouts=jlora.infer_layouts(fn, params, ...) or give "
        f"LoraSpec(layouts={{...}}) for this path.")
  out_aval = eqn.outvars[0].aval
  x_lora = _dropout(ctx, x, w.dropout)
  if not wb:
    y = _dot_unbatched(x, x_lora, w, xc, wc, w_is_rhs, eqn.params, out_aval.dtype)
  else:
    y = _dot_general_lowrank(x, x_lora, w, (xc, wc), (xb, wb), w_is_rhs, eqn.params,
                             out_aval.dtype)
  return y


def _dot_unbatched(x, x_lora, w: LoraValue, xc, wc, w_is_rhs, params, out_dtype):
  """No batch axes: flatten to one (M, K) @ (K, N) LoRA matmul."""
  lay = w.layout
  pair = dict(zip(wc, xc))
  x_contract = [pair[i] for i in lay.in_axes]          # in A's order
  x_free = [i for i in range(x.ndim) if i not in xc]
  m_shape = [x.shape[i] for i in x_free]
  k = math.prod(w.shape[i] for i in lay.in_axes)
  n_shape = [w.shape[i] for i in lay.out_axes]
  perm_x = x_free + x_contract

  def as_matrix(v):
    return jnp.transpose(v, perm_x).reshape(math.prod(m_shape), k)

  w0 = jnp.transpose(w.w0.astype(w.dtype), lay.in_axes + lay.out_axes).reshape(k, -1)
  a = w.a.reshape(k, -1)
  b = w.b.reshape(w.b.shape[0], -1)
  pet = params.get("preferred_element_type") or out_dtype
  x2 = as_matrix(x)
  x2_lora = x2 if x_lora is x else as_matrix(x_lora)
  y = lora_matmul(x2, x2_lora, w0, a, b, w.scale, jnp.dtype(pet))
  y = y.reshape(m_shape + n_shape).astype(out_dtype)
  # dot_general puts W's free axes in increasing order; B has them in its own.
  nm = len(m_shape)
  out_sorted = sorted(lay.out_axes)
  w_positions = [nm + lay.out_axes.index(i) for i in out_sorted]
  if w_is_rhs:
    order = list(range(nm)) + w_positions
  else:
    order = w_positions + list(range(nm))
  return jnp.transpose(y, order) if order != list(range(y.ndim)) else y


def _contract(x, x_labels, f, f_labels, keep):
  """One dot_general step of a labelled contraction; returns (result, labels)."""
  common = [l for l in x_labels if l in f_labels]
  batch = [l for l in common if l in keep]
  contract = [l for l in common if l not in keep]
  dims = (([x_labels.index(l) for l in contract], [f_labels.index(l) for l in contract]),
          ([x_labels.index(l) for l in batch], [f_labels.index(l) for l in batch]))
  out = lax.dot_general(x, f, dims)
  labels = (batch + [l for l in x_labels if l not in common]
            + [l for l in f_labels if l not in common])
  return out, labels


def _dot_general_lowrank(x, x_lora, w: LoraValue, contracting, batch, w_is_rhs, params,
                         out_dtype):
  """The general case (batch/stack axes): base dot plus two labelled dots."""
  (xc, wc), (xb, wb) = contracting, batch
  x_labels = [f"x{i}" for i in range(x.ndim)]
  w_labels = [f"w{i}" for i in range(w.ndim)]
  for i, j in zip(xc, wc):
    w_labels[j] = x_labels[i]
  for i, j in zip(xb, wb):
    w_labels[j] = x_labels[i]
  lay = w.layout
  a_labels = [w_labels[i] for i in lay.stack_axes + lay.in_axes] + ["r"]
  b_labels = [w_labels[i] for i in lay.stack_axes] + ["r"] + [w_labels[i] for i in lay.out_axes]
  batch_labels = [x_labels[i] for i in xb]
  x_free = [x_labels[i] for i in range(x.ndim) if i not in xc and i not in xb]
  w_free = [w_labels[i] for i in range(w.ndim) if i not in wc and i not in wb]
  out_labels = batch_labels + (x_free + w_free if w_is_rhs else w_free + x_free)

  w0 = w.w0.astype(w.dtype)
  dims = ((xc, wc), (xb, wb)) if w_is_rhs else ((wc, xc), (wb, xb))
  operands = (x, w0) if w_is_rhs else (w0, x)
  base = lax.dot_general(*operands, dims, precision=params.get("precision"),
                         preferred_element_type=params.get("preferred_element_type"))
  t, t_labels = _contract(x_lora.astype(w.a.dtype), x_labels, w.a, a_labels,
                          keep=set(out_labels) | set(b_labels))
  low, low_labels = _contract(t, t_labels, w.b, b_labels, keep=set(out_labels))
  low = jnp.transpose(low, [low_labels.index(l) for l in out_labels])
  low = low * jnp.asarray(w.scale, low.dtype)
  return (base + low.astype(base.dtype)).astype(out_dtype)


# -- higher-order primitives -------------------------------------------------------


def _call_rule(ctx, eqn, invals):
  """jit / pjit / closed_call: inline the inner jaxpr."""
  inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  return _dense_all(eval_jaxpr(inner, invals, ctx), eqn.primitive.name)


def _remat_rule(ctx, eqn, invals):
  inner = eqn.params["jaxpr"]

  def body(*args):
    return _dense_all(eval_jaxpr(inner, args, ctx), "remat")

  fn = jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True),
                      policy=eqn.params.get("policy"))
  return list(fn(*invals))


def _unstack(v: LoraValue) -> LoraValue | None:
  """The per-iteration view of a weight scanned over its axis 0, or None."""
  lay = v.layout
  if not lay.stack_axes or lay.stack_axes[0] != 0:
    return None
  dec = lambda axes: tuple(a - 1 for a in axes)
  return v.replace(w0=None, a=None, b=None,
                   layout=Layout(dec(lay.in_axes), dec(lay.out_axes), dec(lay.stack_axes[1:])))


def _scan_rule(ctx, eqn, invals):
  p = eqn.params
  nc, ncar = p["num_consts"], p["num_carry"]
  consts = invals[:nc]
  carry = _dense_all(invals[nc:nc + ncar], "scan carry")
  xs, templates = [], []
  for v in invals[nc + ncar:]:
    tmpl = _unstack(v) if _is_lora(v) else None
    if _is_lora(v) and tmpl is None:
      v = _dense(v, "scan over a non-stack axis")
    templates.append(tmpl)
    xs.append((v.w0, v.a, v.b) if tmpl is not None else v)
  keys = None
  if ctx.dropout_key is not None:
    keys = jax.random.split(ctx.next_key(), p["length"])

  def body(carry, scanned):
    xs_now, key = scanned
    xs_vals = [t.replace(w0=x[0], a=x[1], b=x[2]) if t is not None else x
               for t, x in zip(templates, xs_now)]
    outs = eval_jaxpr(p["jaxpr"], list(consts) + list(carry) + xs_vals, ctx.child(key))
    outs = _dense_all(outs, "scan")
    return outs[:ncar], outs[ncar:]

  carry_out, ys = lax.scan(body, carry, (xs, keys), length=p["length"],
                           reverse=p["reverse"], unroll=p["unroll"])
  return list(carry_out) + list(ys)


def _cond_rule(ctx, eqn, invals):
  index, *ops = invals
  index = _dense(index, "cond")

  def branch_fn(branch):
    return lambda *args: _dense_all(eval_jaxpr(branch, args, ctx), "cond")

  return list(lax.switch(index, [branch_fn(b) for b in eqn.params["branches"]], *ops))


def _while_rule(ctx, eqn, invals):
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts = invals[:cn], invals[cn:cn + bn]
  init = _dense_all(invals[cn + bn:], "while carry")

  def cond_fn(carry):
    return eval_jaxpr(p["cond_jaxpr"], list(cconsts) + list(carry), ctx)[0]

  def body_fn(carry):
    return _dense_all(eval_jaxpr(p["body_jaxpr"], list(bconsts) + list(carry), ctx), "while")

  return list(lax.while_loop(cond_fn, body_fn, init))


def _custom_call_parts(ctx, eqn, invals):
  """The flat inputs of a custom_jvp/custom_vjp call with adapted weights, its
  low-rank primal, and the original call on dense weights (whose own
  derivative rule then applies)."""
  flat, tree = jax.tree_util.tree_flatten(invals)
  name = eqn.primitive.name

  def lowrank_call(*leaves):
    vals = jax.tree_util.tree_unflatten(tree, leaves)
    return _dense_all(eval_jaxpr(eqn.params["call_jaxpr"], vals, ctx), name)

  def dense_call(*leaves):
    vals = jax.tree_util.tree_unflatten(tree, leaves)
    return list(_bind(eqn, _dense_all(vals, f"{name} (its custom derivative rule)")))

  return flat, lowrank_call, dense_call


def _custom_jvp_rule(ctx, eqn, invals):
  flat, lowrank_call, dense_call = _custom_call_parts(ctx, eqn, invals)
  call = jax.custom_jvp(lowrank_call)
  call.defjvp(lambda primals, tangents: jax.jvp(dense_call, primals, tangents))
  return list(call(*flat))


def _custom_vjp_rule(ctx, eqn, invals):
  flat, lowrank_call, dense_call = _custom_call_parts(ctx, eqn, invals)
  call = jax.custom_vjp(lowrank_call)
  call.defvjp(lambda *leaves: jax.vjp(dense_call, *leaves), lambda vjp, g: tuple(vjp(g)))
  return list(call(*flat))


_RULES: dict[str, Callable] = {
    "dot_general": _dot_rule,
    "convert_element_type": _convert_rule,
    "copy": _identity_rule,
    "copy_p": _identity_rule,
    "optimization_barrier": _materialize_rule,
    "transpose": _transpose_rule,
    "reshape": _reshape_rule,
    "squeeze": _squeeze_rule,
    "slice": _slice_rule,
    "split": _split_rule,
    "dynamic_slice": _dynamic_slice_rule,
    "sharding_constraint": _sharding_constraint_rule,
    "jit": _call_rule,
    "pjit": _call_rule,
    "closed_call": _call_rule,
    "core_call": _call_rule,
    "remat2": _remat_rule,
    "checkpoint": _remat_rule,
    "scan": _scan_rule,
    "cond": _cond_rule,
    "while": _while_rule,
    "custom_jvp_call": _custom_jvp_rule,
    "custom_vjp_call": _custom_vjp_rule,
}


# -- the public transform ---------------------------------------------------------



def lora(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Transforms ``fn(params, *args, **kwargs)`` into ``fn(frozen, trainable, ...)``.

  The returned function computes what ``fn`` computes with every adapted
  weight replaced by ``W0 + s B A``, but without forming that sum: each
  matmul against an adapted weight becomes ``x W0 + s (x A) B``. It composes
  with ``jax.jit``, ``jax.grad``, ``jax.vmap`` and ``jax.value_and_grad``,
  and gradients never flow to W0.

  Array arguments (``jax.Array``, NumPy arrays) are traced; every other
  argument (Python numbers, strings, ``train=True``) is treated as static.

  Args:
    fn: a function whose first argument is the parameter pytree, such as a
      Flax Linen ``model.apply``.

  Returns:
    ``apply(frozen, trainable, *args, lora_dropout_key=None, **kwargs)``.
    Passing ``lora_dropout_key`` (a PRNG key) turns on the spec's LoRA
    dropout.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"w": jnp.ones((4, 3))}
    >>> spec = jlora.LoraSpec(rank=2, alpha=2, targets=["w"])
    >>> frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
    >>> apply = jlora.lora(lambda p, x: x @ p["w"])
    >>> apply(frozen, trainable, jnp.ones((1, 4))).shape
    (1, 3)
  """

  @functools.wraps(fn)
  def wrapped(frozen, trainable, *args, lora_dropout_key=None, **kwargs):
    params_leaves, params_tree, adapters = assemble(frozen, trainable)
    closed, out_tree, present, dyn_args = trace(fn, params_leaves, params_tree, args, kwargs)
    invals = []
    for i in present:
      if i not in adapters:
        invals.append(params_leaves[i])
      else:
        path, lp = adapters[i]
        w0 = params_leaves[i]
        invals.append(LoraValue(w0=w0, a=lp.a, b=lp.b, scale=lp.scale, layout=lp.layout,
                                dropout=lp.dropout, dtype=jnp.dtype(w0.dtype), path=path))
    ctx = _Context(dropout_key=lora_dropout_key)
    outs = eval_jaxpr(closed, invals + dyn_args, ctx)
    outs = _dense_all(outs, "output of the transformed function")
    return jax.tree_util.tree_unflatten(out_tree, outs)

  return wrapped
