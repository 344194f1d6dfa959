"""DoRA: the transformed forward equals the merged DoRA model, its gradients
equal those of the dense form with the column norm held constant (as PEFT
does), and the compiled step forms no weight-sized temporary."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.adapters.dora import column_norm, to_weight_axes
from models import LinenLM, LMConfig
from reference import (JIT, NoMaterialize, assert_close_forward, assert_close_grads,
                       loss_of, max_abs_diff, normal, perturb)


def dense_dora(frozen, trainable):
  """The reference: W' = m (W0 + s B A) / ||W0 + s B A||, the norm held constant."""
  def one(w0, t):
    if not isinstance(t, jlora.DoraParam):
      return w0 if t is None else t
    v = w0 + jlora.LoraParam(t.a, t.b, t.scale, t.layout).delta()
    norm = jax.lax.stop_gradient(column_norm(v, t.layout, keepdims=True))
    return v * to_weight_axes(t.magnitude, t.layout) / norm
  is_leaf = lambda x: x is None or isinstance(x, jlora.DoraParam)  # noqa: E731
  return jax.tree_util.tree_map(one, frozen, trainable, is_leaf=is_leaf)


def _moved(trainable, seed):
  """B non-zero and the magnitude moved off W0's norms."""
  t = perturb(trainable, seed)
  return jax.tree_util.tree_map(lambda x: x * (1.0 + 0.2 * jnp.cos(
      jnp.arange(x.size, dtype=x.dtype).reshape(x.shape))), t)


@functools.lru_cache
def linen_case():
  cfg = LMConfig(vocab=64, d_model=32, heads=4, layers=2, mlp=64, seq=16)
  model = LinenLM(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens)
  layouts = jlora.infer_layouts(model.apply, params, tokens)
  spec = jlora.LoraSpec(rank=4, alpha=8, use_dora=True,
                        targets=r".*(query|out|up|down)/kernel|params/lm_head/kernel")
  frozen, t0 = jlora.lora_transform(params, spec, key=jax.random.key(0), layouts=layouts)
  return model.apply, params, frozen, t0, (tokens,)


@functools.lru_cache
def mlp_case():
  params = {"fc1": normal((12, 16), 0.3, seed=1), "fc2": normal((16, 6), 0.3, seed=2)}
  fn = lambda p, x: jnp.tanh(x @ p["fc1"]) @ p["fc2"]  # noqa: E731
  spec = jlora.LoraSpec(rank=3, alpha=6, targets=["fc1", "fc2"], use_dora=True, dropout=0.0)
  frozen, t0 = jlora.lora_transform(params, spec, key=jax.random.key(0))
  return fn, params, frozen, t0, (normal((5, 12), seed=3),)


@functools.lru_cache
def base_output(case):
  """``fn(params, *args)`` of a case: the model without adapters, under jit."""
  fn, params, _, _, args = case()
  return jax.jit(fn)(params, *args)


def test_magnitude_starts_at_the_column_norms_so_the_model_starts_as_the_base():
  fn, params, frozen, t0, args = linen_case()
  q = t0["params"]["layers"]["query"]["kernel"]
  assert isinstance(q, jlora.DoraParam) and q.magnitude.shape == (2, 4, 8)   # (layers, h, k)
  w = params["params"]["layers"]["query"]["kernel"]                          # (layers, d, h, k)
  np.testing.assert_allclose(q.magnitude, jnp.linalg.norm(w, axis=1), rtol=1e-6)
  y = jax.jit(jlora.lora(fn))(frozen, t0, *args)
  assert max_abs_diff(y, base_output(linen_case)) < 1e-5


@JIT
def test_forward_equals_merge_and_gradients_hold_the_norm_constant(jit):
  # Eager dispatch compiles every op: the small model runs eagerly, the Linen
  # LM (nn.scan, remat, DenseGeneral) under jit.
  case = linen_case if jit else mlp_case
  fn, params, frozen, t0, args = case()
  t = _moved(t0, 1)
  apply = jlora.lora(fn)
  forward = lambda t: apply(frozen, t, *args)  # noqa: E731
  grad = jax.grad(lambda t: loss_of(apply(frozen, t, *args)))
  with NoMaterialize():
    if jit:   # one program for both
      y, g = jax.jit(lambda t: (forward(t), grad(t)))(t)
    else:
      y, g = forward(t), grad(t)
  # The merged forward and the dense DoRA gradient: one compiled reference.
  want_y, want = jax.jit(lambda t: (
      fn(jlora.merge(frozen, t), *args),
      jax.grad(lambda t: loss_of(fn(dense_dora(frozen, t), *args)))(t)))(t)
  assert_close_forward(y, want_y)
  assert max_abs_diff(y, base_output(case)) > 1e-2
  assert_close_grads(g, want)
  # The magnitude is trained: it has its own non-zero gradient.
  mags = [leaf.magnitude for leaf in jax.tree_util.tree_leaves(
      g, is_leaf=lambda x: isinstance(x, jlora.DoraParam)) if isinstance(leaf, jlora.DoraParam)]
  assert mags and all(float(jnp.max(jnp.abs(m))) > 0 for m in mags)


def _weight_sized(hlo: str, shapes) -> list[str]:
  entry = hlo[hlo.index("ENTRY"):]
  pattern = "|".join(rf"{a},{b}|{b},{a}" for a, b in shapes)
  return [line.strip()[:120] for line in entry.splitlines()
          if re.search(rf"= f32\[({pattern})\]", line) and "parameter(" not in line]


def test_the_compiled_step_forms_no_weight_sized_temporary():
  """The column norms come from W0, W0^T A and A^T A; a dense DoRA step (the
  control) forms W0 + s B A and its norm."""
  k, n = 480, 400      # large enough that XLA fuses the squares into their sums
  params = {"w": normal((k, n), 0.05)}
  spec = jlora.LoraSpec(rank=4, targets=["w"], use_dora=True)
  frozen, t = jlora.lora_transform(params, spec, key=jax.random.key(0))
  t = _moved(t, 2)
  x = normal((24, k), seed=4)
  fn = lambda p, x: jnp.tanh(x @ p["w"])  # noqa: E731
  tx = jlora.optimizer(optax.adam(1e-3), t)

  def step(loss_fn):
    def run(t, state, frozen, x):
      loss, g = jax.value_and_grad(lambda t: loss_fn(t, frozen, x))(t)
      updates, state = tx.update(g, state, t)
      return optax.apply_updates(t, updates), state, loss
    return jax.jit(run).lower(t, tx.init(t), frozen, x).compile().as_text()

  ours = step(lambda t, f, x: jnp.sum(jlora.lora(fn)(f, t, x)))
  control = step(lambda t, f, x: jnp.sum(fn(dense_dora(f, t), x)))
  assert _weight_sized(ours, [(k, n)]) == []
  assert _weight_sized(control, [(k, n)])


def test_merge_is_exact_and_unmerge_says_why_it_cannot():
  fn, params, frozen, t0, args = mlp_case()
  t = _moved(t0, 3)
  merged = jlora.merge(frozen, t)
  assert_close_forward(fn(merged, *args), jlora.lora(fn)(frozen, t, *args))
  with pytest.raises(jlora.LoraTreeError, match="DoRA merge cannot be undone"):
    jlora.unmerge(merged, t)


def test_training_moves_direction_and_magnitude():
  fn, params, frozen, t0, args = mlp_case()
  target = jnp.sin(fn(params, *args))
  tx = jlora.optimizer(optax.adam(1e-2), t0)
  loss = lambda t: jnp.mean((jlora.lora(fn)(frozen, t, *args) - target) ** 2)  # noqa: E731

  @jax.jit
  def step(t, state):
    value, g = jax.value_and_grad(loss)(t)
    updates, state = tx.update(g, state, t)
    return optax.apply_updates(t, updates), state, value

  t, state = t0, tx.init(t0)
  loss_jit = jax.jit(loss)   # compiled once for the first and the last loss
  first = float(loss_jit(t0))
  for _ in range(30):
    t, state, _ = step(t, state)
  assert float(loss_jit(t)) < 0.5 * first
  assert max_abs_diff(t["fc1"].magnitude, t0["fc1"].magnitude) > 1e-3


def test_dora_on_an_expert_einsum_is_refused_by_name():
  params = {"experts": normal((3, 8, 6), 0.3)}
  spec = jlora.LoraSpec(rank=2, targets=["experts"], use_dora=True,
                        layouts={"experts": jlora.Layout((1,), (2,), (0,))})
  frozen, t = jlora.lora_transform(params, spec, key=jax.random.key(0))
  fn = lambda p, x: jnp.einsum("ebd,edf->ebf", x, p["experts"])  # noqa: E731
  with pytest.raises(jlora.LoraLayoutError, match="'experts': DoRA on a weight"):
    jlora.lora(fn)(frozen, t, normal((3, 4, 8)))
