"""No gradient of a frozen weight is ever computed: proof from the compiled HLO.

A LoRA training step (loss, ``jax.grad`` w.r.t. the trainable part, an optax
adam update) is compiled, and every ``dot`` / ``convolution`` instruction
of the optimised HLO is read with its result shape. None may produce a
tensor shaped like a frozen weight W0 (as stored, per layer of a stack, or
flattened to (fan_in, fan_out)): that tensor would be dW0 (or a merged
W0 + s B A). The model sizes are chosen so that no activation or factor has
such a shape, and a positive control shows that the full fine-tune step's
HLO does contain those dots, so the check can fail.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from hlo import (shape_key, dot_result_shapes, frozen_weight_shapes, full_step_hlo, lora_step_hlo,
                 weight_shaped_dots)
from models import LinenLM, LinenMLP, LMConfig

# Sizes: batch 3, seq 5, tokens 15 and rank 3 differ from every weight
# dimension (layers 2, d_model 32, heads 4, head_dim 8, mlp 64, vocab 48,
# positions 16), so activations and factors never look like a weight.
LM_CFG = LMConfig(vocab=48, d_model=32, heads=4, layers=2, mlp=64, seq=16)
LM_TARGETS = r"params/layers/(query|key|value|out|up|down)/kernel|params/lm_head/kernel"


def _lm():
  model = LinenLM(LM_CFG)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, LM_CFG.vocab, (3, 5)), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens)
  layouts = jlora.infer_layouts(model.apply, params, tokens)
  spec = jlora.LoraSpec(rank=3, alpha=6, targets=LM_TARGETS)
  return model.apply, params, spec, layouts, (tokens,)


@functools.lru_cache   # shared by the fixture and the control test
def _mlp():
  model = LinenMLP(hidden=32, out=8)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 16)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), x)
  spec = jlora.LoraSpec(rank=3, alpha=6, targets=r".*kernel", extra_trainable=r".*bias")
  return model.apply, params, spec, None, (x,)


def _split(params, spec, layouts):
  return jlora.lora_transform(params, spec, key=jax.random.key(1), layouts=layouts)


@pytest.fixture(scope="module", params=[_lm, _mlp], ids=["linen_lm", "mlp"])
def model(request):
  fn, params, spec, layouts, args = request.param()
  frozen, trainable = _split(params, spec, layouts)
  return fn, params, frozen, trainable, args


def _adapted_paths(trainable) -> set[str]:
  is_lp = lambda x: x is None or isinstance(x, jlora.LoraParam)
  return {jax.tree_util.keystr(path)
          for path, t in jax.tree_util.tree_flatten_with_path(trainable, is_leaf=is_lp)[0]
          if isinstance(t, jlora.LoraParam)}


def test_parser_reads_dot_shapes():
  text = """
  %dot.3 = f32[32,48]{1,0} dot(f32[15,32]{1,0} %x, f32[15,48]{1,0} %g), lhs_contracting_dims={0}
  ROOT %dot_general.0 = bf16[15,4,8]{2,1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}
  %conv = f32[1,8,8,3]{3,2,1,0} convolution(%a, %b), window={size=3x3}
  %add.1 = f32[32,48]{1,0} add(%p, %q)
  %custom-call.2 = (f32[32,64]{1,0}, s8[4194304]{0}) custom-call(f32[15,32]{1,0} %x, f32[15,64]{1,0} %g), custom_call_target="__cublas$gemm", backend_config={}
  %custom-call.3 = f32[8]{0} custom-call(%y), custom_call_target="Sharding"
  """
  assert dot_result_shapes(text) == [(32, 48), (15, 4, 8), (1, 8, 8, 3), (32, 64)]


def test_lora_step_has_no_weight_shaped_dot(model):
  fn, params, frozen, trainable, args = model
  hlo = lora_step_hlo(fn, frozen, trainable, args)
  assert len(dot_result_shapes(hlo)) >= 6, "the parser found no dots: the check would be vacuous"
  assert weight_shaped_dots(hlo, frozen, trainable) == []


def test_full_fine_tune_step_has_weight_shaped_dots(model):
  """Positive control: differentiating each adapted W shows up as a W-shaped dot."""
  fn, params, frozen, trainable, args = model
  hlo = full_step_hlo(fn, params, args)
  found = {name for _, names in weight_shaped_dots(hlo, frozen, trainable) for name in names}
  adapted = _adapted_paths(trainable)
  assert adapted and adapted <= found, sorted(adapted - found)


def test_differentiating_w0_through_the_transform_shows():
  """Control: ask for d loss / d W0 of the LoRA step and the W0-shaped dots appear."""
  fn, params, spec, layouts, args = _mlp()
  frozen, trainable = _split(params, spec, layouts)
  hlo = lora_step_hlo(fn, frozen, trainable, args, also_frozen_grad=True)
  found = {name for _, names in weight_shaped_dots(hlo, frozen, trainable) for name in names}
  assert _adapted_paths(trainable) <= found, sorted(_adapted_paths(trainable) - found)


def test_sizes_keep_activations_apart_from_weights(model):
  """No input or output of the model is shaped like a weight (else the check could miss)."""
  fn, params, frozen, trainable, args = model
  out = jax.eval_shape(fn, params, *args)
  weights = set().union(*frozen_weight_shapes(frozen, trainable).values())
  for leaf in jax.tree_util.tree_leaves((args, out)):
    assert shape_key(leaf.shape) not in weights
    assert shape_key((math.prod(leaf.shape[:-1]), leaf.shape[-1])) not in weights
