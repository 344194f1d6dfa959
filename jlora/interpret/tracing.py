"""Tracing ``fn(params, *args, **kwargs)`` to a jaxpr, and a cache of traces.

The parameter leaves and the array arguments are the jaxpr's inputs;
anything else (Python numbers, strings, ``train=True``) is static, a Python
constant inside ``fn``, as ``jax.jit``'s ``static_argnames`` would make it.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import numpy as np

from jlora import _compat
from jlora._paths import is_weight_node
from jlora.errors import LoraTreeError


def _is_traced_arg(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) or (
      isinstance(x, np.generic) and not isinstance(x, np.bool_))


def _is_param_value(x: Any) -> bool:
  if isinstance(x, (bool, int, float, complex)) or hasattr(x, "__jax_array__"):
    return True
  if not isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)):
    return False
  # (bfloat16 and the float8 types are of kind "V": only text and objects are refused)
  return np.dtype(x.dtype).kind not in "OSU" if isinstance(x.dtype, np.dtype) else True


def check_param_leaves(pairs: Iterable[tuple[str, Any]]) -> None:
  """Raises LoraTreeError naming the first ``(path, leaf)`` whose leaf JAX
  cannot trace as an input (a string, an object, an array of strings); None
  leaves and weight nodes (an ``NF4Array``) are fine."""
  for path, leaf in pairs:
    if leaf is None or is_weight_node(leaf) or _is_param_value(leaf):
      continue
    what = type(leaf).__name__
    if isinstance(leaf, (np.ndarray, np.generic)):
      what += f" of dtype {leaf.dtype}"
    shown = repr(leaf)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise LoraTreeError(f"'{path}': a parameter leaf must be a numeric array or number, got "
                        f"{what} {' '.join(shown.split())}; keep other values out of the "
                        f"parameter tree (pass them as arguments, or close over them)")


class Traced(NamedTuple):
  """A traced function.

  Attributes:
    jaxpr: the closed jaxpr; its inputs are the present parameter leaves,
      then the traced arguments.
    out_tree: the treedef of ``fn``'s output.
    present: the indices of the parameter leaves that are inputs (not None).
    dyn_index: the indices, among the flattened ``(args, kwargs)`` leaves,
      of the traced arguments.
  """

  jaxpr: Any
  out_tree: Any
  present: list[int]
  dyn_index: list[int]


def _split_args(args: tuple, kwargs: dict):
  arg_leaves, arg_tree = jax.tree_util.tree_flatten((args, kwargs))
  dyn_index = [i for i, leaf in enumerate(arg_leaves) if _is_traced_arg(leaf)]
  return arg_leaves, arg_tree, dyn_index


def dynamic_args(args: tuple, kwargs: dict) -> list[Any]:
  """The traced arguments, in the order the jaxpr takes them."""
  arg_leaves, _, dyn_index = _split_args(args, kwargs)
  return [arg_leaves[i] for i in dyn_index]


def trace(fn: Callable[..., Any], param_leaves: Sequence[Any], params_tree: Any,
          args: tuple, kwargs: dict, *, abstract: bool = False) -> Traced:
  """Traces ``fn(params, *args, **kwargs)``.

  Args:
    fn: the function.
    param_leaves: the parameter tree's leaves, None where the tree has None.
    params_tree: the treedef that rebuilds the tree from ``param_leaves``.
    args, kwargs: the other arguments.
    abstract: trace from shapes and dtypes only.
  """
  present = [i for i, leaf in enumerate(param_leaves) if leaf is not None]
  arg_leaves, arg_tree, dyn_index = _split_args(args, kwargs)

  def flat_fn(param_arrays, dyn_args):
    leaves = list(param_leaves)
    for i, arr in zip(present, param_arrays):
      leaves[i] = arr
    a_leaves = list(arg_leaves)
    for i, arr in zip(dyn_index, dyn_args):
      a_leaves[i] = arr
    call_args, call_kwargs = jax.tree_util.tree_unflatten(arg_tree, a_leaves)
    return fn(jax.tree_util.tree_unflatten(params_tree, leaves), *call_args, **call_kwargs)

  param_arrays = [param_leaves[i] for i in present]
  dyn_args = [arg_leaves[i] for i in dyn_index]
  if abstract:
    to_abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
    param_arrays = [to_abstract(x) for x in param_arrays]
    dyn_args = [to_abstract(x) for x in dyn_args]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(param_arrays, dyn_args)
  return Traced(closed, jax.tree_util.tree_structure(out_shape), present, dyn_index)


def _aval_key(x: Any) -> Any:
  return _compat.aval(x)


class TraceCache:
  """Traces of one function, keyed by everything a trace depends on.

  The key holds the parameter tree's structure, the shapes and dtypes of its
  leaves and of the array arguments, the static arguments (which must be
  hashable; a call with an unhashable one is traced afresh), and JAX's
  trace-affecting settings. So an eager training loop traces its model
  once, as ``jax.jit`` would. A trace whose constants are tracers of an
  enclosing transformation is never kept.
  """

  def __init__(self, fn: Callable[..., Any], maxsize: int = 64):
    self._fn = fn
    self._maxsize = maxsize
    self._entries: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def __call__(self, param_leaves: Sequence[Any], params_tree: Any, args: tuple,
               kwargs: dict) -> Traced:
    key = self._key(param_leaves, params_tree, args, kwargs)
    if key is not None:
      with self._lock:
        hit = self._entries.get(key)
        if hit is not None:
          self._entries.move_to_end(key)
          return hit
    traced = trace(self._fn, param_leaves, params_tree, args, kwargs)
    consts = _compat.jaxpr_parts(traced.jaxpr).consts
    if key is not None and not any(map(_compat.is_tracer, consts)):
      with self._lock:
        self._entries[key] = traced
        while len(self._entries) > self._maxsize:
          self._entries.popitem(last=False)
    return traced

  def __len__(self) -> int:
    return len(self._entries)

  @staticmethod
  def _key(param_leaves, params_tree, args, kwargs) -> Any:
    arg_leaves, arg_tree, dyn_index = _split_args(args, kwargs)
    dyn = set(dyn_index)
    try:
      key = (params_tree,
             tuple(None if leaf is None else _aval_key(leaf) for leaf in param_leaves),
             arg_tree,
             tuple(_aval_key(leaf) if i in dyn else ("static", type(leaf), leaf)
                   for i, leaf in enumerate(arg_leaves)),
             _compat.trace_context())
      hash(key)
    except TypeError:   # an unhashable static argument: no caching
      return None
    return key
