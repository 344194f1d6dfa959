"""``jlora.lora`` end to end: models, composition with JAX transforms, dropout.

Every test is held to the merged model (see ``reference.py``): the transform
must compute what ``fn(jlora.merge(frozen, trainable), ...)`` computes,
forward and gradients, eager and under ``jit``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import jlora
from models import LinenLM, LinenMLP, LMConfig, NNXLM, batched_einsum
from reference import (JIT, JIT_ONLY, NoMaterialize, adapt, assert_close_forward,
                       assert_close_grads, check_against_merged, check_lora_fn, is_lora_param,
                       loss_of, max_abs_diff, maybe_jit, merged_reference, normal, perturb,
                       square_problem, value_and_grad_of, weights)

# -- models ------------------------------------------------------------------------
#
# Model set-up (init, lora_transform, the merged reference) is shared by the
# eager and the jit variant of a test through module-scoped fixtures: the
# machine is small and eager dispatch compiles every op once.


TINY_LM = LMConfig(vocab=64, d_model=32, heads=4, layers=2, mlp=64, seq=16)
LM_TARGETS = r"params/layers/(query|key|value|out|up|down)/kernel|params/lm_head/kernel"
NNX_TARGETS = r"blocks/\d+/(query|key|value|out|up|down)/kernel|head/kernel"


def _tokens(cfg, batch=2, seq=12, key=1):
  return jnp.asarray(np.random.default_rng(key).integers(0, cfg.vocab, (batch, seq)), jnp.int32)


@dataclasses.dataclass
class Case:
  """A model adapted with perturbed factors, its merged reference and its base output."""
  fn: Any
  params: Any
  frozen: Any
  trainable: Any
  args: tuple
  want: Any       # (output, d loss / d trainable) of the merged form
  base: Any       # the output of fn(params): the model without adapters
  merged_vg: Any  # jitted (t, frozen, *args) -> ((loss, output), d loss / d t), merged form

  @classmethod
  def make(cls, fn, params, spec, args, *, layouts=None):
    frozen, t0 = jlora.lora_transform(params, spec, key=jax.random.key(0), layouts=layouts)
    trainable = perturb(t0, 100)
    # One compilation serves the reference and the base output (B = 0 in t0).
    merged_vg = jax.jit(value_and_grad_of(lambda t, f, *a: fn(jlora.merge(f, t), *a)))
    (_, want_y), want_g = merged_vg(trainable, frozen, *args)
    (_, base_y), _ = merged_vg(t0, frozen, *args)
    assert max_abs_diff(base_y, want_y) > 1e-2, "the adapters must change the output"
    return cls(fn, params, frozen, trainable, args, (want_y, want_g), base_y, merged_vg)

  def check(self, jit, **kw):
    with NoMaterialize():
      return check_against_merged(self.fn, self.frozen, self.trainable, self.args, jit=jit,
                                  want=self.want, **kw)


@pytest.fixture(scope="module")
def mlp_case():
  model = LinenMLP(hidden=32, out=8)
  x = normal((6, 16), seed=1)
  params = jax.jit(model.init)(jax.random.key(0), x)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=r".*kernel", extra_trainable=r".*fc1/bias")
  return Case.make(model.apply, params, spec, (x,))


@pytest.fixture(scope="module")
def linen_lm_case():
  model = LinenLM(TINY_LM)
  tokens = _tokens(TINY_LM)
  params = jax.jit(model.init)(jax.random.key(0), tokens)
  layouts = jlora.infer_layouts(model.apply, params, tokens)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=LM_TARGETS)
  return Case.make(model.apply, params, spec, (tokens,), layouts=layouts)


@pytest.fixture(scope="module")
def nnx_lm_case():
  # One block: NNX unrolls its blocks, and each costs compile time; every
  # kind of layer is in the block.
  cfg = dataclasses.replace(TINY_LM, layers=1)
  graphdef, state = nnx.split(NNXLM(cfg, rngs=nnx.Rngs(0)))
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  tokens = _tokens(cfg)
  layouts = jlora.infer_layouts(fn, state, tokens)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=NNX_TARGETS)
  return Case.make(fn, state, spec, (tokens,), layouts=layouts)


@JIT
def test_linen_mlp(jit, mlp_case):
  assert mlp_case.frozen["params"]["fc1"]["bias"] is None
  assert mlp_case.trainable["params"]["fc1"]["bias"] is not None   # extra trainable leaf
  mlp_case.check(jit)


@JIT
def test_linen_lm_scan_remat_densegeneral(jit, linen_lm_case):
  layers = linen_lm_case.trainable["params"]["layers"]
  assert layers["query"]["kernel"].a.shape == (2, 32, 4)             # per-layer stack axis
  assert layers["query"]["kernel"].b.shape == (2, 4, 4, 8)           # (heads, head_dim) out
  assert layers["out"]["kernel"].a.shape == (2, 4, 8, 4)             # (heads, head_dim) in
  linen_lm_case.check(jit)


@JIT
def test_nnx_lm_linear_lineargeneral_einsum(jit, nnx_lm_case):
  kernel = nnx_lm_case.trainable["blocks"][0]["value"]["kernel"]      # the nnx.Einsum kernel
  assert is_lora_param(kernel.get_value())
  nnx_lm_case.check(jit)


@functools.lru_cache   # shared by the eager and the jit variant
def _expert_einsum_case():
  params = {"experts": normal((3, 8, 12), 0.3, seed=0), "proj": normal((12, 5), 0.3, seed=1)}
  x = normal((3, 4, 8), seed=2)
  layouts = jlora.infer_layouts(batched_einsum, params, x)
  assert layouts["experts"] == jlora.Layout((1,), (2,), (0,))
  spec = jlora.LoraSpec(rank=2, alpha=4, targets=["experts", "proj"])
  return Case.make(batched_einsum, params, spec, (x,), layouts=layouts)


@JIT
def test_plain_einsum_with_expert_batch_axis(jit):
  case = _expert_einsum_case()
  assert case.trainable["experts"].a.shape == (3, 8, 2)
  assert case.trainable["experts"].b.shape == (3, 2, 12)
  case.check(jit)


def _rel_err(got, want):
  got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
  return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


@pytest.fixture(scope="module")
def bf16_lm_case(linen_lm_case):
  """LinenLM computing in bf16; the layer weights stored in bf16, lm_head in f32.

  So both kinds of bf16 use are covered: a bf16 W0, and an f32 W0 that the
  model casts to bf16 at its use. Returns the case and the float32 truth:
  the float32 model merged from the same W0 and factors (the f32 case's
  compiled reference, reused).
  """
  f32_case = linen_lm_case
  model = LinenLM(dataclasses.replace(TINY_LM, dtype=jnp.bfloat16))
  params = dict(f32_case.params["params"])
  params["layers"] = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params["layers"])
  params = {"params": params}
  layouts = jlora.infer_layouts(model.apply, params, *f32_case.args)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=LM_TARGETS)
  case = Case.make(model.apply, params, spec, f32_case.args, layouts=layouts)
  frozen32 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), case.frozen)
  (_, truth), g_truth = f32_case.merged_vg(case.trainable, frozen32, *f32_case.args)
  return case, (truth, g_truth)


# Under jit only: laziness is decided while tracing, the same eager or under
# jit, and eager bf16 dispatch compiles every op anew (the f32 models cover
# eager execution).
@JIT_ONLY
def test_bf16_lm_stays_lazy(jit, bf16_lm_case):
  case, (truth, g_truth) = bf16_lm_case
  (tokens,) = case.args
  merged = jlora.merge(case.frozen, case.trainable)
  assert merged["params"]["layers"]["query"]["kernel"].dtype == jnp.bfloat16
  assert merged["params"]["lm_head"]["kernel"].dtype == jnp.float32
  lora_fn = lambda t: jlora.lora(case.fn)(case.frozen, t, tokens)
  with NoMaterialize():   # the bf16 casts of each W stay lazy: no dense W0 + s B A
    got = maybe_jit(lora_fn, jit)(case.trainable)
    _, g_got = maybe_jit(value_and_grad_of(lora_fn), jit)(case.trainable)
  want, g_want = case.want
  assert got.dtype == want.dtype
  # bf16 rounds x W0 + s (x A) B and x (W0 + s B A) differently, so LoRA is
  # held to the merged bf16 model's own distance from the float32 truth; the
  # adapters move the output much further than that, so ignoring them fails.
  effect = _rel_err(case.base, truth)
  merged_err, lora_err = _rel_err(want, truth), _rel_err(got, truth)
  assert effect > 0.2 and merged_err < 0.1 * effect, (effect, merged_err)
  assert lora_err <= 2 * merged_err + 1e-3, (lora_err, merged_err)
  assert _rel_err(got, want) <= 3 * merged_err + 1e-3
  for (path, g), w, t in zip(jax.tree_util.tree_leaves_with_path(g_got),
                             jax.tree_util.tree_leaves(g_want), jax.tree_util.tree_leaves(g_truth)):
    lora_err, merged_err = _rel_err(g, t), _rel_err(w, t)
    assert lora_err <= 2 * merged_err + 0.01, (jax.tree_util.keystr(path), lora_err, merged_err)


@JIT
def test_vmap_composes_with_the_transform(jit, mlp_case):
  case = mlp_case
  xs = case.args[0].reshape(2, 3, -1)
  vfn = lambda p, xs: jax.vmap(case.fn, in_axes=(None, 0))(p, xs)
  want = merged_reference(vfn, case.frozen, case.trainable, (xs,))
  with NoMaterialize():
    # The transform of a vmapped function ...
    check_against_merged(vfn, case.frozen, case.trainable, (xs,), jit=jit, want=want)
    # ... and vmap of the transformed function.
    vapply = jax.vmap(jlora.lora(case.fn), in_axes=(None, None, 0))
    check_lora_fn(lambda t, xs: vapply(case.frozen, t, xs), case.trainable, (xs,), want, jit=jit)


@JIT
def test_vmap_over_adapters(jit, mlp_case):
  """One adapter per example (vmap over trainable) equals one merged model per example."""
  case = mlp_case
  xs = case.args[0].reshape(2, 3, -1)
  adapters = [case.trainable, perturb(case.trainable, 42)]
  stacked = jax.tree_util.tree_map(lambda *ls: jnp.stack(ls), *adapters)
  with NoMaterialize():
    got = maybe_jit(jax.vmap(jlora.lora(case.fn), in_axes=(None, 0, 0)), jit)(
        case.frozen, stacked, xs)
  merged_fn = jax.jit(lambda t, x: case.fn(jlora.merge(case.frozen, t), x))
  want = jnp.stack([merged_fn(t, x) for t, x in zip(adapters, xs)])
  assert max_abs_diff(want[0], merged_fn(adapters[1], xs[0])) > 1e-2   # the adapters differ
  assert_close_forward(got, want)


@JIT
def testvalue_and_grad_of(jit, mlp_case):
  case = mlp_case
  apply = jlora.lora(case.fn)
  vg = maybe_jit(jax.value_and_grad(lambda t: loss_of(apply(case.frozen, t, *case.args))), jit)
  loss, grads = vg(case.trainable)
  want_y, want_g = case.want
  np.testing.assert_allclose(loss, loss_of(want_y), rtol=1e-6)
  assert_close_grads(grads, want_g)



def _dropout_problem():
  (w,) = weights((8, 8))
  x = normal((4, 8), seed=1)
  fn = lambda p, x: x @ p["w"]
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=["w"], dropout=0.5)
  frozen, trainable0 = jlora.lora_transform({"w": w}, spec, key=jax.random.key(0))
  return fn, {"w": w}, frozen, trainable0, x


@JIT
def test_lora_dropout(jit):
  fn, params, frozen, trainable0, x = _dropout_problem()
  trainable = perturb(trainable0, 5)
  apply = maybe_jit(jlora.lora(fn), jit)
  merged = fn(jlora.merge(frozen, trainable), x)
  # No key: dropout is off and the result is the merged model's.
  assert_close_forward(apply(frozen, trainable, x), merged)
  k1, k2 = jax.random.key(11), jax.random.key(12)
  y1 = apply(frozen, trainable, x, lora_dropout_key=k1)
  assert max_abs_diff(y1, merged) > 1e-2
  np.testing.assert_array_equal(y1, apply(frozen, trainable, x, lora_dropout_key=k1))
  assert max_abs_diff(y1, apply(frozen, trainable, x, lora_dropout_key=k2)) > 1e-2
  # With B = 0 the dropped-out low-rank path adds nothing: the output is the
  # base x W0 exactly (bit for bit as without dropout; a separately compiled
  # x @ W0 may round differently).
  y0 = apply(frozen, trainable0, x, lora_dropout_key=k1)
  np.testing.assert_array_equal(y0, apply(frozen, trainable0, x))
  np.testing.assert_allclose(y0, fn(params, x), rtol=0, atol=1e-6)
  # Changing W0 under the same key moves the output by exactly x dW0: dropout
  # touches only the input of the low-rank path, never the base path.
  delta = normal(params["w"].shape, 0.3, seed=9)
  frozen2 = {"w": frozen["w"] + delta}
  y2 = apply(frozen2, trainable, x, lora_dropout_key=k1)
  assert_close_forward(y2 - y1, x @ delta)


@JIT
def test_lora_dropout_gradient_uses_the_forward_mask(jit):
  fn, params, frozen, trainable0, x = _dropout_problem()
  trainable = perturb(trainable0, 5)
  key = jax.random.key(11)
  apply = jlora.lora(fn)
  lora_fn = lambda t, key: apply(frozen, t, x, lora_dropout_key=key)
  y = maybe_jit(lora_fn, jit)(trainable, key)
  grad = maybe_jit(jax.grad(lambda t, key: jnp.sum(lora_fn(t, key))), jit)
  db, db_no_dropout = grad(trainable, key)["w"].b, grad(trainable, None)["w"].b
  # y - x W0 = s (x_drop A) B, and d sum(y) / dB has every column equal to
  # s colsum(x_drop A); so colsum(y - x W0) = dB[:, 0] @ B for the same mask.
  lp = trainable["w"]
  np.testing.assert_allclose(jnp.sum(y - x @ params["w"], axis=0), db[:, 0] @ lp.b,
                             rtol=1e-4, atol=1e-5)
  assert max_abs_diff(db, db_no_dropout) > 1e-2


@JIT_ONLY
def test_lora_dropout_in_scan_and_remat_has_consistent_gradients(jit):
  """Under a fixed key, jax.grad is the derivative of the (masked) forward,
  also through scan and a rematerialised body, where the mask is drawn again
  in the backward pass."""
  (w,) = weights((3, 8, 8))
  x = normal((4, 8), seed=1)
  body = jax.checkpoint(lambda h, w: (jnp.tanh(h @ w), None))
  fn = lambda p, x: lax.scan(body, x, p["w"])[0]
  spec = jlora.LoraSpec(rank=2, alpha=4, targets=["w"], dropout=0.5,
                        layouts={"w": jlora.Layout((1,), (2,), (0,))})
  frozen, trainable = adapt({"w": w}, spec)
  key = jax.random.key(3)
  loss = maybe_jit(lambda t: loss_of(jlora.lora(fn)(frozen, t, x, lora_dropout_key=key)), jit)
  merged_loss = jax.jit(lambda t: loss_of(fn(jlora.merge(frozen, t), x)))
  assert float(loss(trainable)) != pytest.approx(
      float(merged_loss(trainable)), rel=1e-3)   # dropout is on
  grads = maybe_jit(jax.grad(loss), jit)(trainable)
  direction = jax.tree_util.tree_map(lambda l: normal(l.shape, seed=7), trainable)
  eps = 1e-3   # central differences; the loss is smooth at this scale
  step = lambda sign: jax.tree_util.tree_map(lambda t, d: t + sign * eps * d, trainable, direction)
  numeric = (float(loss(step(1.0))) - float(loss(step(-1.0)))) / (2 * eps)
  analytic = sum(float(np.vdot(g, d)) for g, d in zip(jax.tree_util.tree_leaves(grads),
                                                       jax.tree_util.tree_leaves(direction)))
  assert analytic == pytest.approx(numeric, rel=1e-3, abs=1e-4)


@JIT
def test_hessian_matches_merged(jit):
  """Second-order AD (forward over reverse) goes through the transform."""
  frozen, trainable, x = square_problem()
  apply = jlora.lora(lambda p, x: jnp.tanh(x @ p["w"]).sum())
  b_of = lambda t: t["w"].b
  with_b = lambda t, b: {**t, "w": dataclasses.replace(t["w"], b=b)}
  got = maybe_jit(jax.hessian(lambda b: apply(frozen, with_b(trainable, b), x)), jit)(
      b_of(trainable))
  # The merged reference under jit (its ops would otherwise compile one by one).
  want = jax.jit(jax.hessian(
      lambda b: jnp.tanh(x @ jlora.merge(frozen, with_b(trainable, b))["w"]).sum()))(
      b_of(trainable))
  assert_close_forward(got, want)
