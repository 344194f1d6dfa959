"""The one module that touches JAX internals.

The interpreter reads jaxprs and re-binds their equations, which needs a few
things JAX does not promise to keep stable: the jaxpr classes of
``jax.extend.core``, an equation's context and source information, its bind
parameters, and the names and parameters of primitives. Everything of that
kind goes through here, so that a JAX upgrade is one file's change.

Supported: the JAX version in ``pyproject.toml``'s floor and later ones the
CI has run (see the README).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, NamedTuple, Sequence

import jax
from jax._src import config as _jax_config
from jax._src import source_info_util as _source_info
from jax.extend import core as _core

ClosedJaxpr = _core.ClosedJaxpr
Jaxpr = _core.Jaxpr

# Primitive names as this JAX spells them. A rule is registered under these
# names only, so a typo or a renamed primitive shows up in one place.
DOT_GENERAL = "dot_general"
CONVERT_ELEMENT_TYPE = "convert_element_type"
REDUCE_PRECISION = "reduce_precision"
COPY = "copy"
TRANSPOSE = "transpose"
RESHAPE = "reshape"
SQUEEZE = "squeeze"
SLICE = "slice"
DYNAMIC_SLICE = "dynamic_slice"
GATHER = "gather"
CONV = "conv_general_dilated"
RAGGED_DOT = "ragged_dot_general"
SHARD_MAP = "shard_map"
PVARY = "pvary"
SPLIT = "split"
SHARDING_CONSTRAINT = "sharding_constraint"
OPTIMIZATION_BARRIER = "optimization_barrier"
JIT = "jit"
CLOSED_CALL = "closed_call"
REMAT = "remat2"
SCAN = "scan"
COND = "cond"
WHILE = "while"
CUSTOM_JVP_CALL = "custom_jvp_call"
CUSTOM_VJP_CALL = "custom_vjp_call"


def is_literal(atom: Any) -> bool:
  return isinstance(atom, _core.Literal)


def literal_value(atom: Any) -> Any:
  return atom.val


def is_drop_var(var: Any) -> bool:
  return isinstance(var, _core.DropVar)


def open_jaxpr(jaxpr: Any) -> tuple[Any, Sequence[Any]]:
  """``(jaxpr, consts)`` of a closed or open jaxpr."""
  if isinstance(jaxpr, _core.ClosedJaxpr):
    return jaxpr.jaxpr, jaxpr.consts
  return jaxpr, ()


class JaxprParts(NamedTuple):
  constvars: Sequence[Any]
  invars: Sequence[Any]
  eqns: Sequence[Any]
  outvars: Sequence[Any]
  consts: Sequence[Any]


def jaxpr_parts(jaxpr: Any) -> JaxprParts:
  """The variables, equations and constants of a closed or open jaxpr."""
  open_, consts = open_jaxpr(jaxpr)
  return JaxprParts(open_.constvars, open_.invars, open_.eqns, open_.outvars, consts)


def eqn_vars(eqn: Any) -> tuple[Sequence[Any], Sequence[Any]]:
  """``(invars, outvars)`` of an equation."""
  return eqn.invars, eqn.outvars


def eqn_name(eqn: Any) -> str:
  return eqn.primitive.name


def eqn_params(eqn: Any) -> dict[str, Any]:
  return eqn.params


def multiple_results(eqn: Any) -> bool:
  return eqn.primitive.multiple_results


def out_avals(eqn: Any) -> list[Any]:
  return [v.aval for v in eqn.outvars]


def in_avals(eqn: Any) -> list[Any]:
  return [v.aval for v in eqn.invars]


@contextlib.contextmanager
def eqn_context(eqn: Any) -> Iterator[None]:
  """Binds as the equation itself was bound: its ``named_scope`` names, the
  user's stack frame, and its context (mesh, compute type).

  Everything a rule emits for the equation inherits its source information,
  so profiles and the lowered program keep the model's scope names.
  """
  name_stack = _source_info.current_name_stack() + eqn.source_info.name_stack
  with (_source_info.user_context(eqn.source_info.traceback, name_stack=name_stack),
        eqn.ctx.manager):
    yield


def bind(eqn: Any, invals: Sequence[Any]) -> Any:
  """Re-binds ``eqn`` on new inputs, under its source information."""
  with eqn_context(eqn):
    return rebind(eqn, invals)


def rebind(eqn: Any, invals: Sequence[Any]) -> Any:
  """Re-binds ``eqn`` on new inputs; for a rule, which already runs under the
  equation's ``eqn_context``."""
  return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))


def trace_context() -> Any:
  """A hashable key of the JAX settings that change what a trace produces
  (x64, default matmul precision, ...), as ``jax.jit`` keys its own cache."""
  return _jax_config.trace_context()


def aval(x: Any) -> Any:
  """The abstract value of an array, tracer or ShapeDtypeStruct: shape,
  dtype, weak type and sharding, hashable."""
  return jax.typeof(x)


def is_tracer(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def last_uses(jaxpr: Any) -> dict[int, list[Any]]:
  """For each equation index, the variables whose last use it is, so an
  eager evaluation can drop them (as ``jax.core.eval_jaxpr`` does)."""
  jaxpr, _ = open_jaxpr(jaxpr)
  last: dict[Any, int] = {}
  outs = {v for v in jaxpr.outvars if not is_literal(v)}
  for i, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if not is_literal(v):
        last[v] = i
  by_eqn: dict[int, list[Any]] = {}
  for v, i in last.items():
    if v not in outs:
      by_eqn.setdefault(i, []).append(v)
  return by_eqn


def distributed_state() -> tuple[Any, int, int]:
  """``(client, process_index, process_count)`` of ``jax.distributed``,
  without starting a backend: ``(None, 0, 1)`` when it was not initialised
  (one process). The client has ``key_value_set``,
  ``blocking_key_value_get`` and ``wait_at_barrier``, with timeouts."""
  from jax._src import distributed
  state = distributed.global_state
  if state.client is None:
    return None, 0, 1
  return state.client, int(state.process_id or 0), int(state.num_processes or 1)
