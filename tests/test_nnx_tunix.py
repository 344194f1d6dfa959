"""``jlora.nnx`` inside google-tunix, unedited: its ``PeftTrainer`` trains a
jlora-adapted tiny Llama 3, Qwen 3 and Gemma 3, and a Llama 3 on an NF4 base
(loss falls, only the LoRA params change), its ``Sampler``'s greedy
tokens equal the merged model's, and the same run with qwix's LoRA (the
same factors copied into qwix's) gives the same losses.

Skipped without tunix. Tunix pulls transformers 5, which the ``peft`` extra's
Flax models cannot use, so it runs in an environment of its own:

    python -m venv /tmp/tunix && /tmp/tunix/bin/pip install jax==0.10.2 \\
        flax==0.12.8 google-tunix==0.1.7 pytest
    PYTHONPATH=$PWD /tmp/tunix/bin/python -m pytest -q tests/test_nnx_tunix.py
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
import jlora.nnx

llama = pytest.importorskip("tunix.models.llama3.model")
qwen = pytest.importorskip("tunix.models.qwen3.model")
gemma = pytest.importorskip("tunix.models.gemma3.model")
peft_trainer = pytest.importorskip("tunix.sft.peft_trainer")
sft_utils = pytest.importorskip("tunix.sft.utils")
sampler_lib = pytest.importorskip("tunix.generate.sampler")
qwix = pytest.importorskip("qwix")

VOCAB, PAD, BOS, EOS = 64, 0, 1, 2
MLP = r"|.*/(gate_proj|up_proj|down_proj)/kernel"
# family -> (model, config, targets): einsum attention kernels and Linear MLPs.
_SMALL = dict(num_layers=2, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8,
              num_kv_heads=2)
FAMILIES = {
    "llama3": (lambda c, r: llama.Llama3(c, rngs=r),
               lambda: llama.ModelConfig(vocab_size=VOCAB, rope_theta=10_000, norm_eps=1e-5,
                                         **_SMALL),
               r".*/(q_proj|k_proj|v_proj|o_proj)/w" + MLP),
    "qwen3": (lambda c, r: qwen.Qwen3(c, rngs=r),
              lambda: qwen.ModelConfig(vocab_size=VOCAB, rope_theta=10_000, norm_eps=1e-5,
                                       **_SMALL),
              r".*/(q_proj|k_proj|v_proj|o_proj)/w" + MLP),
    # Gemma 3: q_einsum (N, D, H), kv_einsum (2, K, D, H), a tied embedding.
    "gemma3": (lambda c, r: gemma.Gemma3(c, rngs=r),
               lambda: gemma.ModelConfig(num_embed=VOCAB, sliding_window_size=8,
                                         param_dtype=jnp.float32, **_SMALL),
               r".*/(q_einsum|kv_einsum|attn_vec_einsum)/w" + MLP),
}


# The same modules for qwix (a regex on module paths, matched in full).
QWIX_TARGETS = {
    "llama3": r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    "qwen3": r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    "gemma3": r".*/(q_einsum|kv_einsum|attn_vec_einsum|gate_proj|up_proj|down_proj)",
}


class CharTokenizer:
  """Characters to ids 3..63: the methods Tunix's TokenizerAdapter asks for."""

  def encode(self, text, **kwargs):
    return [3 + ord(c) % (VOCAB - 3) for c in text]

  def decode(self, ids, **kwargs):
    return "".join(chr(ord("a") + (int(i) - 3) % 26) for i in ids if int(i) > 2)

  def bos_id(self):
    return BOS

  def eos_id(self):
    return EOS

  def pad_id(self):
    return PAD


def _tiny(family):
  """A tiny model with random weights, as if loaded (Tunix starts its MLP
  kernels at zero, where their LoRA gradients are zero too)."""
  make, config, _ = FAMILIES[family]
  model = make(config(), nnx.Rngs(0))
  rng = np.random.default_rng(0)
  weights = jax.tree.map(
      lambda w: jnp.asarray(0.3 * rng.standard_normal(w.shape), w.dtype) if w.ndim > 1 else w,
      nnx.state(model, nnx.Param))
  nnx.update(model, weights)
  return model


def _model_input(x):
  pad_mask = x.input_tokens != PAD
  return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
          "positions": sft_utils.build_positions_from_mask(pad_mask),
          "attention_mask": sft_utils.make_causal_attn_mask(pad_mask)}


def _batch(seed):
  tokens = np.random.default_rng(seed).integers(3, VOCAB, (2, 12)).astype(np.int32)
  return peft_trainer.TrainingInput(input_tokens=tokens, input_mask=np.ones_like(tokens, bool))


@pytest.fixture(scope="module", params=[*FAMILIES, "llama3-nf4"])
def trained(request):
  batch = _batch(0)
  inputs = _model_input(batch)
  example = (inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"])
  family, nf4 = request.param.removesuffix("-nf4"), request.param.endswith("-nf4")
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=FAMILIES[family][2])
  model = _tiny(family)
  if nf4:   # QLoRA: every adapted weight stored in NF4
    model = jlora.nnx.quantize(model, spec.targets, example_args=example)
  m = jlora.nnx.lora(model, spec, rngs=nnx.Rngs(1),
                     example_args=example)
  loss = lambda m: float(peft_trainer._default_loss_fn(m, **inputs))  # noqa: E731
  frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  before = (jax.tree.map(np.asarray, nnx.state(m, frozen)),
            jax.tree.map(np.asarray, nnx.state(m, nnx.LoRAParam)), loss(m))
  trainer = peft_trainer.PeftTrainer(
      m, optax.adam(1e-2), peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=8))
  trainer = trainer.with_gen_model_input_fn(_model_input)
  trainer.train([batch] * 8)
  return m, before, loss(m)


def test_peft_trainer_trains_the_lora_params_alone(trained):
  m, (frozen_before, lora_before, loss_before), loss_after = trained
  assert loss_after < loss_before - 0.05, (loss_before, loss_after)
  frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  jax.tree.map(np.testing.assert_array_equal, frozen_before,
               jax.tree.map(np.asarray, nnx.state(m, frozen)))
  moved = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), lora_before,
                       nnx.state(m, nnx.LoRAParam))
  assert all(jax.tree.leaves(moved))


def test_sampler_greedy_tokens_equal_the_merged_models(trained):
  # A copy with a large B, so that the adapter moves the greedy tokens.
  m = nnx.clone(trained[0])
  rng = np.random.default_rng(1)
  lora = jax.tree_util.tree_map_with_path(
      lambda kp, v: jnp.asarray(rng.standard_normal(v.shape), v.dtype)
      if jlora.path_str(kp).endswith("/b") else v, nnx.state(m, nnx.LoRAParam))
  nnx.update(m, lora)
  # Tunix reads the call's parameters (the sampler for decode_only_last_token,
  # RL for segment_ids or **kwargs): the original's, and jlora's keywords.
  want = [*inspect.signature(m.base_model.__call__).parameters,
          "lora_dropout_key", "lora_adapter_ids"]
  assert list(inspect.signature(m.__call__).parameters) == want
  cache = sampler_lib.CacheConfig(cache_size=32, num_layers=2, num_kv_heads=2, head_dim=8)
  prompts = ["hello", "jax lora"]
  outs = {}
  for name, model in [("adapted", m), ("merged", jlora.nnx.merge(m))]:
    sampler = sampler_lib.Sampler(model, CharTokenizer(), cache)
    out = sampler(prompts, max_generation_steps=8, temperature=0.0, echo=False)
    outs[name] = [np.asarray(t).tolist() for t in out.tokens]   # up to EOS
  assert outs["adapted"] == outs["merged"]
  # The adapter matters: it moves the logits (the tiny Gemma 3, whose tied
  # embedding dominates, repeats its last prompt token with or without it).
  # The base is the merged model of a zero B (an NF4 base runs only adapted).
  base = nnx.clone(m)
  nnx.update(base, jax.tree_util.tree_map_with_path(
      lambda kp, v: jnp.zeros_like(v) if jlora.path_str(kp).endswith("/b") else v,
      nnx.state(base, nnx.LoRAParam)))
  inputs = _model_input(_batch(1))
  args = (inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"])
  assert float(jnp.max(jnp.abs(m(*args)[0] - jlora.nnx.merge(base)(*args)[0]))) > 1e-1


def _qwix_twin(m, base, family, example):
  """qwix's LoRA on a copy of ``base`` with ``m``'s factors: the same function.

  qwix keeps ``<w>_lora_a`` (the weight's contracted axes, rank last) and
  ``<w>_lora_b`` (rank first, the other axes) beside each weight, both in the
  weight's axis order, and scales by alpha / rank: jlora's layout and scale
  for these kernels, so the arrays copy as they are.
  """
  provider = qwix.LoraProvider(module_path=QWIX_TARGETS[family], rank=4, alpha=8.0)
  q = qwix.apply_lora_to_model(nnx.clone(base), provider, *example, rngs=nnx.Rngs(2))
  state = nnx.state(q, nnx.LoRAParam)
  pairs = {jlora.path_str(kp): v for kp, v in jax.tree_util.tree_leaves_with_path(state)}
  adapters = m.adapters()
  assert {p.rsplit("_lora_", 1)[0] for p in pairs} == set(adapters)   # the same weights
  values = {}
  for path, adapter in adapters.items():
    layout = adapter.layout
    assert not layout.stack_axes and adapter.scale == 8.0 / 4
    assert list(layout.in_axes) == sorted(layout.in_axes), layout
    assert list(layout.out_axes) == sorted(layout.out_axes), layout
    values[f"{path}_lora_a"], values[f"{path}_lora_b"] = adapter.a, adapter.b
  nnx.update(q, jax.tree_util.tree_map_with_path(
      lambda kp, v: jnp.asarray(values[jlora.path_str(kp)], v.dtype).reshape(v.shape),
      state))
  return q


def _train(model, batch, steps):
  trainer = peft_trainer.PeftTrainer(
      model, optax.adam(1e-2),
      peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=steps))
  trainer.with_gen_model_input_fn(_model_input).train([batch] * steps)


@pytest.mark.parametrize("family", FAMILIES)
def test_qwix_gives_the_same_losses(family):
  """jlora and qwix adapt the same weights of the same model with the same
  factors (a random, non-zero B, so the adapters matter): Tunix's loss is the
  same at step 0 and after two PeftTrainer steps of each."""
  batch = _batch(0)
  inputs = _model_input(batch)
  example = (inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"])
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=FAMILIES[family][2])
  base = _tiny(family)
  m = jlora.nnx.lora(base, spec, rngs=nnx.Rngs(1), example_args=example)
  rng = np.random.default_rng(2)
  nnx.update(m, jax.tree.map(lambda v: jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype),
                             nnx.state(m, nnx.LoRAParam)))
  q = _qwix_twin(m, base, family, example)
  loss = lambda model: float(peft_trainer._default_loss_fn(model, **inputs))  # noqa: E731
  logits = [model(*example)[0] for model in (m, q, base)]
  assert float(jnp.max(jnp.abs(logits[0] - logits[2]))) > 1e-1   # the factors matter
  np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)
  step0 = loss(m), loss(q)
  np.testing.assert_allclose(step0[0], step0[1], rtol=1e-6)
  _train(m, batch, 2)
  _train(q, batch, 2)
  np.testing.assert_allclose(loss(m), loss(q), rtol=1e-5)
  assert loss(m) < step0[0]


def test_extra_trainable_weights_train_and_checkpoint_with_the_factors(tmp_path):
  """A weight trained in full (the final norm) is an nnx.LoRAParam: Tunix's
  PeftTrainer trains it, and its LoRA-only checkpoint saves and restores it."""
  ckpt = pytest.importorskip("tunix.sft.checkpoint_manager")
  batch = _batch(0)
  inputs = _model_input(batch)
  example = (inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"])
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=FAMILIES["llama3"][2],
                        extra_trainable=r"final_norm/w")
  base = _tiny("llama3")
  m = jlora.nnx.lora(base, spec, rngs=nnx.Rngs(1), example_args=example)
  norm = np.asarray(m.base_model.final_norm.w[...])
  embed = np.asarray(m.base_model.embedder.input_embedding[...])
  _train(m, batch, 3)
  assert np.any(np.asarray(m.base_model.final_norm.w[...]) != norm)
  np.testing.assert_array_equal(m.base_model.embedder.input_embedding[...], embed)
  manager = ckpt.CheckpointManager(root_directory=str(tmp_path))
  assert manager.save(3, m, save_only_lora_params=True, force=True)
  manager.close()
  fresh = jlora.nnx.lora(base, spec, rngs=nnx.Rngs(5), example_args=example)
  ckpt.CheckpointManager(root_directory=str(tmp_path)).maybe_restore(
      fresh, restore_only_lora_params=True)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(m, nnx.LoRAParam)),
               jax.tree.map(np.asarray, nnx.state(fresh, nnx.LoRAParam)))
  np.testing.assert_array_equal(fresh.base_model.final_norm.w[...], m.base_model.final_norm.w[...])
