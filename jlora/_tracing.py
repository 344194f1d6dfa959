"""Tracing ``fn(params, *args, **kwargs)`` to a jaxpr over its array leaves."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np


def _is_traced_arg(x: Any) -> bool:
  # Arrays are traced; anything else (Python numbers, strings, `train=True`)
  # stays static, as it would be a Python constant inside `fn`.
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def trace(fn: Callable[..., Any], param_leaves: Sequence[Any], params_tree: Any,
          args: tuple, kwargs: dict, *, abstract: bool = False):
  """Traces ``fn`` with the non-None parameter leaves and the array arguments
  as the jaxpr's inputs, in that order.

  Args:
    fn: the function, called as ``fn(params, *args, **kwargs)``.
    param_leaves: the parameter tree's leaves, None where the tree has None.
    params_tree: the treedef that rebuilds the tree from ``param_leaves``.
    args, kwargs: the other arguments.
    abstract: trace from shapes and dtypes only (nothing is computed).

  Returns:
    ``(closed_jaxpr, out_tree, present, dyn_args)``: the indices of the
    parameter leaves that are jaxpr inputs, and the array arguments that
    follow them.
  """
  present = [i for i, leaf in enumerate(param_leaves) if leaf is not None]
  arg_leaves, arg_tree = jax.tree_util.tree_flatten((args, kwargs))
  dyn_idx = [i for i, leaf in enumerate(arg_leaves) if _is_traced_arg(leaf)]

  def flat_fn(param_arrays, dyn_args):
    leaves = list(param_leaves)
    for i, arr in zip(present, param_arrays):
      leaves[i] = arr
    a_leaves = list(arg_leaves)
    for i, arr in zip(dyn_idx, dyn_args):
      a_leaves[i] = arr
    call_args, call_kwargs = jax.tree_util.tree_unflatten(arg_tree, a_leaves)
    return fn(jax.tree_util.tree_unflatten(params_tree, leaves), *call_args, **call_kwargs)

  param_arrays = [param_leaves[i] for i in present]
  dyn_args = [arg_leaves[i] for i in dyn_idx]
  if abstract:
    to_abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    param_arrays, dyn_args = map(to_abstract, param_arrays), map(to_abstract, dyn_args)
    param_arrays, dyn_args = list(param_arrays), list(dyn_args)
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(param_arrays, dyn_args)
  return closed, jax.tree_util.tree_structure(out_shape), present, dyn_args
