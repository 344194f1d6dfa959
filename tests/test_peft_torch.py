"""PEFT folders against PyTorch PEFT: jlora.peft.save / jlora.peft.load.

The tests build the tiny GPT-2 of gpt2_flax.py in transformers, adapt it with
PEFT, and compare logits with the Flax port run through jlora.lora; they skip
when torch, transformers or peft are missing.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jlora
from gpt2_flax import make_tiny_torch_gpt2
from peft_util import (PORT_RULES, PREFIX, TARGETS, flax_gpt2, jlora_logits, load_in_peft, make_ids,
                       peft_adapter, perturb, pt_modules, torch_logits)


@pytest.fixture(scope="module")
def pt():
  return pt_modules()


# -- PyTorch PEFT -> jlora -----------------------------------------------------


def test_peft_adapter_loads_with_same_logits(pt, tmp_path):
  torch, peft = pt
  base = make_tiny_torch_gpt2(0)
  model, params = flax_gpt2(base)
  ids = make_ids()
  base_logits = torch_logits(torch, base, ids)
  tmodel = peft_adapter(torch, peft, base, tmp_path, modules_to_save=["ln_f"])
  expected = torch_logits(torch, tmodel, ids)
  assert np.max(np.abs(expected - base_logits)) > 0.05  # the adapter matters

  ad = jlora.peft.load(tmp_path, params, PORT_RULES)
  got = jlora_logits(model, ad.frozen, ad.trainable, ids)
  assert np.max(np.abs(got - expected)) < 1e-4

  lp = ad.trainable["params"]["transformer"]["h"]["1"]["mlp"]["c_fc"]["kernel"]
  assert lp.a.shape == (64, 4) and lp.b.shape == (4, 256) and lp.scale == 2.0
  sd = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  np.testing.assert_array_equal(np.asarray(lp.a), sd[PREFIX + "transformer.h.1.mlp.c_fc.lora_A.weight"].T)
  assert ad.frozen["params"]["transformer"]["ln_f"]["scale"] is None
  assert ad.trainable["params"]["transformer"]["ln_f"]["bias"].shape == (64,)
  assert (ad.spec.rank, ad.spec.alpha, ad.spec.use_rslora) == (4, 8.0, False)
  assert ad.spec.is_target("params/transformer/h/0/attn/c_proj/kernel", None)
  assert not ad.spec.is_target("params/transformer/h/0/attn/c_proj/bias", None)
  assert ad.spec.is_extra_trainable("params/transformer/ln_f/scale", None)


def test_rslora_and_patterns_from_peft_and_back(pt, tmp_path):
  torch, peft = pt
  base = make_tiny_torch_gpt2(1)
  model, params = flax_gpt2(base)
  ids = make_ids(1)
  tmodel = peft_adapter(torch, peft, base, tmp_path / "peft", seed=1, use_rslora=True,
                         rank_pattern={"h.1.mlp.c_fc": 2}, alpha_pattern={"h.0.attn.c_attn": 16})
  expected = torch_logits(torch, tmodel, ids)

  ad = jlora.peft.load(tmp_path / "peft", params, PORT_RULES)
  h = ad.trainable["params"]["transformer"]["h"]
  assert h["1"]["mlp"]["c_fc"]["kernel"].rank == 2
  assert h["1"]["mlp"]["c_fc"]["kernel"].scale == pytest.approx(8 / np.sqrt(2))
  assert h["0"]["attn"]["c_attn"]["kernel"].scale == pytest.approx(16 / 2)
  assert h["0"]["mlp"]["c_fc"]["kernel"].scale == pytest.approx(8 / 2)
  assert ad.spec.use_rslora
  got = jlora_logits(model, ad.frozen, ad.trainable, ids)
  assert np.max(np.abs(got - expected)) < 1e-4

  config = jlora.peft.save(tmp_path / "jlora", ad.trainable, PORT_RULES, spec=ad.spec)
  assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, True)
  assert config["rank_pattern"] == {"^" + re.escape("transformer.h.1.mlp.c_fc"): 2}
  assert config["alpha_pattern"] == {"^" + re.escape("transformer.h.0.attn.c_attn"): 16}
  back = load_in_peft(torch, peft, tmp_path / "jlora", seed=1)
  assert np.max(np.abs(torch_logits(torch, back, ids) - expected)) < 1e-4


# -- jlora -> PyTorch PEFT -----------------------------------------------------


def test_jlora_adapter_loads_in_peft(pt, tmp_path):
  torch, peft = pt
  base = make_tiny_torch_gpt2(2)
  model, params = flax_gpt2(base)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=TARGETS, extra_trainable=r".*/ln_f/.*")
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  trainable = perturb(trainable, 0)
  ids = make_ids(2)
  ours = jlora_logits(model, frozen, trainable, ids)

  config = jlora.peft.save(tmp_path, trainable, PORT_RULES, spec=spec,
                           base_model_name_or_path="tiny-gpt2")
  assert sorted(config["target_modules"]) == ["c_attn", "c_fc", "c_proj"]
  assert config["modules_to_save"] == ["transformer.ln_f"]
  assert config["fan_in_fan_out"] is True
  sd = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  assert len(sd) == 2 * 4 * 2 + 2
  assert sd[PREFIX + "transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 64)
  assert sd[PREFIX + "transformer.h.0.attn.c_attn.lora_B.weight"].shape == (192, 4)

  tmodel = load_in_peft(torch, peft, tmp_path, seed=2)
  theirs = torch_logits(torch, tmodel, ids)
  assert np.max(np.abs(ours - torch_logits(torch, base, ids))) > 0.05
  assert np.max(np.abs(ours - theirs)) < 1e-4

  # The config agrees with what PEFT itself writes for the same adapter.
  reference = tmp_path / "reference"
  peft.get_peft_model(make_tiny_torch_gpt2(2), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
      modules_to_save=["transformer.ln_f"])).save_pretrained(reference)
  with open(reference / "adapter_config.json") as f:
    theirs_cfg = json.load(f)
  assert set(config) <= set(theirs_cfg)
  for key, value in config.items():
    if key in ("target_modules", "auto_mapping", "base_model_name_or_path"):
      continue  # set order; written for task_type None; get_peft_model resets the name
    assert theirs_cfg[key] == value, key
  assert sorted(theirs_cfg["target_modules"]) == sorted(config["target_modules"])


def test_rslora_and_patterns_to_peft(pt, tmp_path):
  torch, peft = pt
  base = make_tiny_torch_gpt2(3)
  model, params = flax_gpt2(base)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=TARGETS, use_rslora=True,
                        rank_pattern={"h/0/mlp/c_proj/kernel": 2}, alpha_pattern={"c_attn/kernel": 3})
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(1))
  trainable = perturb(trainable, 1)
  config = jlora.peft.save(tmp_path, trainable, PORT_RULES, spec=spec)
  assert config["use_rslora"] and (config["r"], config["lora_alpha"]) == (4, 8)
  assert config["rank_pattern"] == {"^" + re.escape("transformer.h.0.mlp.c_proj"): 2}
  assert config["alpha_pattern"] == {"^" + re.escape(f"transformer.h.{i}.attn.c_attn"): 3 for i in range(2)}
  ids = make_ids(3)
  theirs = torch_logits(torch, load_in_peft(torch, peft, tmp_path, seed=3), ids)
  assert np.max(np.abs(jlora_logits(model, frozen, trainable, ids) - theirs)) < 1e-4

  # Without the spec, rsLoRA is unknown: alpha is written for plain LoRA and
  # PEFT still computes the same scale.
  plain = jlora.peft.save(tmp_path / "plain", trainable, PORT_RULES)
  assert not plain["use_rslora"] and (plain["r"], plain["lora_alpha"]) == (4, 16)
  theirs = torch_logits(torch, load_in_peft(torch, peft, tmp_path / "plain", seed=3), ids)
  assert np.max(np.abs(jlora_logits(model, frozen, trainable, ids) - theirs)) < 1e-4


def test_some_layers_only_writes_full_module_names(pt, tmp_path):
  torch, peft = pt
  base = make_tiny_torch_gpt2(4)
  model, params = flax_gpt2(base)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=r".*/h/0/attn/c_attn/kernel")
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(2))
  trainable = perturb(trainable, 2)
  config = jlora.peft.save(tmp_path, trainable, PORT_RULES, spec=spec)
  # "c_attn" alone would also select layer 1's c_attn, which has no factors.
  assert config["target_modules"] == ["transformer.h.0.attn.c_attn"]
  ids = make_ids(4)
  theirs = torch_logits(torch, load_in_peft(torch, peft, tmp_path, seed=4), ids)
  assert np.max(np.abs(jlora_logits(model, frozen, trainable, ids) - theirs)) < 1e-4


# -- rank_pattern / alpha_pattern keys are anchored (issue 10 item 6) -----------------


def _nested_net(torch):
  class Net(torch.nn.Module):
    """Modules 'fc' and 'block.fc': an unanchored key for 'fc' also picks 'block.fc'."""

    def __init__(self):
      super().__init__()
      torch.manual_seed(0)
      self.fc = torch.nn.Linear(8, 8)
      self.block = torch.nn.Module()
      self.block.fc = torch.nn.Linear(8, 8)
      self.block.out = torch.nn.Linear(8, 4)

    def forward(self, x):
      return self.block.out(torch.relu(self.block.fc(torch.relu(self.fc(x)))))
  return Net


def test_pattern_keys_apply_to_their_own_module_in_peft(pt, tmp_path):
  torch, peft = pt
  Net = _nested_net(torch)
  sd = {k: v.numpy() for k, v in Net().state_dict().items()}
  params = {m: {"kernel": jnp.asarray(sd[f"{m.replace('/', '.')}.weight"].T),
                "bias": jnp.asarray(sd[f"{m.replace('/', '.')}.bias"])}
            for m in ("fc", "block/fc", "block/out")}
  params = {"fc": params["fc"], "block": {"fc": params["block/fc"], "out": params["block/out"]}}

  def fn(p, x):
    h = jax.nn.relu(x @ p["fc"]["kernel"] + p["fc"]["bias"])
    h = jax.nn.relu(h @ p["block"]["fc"]["kernel"] + p["block"]["fc"]["bias"])
    return h @ p["block"]["out"]["kernel"] + p["block"]["out"]["bias"]

  spec = jlora.LoraSpec(rank=4, alpha=16, targets=r"(block/)?(fc|out)/kernel",
                        rank_pattern={"^fc/kernel": 2}, alpha_pattern={"^fc/kernel": 4,
                                                                     "block/out/kernel": 8})
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  trainable = perturb(trainable, 5, std=0.3)
  assert trainable["fc"]["kernel"].rank == 2 and trainable["block"]["fc"]["kernel"].rank == 4
  config = jlora.peft.save(tmp_path, trainable, jlora.peft.Rules.generic(), spec=spec)
  assert config["rank_pattern"] == {"^fc": 2}
  assert config["alpha_pattern"] == {"^block\\.out": 8, "^fc": 4}
  model = peft.PeftModel.from_pretrained(Net(), tmp_path).eval()
  ranks = {n: p.shape[0] for n, p in model.named_parameters() if "lora_A" in n}
  assert ranks == {"base_model.model.fc.lora_A.default.weight": 2,
                   "base_model.model.block.fc.lora_A.default.weight": 4,
                   "base_model.model.block.out.lora_A.default.weight": 4}
  x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
  with torch.no_grad():
    theirs = model(torch.from_numpy(x)).numpy()
  ours = np.asarray(jlora.lora(fn)(frozen, trainable, jnp.asarray(x)))
  assert np.max(np.abs(ours - np.asarray(fn(params, x)))) > 0.05
  np.testing.assert_allclose(theirs, ours, atol=1e-5)
  back = jlora.peft.load(tmp_path, params, jlora.peft.Rules.generic())
  assert back.trainable["block"]["fc"]["kernel"].scale == 4.0
  assert back.trainable["fc"]["kernel"].scale == 2.0
