"""jlora.lora on NF4 weights (jlora/interpret/nf4.py): QLoRA.

The reference is the merged model of the dequantized base: ``fn`` applied to
``jlora.merge(frozen, trainable)`` (dequantize, add s B A in float32). The
transformed function must give its output and gradients, eager and under
jit, with the quantized weights dequantized where they are used, one layer
of a stack at a time, and never differentiated. The compiled train step is
read too: no W0-shaped dot, and on a scanned model no buffer of the size of
the dequantized stack.
"""

from __future__ import annotations

import dataclasses
import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
import jlora.interpret.nf4
from hlo import dot_result_shapes, lora_step_hlo, weight_shaped_dots
from jlora.interpret.nf4 import NF4Weight
from models import LinenMLP
from reference import (JIT, JIT_ONLY, NoMaterialize, check_against_merged, max_abs_diff,
                       maybe_jit, merged_reference, normal, perturb)

KEY = jax.random.key(0)


def _adapt(params, spec, layouts=None, seed=100):
  frozen, t0 = jlora.lora_transform(params, spec, key=KEY, layouts=layouts)
  return frozen, perturb(t0, seed)


@pytest.fixture
def materialized(monkeypatch):
  """The shapes NF4 weights are dequantized in, as the step is traced."""
  shapes = []
  plain = NF4Weight.materialize

  def recording(self):
    shapes.append(self.shape)
    return plain(self)

  monkeypatch.setattr(NF4Weight, "materialize", recording)
  return shapes


@pytest.fixture(scope="module")
def mlp_case():
  model = LinenMLP(hidden=64, out=8)
  x = normal((6, 64), seed=1)
  params = jlora.quantize(jax.jit(model.init)(KEY, x))     # every kernel in NF4
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=r".*fc\d/kernel", extra_trainable=r".*fc1/bias")
  frozen, trainable = _adapt(params, spec)
  return model.apply, frozen, trainable, (x,), merged_reference(model.apply, frozen, trainable,
                                                                 (x,))


@JIT
def test_mlp_on_an_nf4_base_equals_the_merged_dequantized_model(jit, mlp_case):
  fn, frozen, trainable, args, want = mlp_case
  assert isinstance(frozen["params"]["head"]["kernel"], jlora.NF4Array)   # not adapted
  with NoMaterialize():
    check_against_merged(fn, frozen, trainable, args, jit=jit, want=want)


class _HeadsBlock(nn.Module):
  """DenseGeneral projections to and from heads, and a Dense MLP."""

  @nn.compact
  def __call__(self, x, _):
    h = nn.DenseGeneral((4, 8), name="query")(nn.LayerNorm()(x))          # (d, heads, hd)
    x = x + nn.DenseGeneral(32, axis=(-2, -1), name="out")(jnp.tanh(h))   # (heads, hd, d)
    return x + nn.Dense(32, name="down")(nn.gelu(nn.Dense(64, name="up")(x))), None


class _ScannedHeads(nn.Module):
  """nn.scan over nn.remat blocks, as LLM training code stacks its layers."""

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(nn.remat(_HeadsBlock), variable_axes={"params": 0},
                    split_rngs={"params": True}, length=3)
    return stack(name="layers")(x, None)[0]


@pytest.fixture(scope="module")
def lm_case():
  model = _ScannedHeads()
  x = normal((2, 5, 32), seed=4)
  dense = jax.jit(model.init)(KEY, x)
  layouts = jlora.infer_layouts(model.apply, dense, x)
  params = jlora.quantize(dense, layouts=layouts)
  assert jlora.infer_layouts(model.apply, params, x) == layouts   # NF4 leaves read as W
  spec = jlora.LoraSpec(rank=3, alpha=6, targets=r".*/(query|out|up)/kernel")
  frozen, trainable = _adapt(params, spec, layouts)
  return model.apply, frozen, trainable, (x,)


@JIT_ONLY   # eager, every op of the scan compiles alone: slow, and the MLP covers eager
def test_scanned_model_is_dequantized_one_layer_at_a_time(jit, lm_case, materialized):
  fn, frozen, trainable, args = lm_case
  assert isinstance(frozen["params"]["layers"]["down"]["kernel"], jlora.NF4Array)  # no adapter
  with NoMaterialize():
    check_against_merged(fn, frozen, trainable, args, jit=jit)
  # Each layer's kernel, never the stack of 3.
  assert set(materialized) == {(32, 4, 8), (4, 8, 32), (32, 64), (64, 32)}, set(materialized)


def _stacked(seed=0):
  w = jnp.asarray(0.3 * np.random.default_rng(seed).standard_normal((4, 64, 48)), jnp.float32)
  layout = jlora.Layout((1,), (2,), (0,))
  return jlora.quantize({"w": w}, ["w"], layouts={"w": layout}), layout


@JIT_ONLY   # eager: the MLP test covers it; here each op would compile alone
def test_layers_taken_out_of_a_stack_stay_packed(jit, materialized):
  params, layout = _stacked()
  x = normal((5, 64), seed=2)

  def fn(p, x):
    y = jnp.tanh(x @ p["w"][1])               # static index: slice + squeeze
    j = jnp.argmax(x[0] > 0) % 4              # traced index: dynamic_slice + squeeze
    w = jax.lax.dynamic_index_in_dim(p["w"], j, 0, keepdims=False)
    return jnp.concatenate([y, y[:, :16]], axis=-1) @ w

  frozen, trainable = _adapt(params, jlora.LoraSpec(rank=2, alpha=4, targets=["w"]),
                             {"w": layout})
  with NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)
  assert set(materialized) == {(64, 48)}


def _views():
  """(name, view on an NF4Weight, the same view on the dense weight) triples."""
  return [
      ("transpose", lambda v: v.transpose((0, 2, 1)), lambda w: jnp.transpose(w, (0, 2, 1))),
      ("astype bf16", lambda v: v.astype(jnp.bfloat16), lambda w: w.astype(jnp.bfloat16)),
      ("reshape in axis", lambda v: v.reshape((4, 8, 8, 48), [((0,), (0,)), ((1,), (1, 2)),
                                                              ((2,), (3,))]),
       lambda w: w.reshape(4, 8, 8, 48)),
      ("scan axis 0", lambda v: v.scan_over_axis0(), lambda w: w),
      ("slice the stack", lambda v: v.slice_axes(
          lambda a, m: jax.lax.slice_in_dim(a, 1, 3, axis=next(k for k in m if m[k] == 0))),
       lambda w: w[1:3]),
      ("one layer", lambda v: v.slice_axes(
          lambda a, m: jax.lax.slice_in_dim(a, 2, 3, axis=next(k for k in m if m[k] == 0))
      ).squeeze((0,)), lambda w: w[2]),
  ]


@pytest.mark.parametrize("name,view,dense_view", _views(), ids=[v[0] for v in _views()])
def test_lazy_views_equal_the_views_of_the_dequantized_weight(name, view, dense_view):
  params, _ = _stacked()
  base = NF4Weight.of(params["w"])
  got = view(base)
  assert isinstance(got, NF4Weight), f"{name} did not stay lazy"
  if name == "scan axis 0":   # the arrays still hold the stack; lax.scan slices them
    got = jax.lax.scan(lambda c, v: (c, v.materialize()), 0, got)[1]
  else:
    got = got.materialize()
  want = dense_view(params["w"].dequantize())
  assert got.shape == want.shape and got.dtype == want.dtype
  # Under lax.scan the absmax is dequantized by XLA, which may fuse its
  # multiply-add (one rounding): a last-bit difference at most.
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=1e-6 if name == "scan axis 0" else 0)


def test_views_that_break_the_storage_order_fall_back():
  params, _ = _stacked()
  base = NF4Weight.of(params["w"])
  # Merging the output axis with the input axis (storage order is out, in).
  assert base.reshape((4, 64 * 48), [((0,), (0,)), ((1, 2), (1,))]) is None
  # Slicing an input axis: not a stack axis.
  def slice_input_axis(a, m):
    axis = next((k for k, v in m.items() if v == 1), None)
    return a if axis is None else jax.lax.slice_in_dim(a, 0, 8, axis=axis)
  assert base.slice_axes(slice_input_axis) is None
  assert base.map_dense(lambda w: w) is None
  assert base.scan_over_axis0().scan_over_axis0() is None   # no stack axis left
  stacked = base.scan_over_axis0().stacked_on_axis0()
  assert stacked.shape == base.shape and stacked.perm == base.perm


@JIT_ONLY
def test_a_weight_without_adapter_used_by_an_op_without_rule_does_not_warn(jit):
  params = jlora.quantize({"w": normal((64, 32), 0.3), "v": normal((64, 32), 0.3)}, ["w", "v"])
  fn = lambda p, x: x @ p["w"] + jnp.mean(p["v"] ** 2)    # pow has no low-rank rule
  frozen, trainable = _adapt(params, jlora.LoraSpec(rank=2, targets=["w"]))
  with NoMaterialize():
    check_against_merged(fn, frozen, trainable, (normal((3, 64), seed=3),), jit=jit)


@JIT_ONLY
def test_a_bf16_model_computes_in_bf16_from_an_f32_nf4_base(jit):
  # The model's bf16 cast of W stays lazy: the NF4 weight is dequantized
  # straight to bf16, rounded as the cast of the dense weight would be.
  params = jlora.quantize({"w": normal((64, 32), 0.3)}, ["w"])
  fn = lambda p, x: x.astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16)
  frozen, trainable = _adapt(params, jlora.LoraSpec(rank=2, targets=["w"]))
  x = normal((3, 64), seed=3)
  apply = maybe_jit(jlora.lora(fn), jit)
  with NoMaterialize():
    got = apply(frozen, trainable, x)
  want = apply(jlora.dequantize(frozen), trainable, x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@JIT_ONLY
def test_lora_dropout_masks_are_those_of_the_dense_base(jit, mlp_case):
  # The dot under jax.checkpoint draws the same masks as on a dense base.
  fn, frozen, trainable, args, _ = mlp_case
  is_lp = lambda x: isinstance(x, jlora.LoraParam)  # noqa: E731
  t = jax.tree_util.tree_map(lambda lp: dataclasses.replace(lp, dropout=0.5) if is_lp(lp)
                             else lp, trainable, is_leaf=is_lp)
  apply = jlora.lora(fn)
  key = jax.random.key(7)
  f = maybe_jit(lambda fr, t: apply(fr, t, *args, lora_dropout_key=key), jit)
  dropped, dense = f(frozen, t), f(jlora.dequantize(frozen), t)
  assert max_abs_diff(dropped, dense) < 1e-5
  assert max_abs_diff(dropped, f(frozen, trainable)) > 1e-3   # the masks do something


def test_docstring_examples():
  result = doctest.testmod(jlora.interpret.nf4,
                           optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0


# -- the compiled train step -----------------------------------------------------------


def test_qlora_step_has_no_w0_shaped_dot(mlp_case):
  fn, frozen, trainable, args, _ = mlp_case
  hlo = lora_step_hlo(fn, frozen, trainable, args)
  assert len(dot_result_shapes(hlo)) >= 6
  assert weight_shaped_dots(hlo, frozen, trainable) == []
  # Control: asking for d loss / d frozen (through the dequantization) shows them.
  hlo = lora_step_hlo(fn, jlora.dequantize(frozen), trainable, args, also_frozen_grad=True)
  assert weight_shaped_dots(hlo, frozen, trainable)


class _Block(nn.Module):
  d: int
  mlp: int

  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm()(x)
    x = x + nn.Dense(self.d, name="o")(jnp.tanh(nn.Dense(self.d, name="q")(h)))
    h = nn.gelu(nn.Dense(self.mlp, name="up")(nn.LayerNorm()(x)))
    return x + nn.Dense(self.d, name="down")(h), None


class _ScannedNoRemat(nn.Module):
  d: int = 256
  mlp: int = 1024
  layers: int = 8

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                    length=self.layers)
    return stack(self.d, self.mlp, name="layers")(x, None)[0]


def test_scanned_step_holds_no_dequantized_stack():
  """XLA's memory analysis of the compiled QLoRA step of a scanned model with
  no rematerialization: the temporaries stay within those of the same LoRA
  step on a dense base (activations, which hold no weight there) plus a
  couple of layers' dense weights. Dequantizing the whole base in the step
  (the control) needs the stack's dense size in temporaries."""
  model = _ScannedNoRemat()
  x = jax.ShapeDtypeStruct((2, 8, 256), jnp.float32)
  abstract = jax.eval_shape(model.init, KEY, x)
  layouts = jlora.infer_layouts(model.apply, abstract, x)
  spec = jlora.LoraSpec(rank=4, targets=r".*/(q|o|up|down)/kernel")
  dense_frozen, trainable = jlora.lora_transform(abstract, spec, layouts=layouts)
  q_frozen, _ = jlora.lora_transform(jlora.quantize(abstract, layouts=layouts), spec,
                                     layouts=layouts)
  apply = jlora.lora(model.apply)
  tx = jlora.optimizer(optax.adam(1e-3), trainable)

  def temp_bytes(frozen, whole_model_dequantized=False):
    def step(t, s, f, x):
      if whole_model_dequantized:
        f = jlora.dequantize(f)
      loss, g = jax.value_and_grad(lambda t: jnp.mean(apply(f, t, x) ** 2))(t)
      u, s = tx.update(g, s, t)
      return optax.apply_updates(t, u), s, loss
    state = jax.eval_shape(tx.init, trainable)
    compiled = jax.jit(step).lower(trainable, state, frozen, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  layer = 4 * (2 * 256 * 256 + 2 * 256 * 1024)         # one layer's kernels, float32
  stack = 8 * layer
  lora_dense, qlora = temp_bytes(dense_frozen), temp_bytes(q_frozen)
  control = temp_bytes(q_frozen, whole_model_dequantized=True)
  assert qlora <= lora_dense + 2 * layer, (qlora, lora_dense, layer)
  assert qlora < stack < control, (qlora, stack, control)
