"""Helpers shared by the PEFT tests: models, random trees, folders to damage."""

from __future__ import annotations

import json
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jlora
from gpt2_flax import GPT2Config, GPT2LMHeadModel, config_from_hf, make_tiny_torch_gpt2, params_from_torch
from models import LinenLM, LMConfig

PREFIX = "base_model.model."
# gpt2_flax.py stores GPT-2's Conv1D kernels (in, out), as nn.Dense does; the
# ready-made Rules.gpt2() is for transformers' own Flax GPT-2, which stores them (out, in).
PORT_RULES = jlora.peft.Rules.gpt2(kernel_order="in_out")
TARGETS = r".*/(c_attn|c_proj|c_fc)/kernel"


def pt_modules():
  """torch, transformers and peft, or skip the interop tests."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  return torch, peft


def make_ids(seed=0, vocab=128):
  return np.random.default_rng(seed).integers(0, vocab, size=(2, 12), dtype=np.int64)


def torch_logits(torch, model, ids):
  with torch.no_grad():
    return model(torch.from_numpy(ids)).logits.numpy()


def flax_gpt2(tm):
  """The Flax model and ``{"params": ...}`` holding tm's (base) weights."""
  return GPT2LMHeadModel(config_from_hf(tm.config)), {"params": params_from_torch(tm.state_dict())}


def jlora_logits(model, frozen, trainable, ids):
  return np.asarray(jax.jit(jlora.lora(model.apply))(frozen, trainable, jnp.asarray(ids, jnp.int32)))


def perturb(tree, seed, std=0.05):
  """Adds noise to every array of a trainable tree (A, B and extras)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(np.asarray(x) + std * rng.standard_normal(x.shape), x.dtype), tree)


def random_params(init, *args, seed=0):
  """Parameters with init's shapes, drawn by numpy (faster than an eager Flax init)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                                jax.eval_shape(init, jax.random.key(0), *args))


def peft_adapter(torch, peft, base, folder, seed=0, **lora_kwargs):
  """Wraps ``base`` with PEFT LoRA, randomises every adapter tensor, saves it."""
  kwargs = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
  kwargs.update(lora_kwargs)
  model = peft.get_peft_model(base, peft.LoraConfig(**kwargs))
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      elif "modules_to_save" in name:
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
  model.save_pretrained(folder)
  return model.eval()


def load_in_peft(torch, peft, folder, seed=0):
  """PeftModel.from_pretrained on a fresh base; fails on any PEFT warning about keys."""
  base = make_tiny_torch_gpt2(seed)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = peft.PeftModel.from_pretrained(base, folder)
  bad = [str(w.message) for w in caught
         if re.search(r"missing|unexpected|fan_in_fan_out|ignored", str(w.message), re.I)]
  assert not bad, bad
  res = model.load_adapter(folder, adapter_name="check")
  assert not res.missing_keys and not res.unexpected_keys, res
  model.set_adapter("default")
  return model.eval()


def make_stacked():
  """LinenLM: nn.scan stacks each block weight along axis 0 (3 layers)."""
  cfg = LMConfig(vocab=32, d_model=16, heads=2, layers=3, mlp=24, seq=8)
  model = LinenLM(cfg)
  tokens = jnp.asarray(np.arange(16).reshape(2, 8) % cfg.vocab, jnp.int32)
  params = random_params(model.init, tokens)
  layouts = jlora.infer_layouts(model.apply, params, tokens)
  return cfg, model, params, layouts, tokens


def make_tiny(folder):
  """A valid folder written by jlora for a tiny Flax GPT-2 (c_attn, c_proj)."""
  cfg = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2)
  params = random_params(GPT2LMHeadModel(cfg).init, jnp.zeros((1, 4), jnp.int32))
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=r".*/(c_attn|c_proj)/kernel")
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  jlora.peft.save(folder, perturb(trainable, 0), PORT_RULES, spec=spec)
  return params, spec, trainable, folder


def corrupt(src, dst, config=None, tensors=None):
  with open(os.path.join(src, "adapter_config.json")) as f:
    cfg = json.load(f)
  sd = load_file(os.path.join(src, "adapter_model.safetensors"))
  if config:
    config(cfg)
  if tensors:
    tensors(sd)
  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(dst, "adapter_config.json"), "w") as f:
    json.dump(cfg, f)
  save_file(sd, os.path.join(dst, "adapter_model.safetensors"))
  return dst
