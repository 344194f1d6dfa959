"""The interpreter: evaluates a jaxpr whose inputs may be adapted values.

An equation none of whose inputs is an ``AdaptedValue`` is re-bound as it
is. One that touches a value goes to the rule registered for its primitive
(``jlora.interpret.rules``); a primitive without a rule gets the dense
weight, with a ``LoraMaterializeWarning``. Every equation is evaluated
under its own source information, so ``jax.named_scope`` names and the
user's stack frames reach the lowered program.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jlora import _compat
from jlora.errors import LoraMaterializeWarning
from jlora.interpret import rules
from jlora.interpret.values import is_value


@dataclasses.dataclass
class Context:
  """What one evaluation shares across its rules.

  Attributes:
    dropout_key: the LoRA-dropout key, or None (no dropout).
    counter: how many dropout masks were drawn, to fold into the key.
    adapter_ids: each example's adapter in a bank (or one for all), or None.
    bank_dot: how a bank computes a mixed batch (see ``bank_term``).
    examples: with per-example ids, which bank dots' inputs lead with the
      examples (``examples.ExampleAxes``), or None.
  """

  dropout_key: jax.Array | None = None
  counter: int = 0
  adapter_ids: jax.Array | None = None
  bank_dot: str = "auto"
  examples: Any = None

  def next_key(self) -> jax.Array | None:
    if self.dropout_key is None:
      return None
    self.counter += 1
    return jax.random.fold_in(self.dropout_key, self.counter)

  def child(self, key: jax.Array | None) -> "Context":
    """The context of a loop body that draws its masks from ``key``."""
    return dataclasses.replace(self, dropout_key=key, counter=0)

  def lora_dropout(self, x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout on the LoRA path's input (no-op without a key)."""
    if self.dropout_key is None or rate == 0.0:
      return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(self.next_key(), keep, x.shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def eval_jaxpr(jaxpr: Any, args: Sequence[Any], ctx: Context) -> list[Any]:
  """Evaluates a (closed) jaxpr on ``args``, any of which may be values."""
  parts = _compat.jaxpr_parts(jaxpr)
  env: dict[Any, Any] = {}

  def read(v):
    return _compat.literal_value(v) if _compat.is_literal(v) else env[v]

  for var, val in zip(parts.constvars, parts.consts):
    env[var] = val
  for var, val in zip(parts.invars, args):
    env[var] = val
  dead = _compat.last_uses(jaxpr)
  for i, eqn in enumerate(parts.eqns):
    invars, outvars = _compat.eqn_vars(eqn)
    invals = [read(v) for v in invars]
    if any(map(is_value, invals)):
      with _compat.eqn_context(eqn):
        outvals = rules.lookup(_compat.eqn_name(eqn))(ctx, eqn, invals)
    else:
      outvals = _compat.bind(eqn, invals)
    if not _compat.multiple_results(eqn):
      outvals = [outvals]
    for var, val in zip(outvars, outvals):
      if not _compat.is_drop_var(var):
        env[var] = val
    for var in dead.get(i, ()):
      env.pop(var, None)   # eager evaluation frees arrays as it goes
  return [read(v) for v in parts.outvars]


def dense(value: Any, reason: str) -> Any:
  """``value`` itself if it is an array; else its dense weight, formed for
  this use only, with a warning that names the path and the reason."""
  if not is_value(value):
    return value
  if value.warns:
    warnings.warn(
        f"jlora: '{value.path}' {reason}; W0 + s*B@A is formed for this use (correct, "
        f"but slower and with a dense temporary).", LoraMaterializeWarning, stacklevel=3)
  return value.materialize()


def dense_all(values: Sequence[Any], reason: str) -> list[Any]:
  return [dense(v, reason) for v in values]
