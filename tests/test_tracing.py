"""Tracing the wrapped function: once per structure, shapes and static args."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from reference import assert_close_forward, square_problem


def _counting(fn):
  calls = []

  def counted(*args, **kwargs):
    calls.append(1)
    return fn(*args, **kwargs)

  return counted, calls


def test_an_eager_loop_traces_once():
  frozen, trainable, x = square_problem()
  fn, calls = _counting(lambda p, x: jnp.tanh(x @ p["w"]))
  apply = jlora.lora(fn)
  outs = [apply(frozen, trainable, x + i) for i in range(4)]
  assert len(calls) == 1
  assert_close_forward(outs[2], jnp.tanh((x + 2) @ jlora.merge(frozen, trainable)["w"]))
  # New factor values (a training step) reuse the trace too.
  apply(frozen, jax.tree.map(lambda t: t * 2.0, trainable), x)
  assert len(calls) == 1


def test_new_shapes_dtypes_and_static_args_trace_again():
  frozen, trainable, x = square_problem()
  fn, calls = _counting(lambda p, x, scale=1.0: jnp.tanh(x @ p["w"]) * scale)
  apply = jlora.lora(fn)
  apply(frozen, trainable, x)
  apply(frozen, trainable, x[:2])                            # another batch size
  apply(frozen, trainable, x.astype(jnp.bfloat16))           # another dtype
  apply(frozen, trainable, x, scale=2.0)                     # another static value
  assert len(calls) == 4
  y = apply(frozen, trainable, x, scale=2.0)
  assert len(calls) == 4
  assert_close_forward(y, 2.0 * jnp.tanh(x @ jlora.merge(frozen, trainable)["w"]))


def test_an_unhashable_static_argument_is_traced_each_call():
  frozen, trainable, x = square_problem()
  fn, calls = _counting(lambda p, x, opts: jnp.tanh(x @ p["w"]) * opts["scale"][0])
  apply = jlora.lora(fn)

  class Options(dict):   # a pytree leaf that cannot be hashed
    __hash__ = None

  for scale in (1.0, 3.0):
    y = apply(frozen, trainable, x, Options(scale=[scale]))
    assert_close_forward(y, scale * jnp.tanh(x @ jlora.merge(frozen, trainable)["w"]))
  assert len(calls) == 2


def test_under_jit_the_trace_is_shared_across_retraces():
  frozen, trainable, x = square_problem()
  fn, calls = _counting(lambda p, x: jnp.tanh(x @ p["w"]))
  apply = jlora.lora(fn)
  step = jax.jit(lambda t, x: jnp.sum(apply(frozen, t, x)))
  grad = jax.jit(jax.grad(lambda t, x: jnp.sum(apply(frozen, t, x))))
  step(trainable, x)
  grad(trainable, x)
  assert len(calls) == 1


@pytest.mark.parametrize("flag", [np.bool_(True), np.bool_(False)])
def test_a_numpy_bool_flag_is_static(flag):
  """The model branches on it in Python, as it can with the plain params."""
  frozen, trainable, x = square_problem()
  fn = lambda p, x, train: x @ p["w"] if train else -(x @ p["w"])
  merged = jlora.merge(frozen, trainable)
  got = jlora.lora(fn)(frozen, trainable, x, flag)
  assert_close_forward(got, fn(merged, x, flag))
