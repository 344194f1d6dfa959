"""Import: jlora.peft.load refuses every folder it cannot load faithfully, naming the problem."""

import os
import re

import jax
import numpy as np
import pytest

import jlora
from peft_util import PREFIX, corrupt, make_stacked, make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def stacked():
  return make_stacked()


K = PREFIX + "transformer.h.0.attn.c_attn"


def set_(key, value):
  return lambda cfg: cfg.__setitem__(key, value)


def rename(old, new):
  return lambda sd: sd.__setitem__(new, sd.pop(old))


BAD = {
    "peft_type": (dict(config=set_("peft_type", "IA3")), r"peft_type 'IA3' is not supported"),
    "no_peft_type": (dict(config=lambda c: c.pop("peft_type")), r"no 'peft_type'"),
    "dora": (dict(config=set_("use_dora", True)), r"use_dora=True \(DoRA"),
    "bias": (dict(config=set_("bias", "all")), r"bias='all' is not supported"),
    "lora_bias": (dict(config=set_("lora_bias", True)), r"lora_bias=True"),
    "pissa": (dict(config=set_("init_lora_weights", "pissa")), r"init_lora_weights='pissa'"),
    "unknown_option": (dict(config=set_("use_magic", True)), r"unknown option use_magic=True"),
    "rank_mismatch": (dict(config=set_("r", 8)), rf"'{re.escape(K)}\.lora_A\.weight' has rank 4 but .* rank 8"),
    "missing_b": (dict(tensors=lambda sd: sd.pop(K + ".lora_B.weight")),
                  rf"'{re.escape(K)}\.lora_A\.weight' has no partner '{re.escape(K)}\.lora_B\.weight'"),
    "missing_module": (dict(tensors=lambda sd: [sd.pop(K + ".lora_A.weight"), sd.pop(K + ".lora_B.weight")]),
                       r"no lora_A/lora_B for module 'transformer\.h\.0\.attn\.c_attn'"),
    "extra_module": (dict(tensors=lambda sd: sd.update({
        PREFIX + "transformer.h.5.attn.c_attn.lora_A.weight": np.zeros((4, 16), np.float32),
        PREFIX + "transformer.h.5.attn.c_attn.lora_B.weight": np.zeros((48, 4), np.float32)})),
        r"key 'base_model\.model\.transformer\.h\.5\.attn\.c_attn\.lora_A\.weight' is for PyTorch module"),
    "stray_key": (dict(tensors=lambda sd: sd.update({PREFIX + "transformer.ln_f.weight": np.ones(16, np.float32)})),
                  r"unexpected key 'base_model\.model\.transformer\.ln_f\.weight'"),
    "no_prefix": (dict(tensors=rename(K + ".lora_A.weight", "transformer.h.0.attn.c_attn.lora_A.weight")),
                  r"key 'transformer\.h\.0\.attn\.c_attn\.lora_A\.weight' lacks the 'base_model\.model\.' prefix"),
    "transposed": (dict(tensors=lambda sd: sd.__setitem__(K + ".lora_B.weight", np.zeros((4, 48), np.float32))),
                   rf"'{re.escape(K)}\.lora_A\.weight' \(4, 16\) and '{re.escape(K)}\.lora_B\.weight' \(4, 48\)"),
    "wrong_fan_in": (dict(tensors=lambda sd: sd.__setitem__(K + ".lora_A.weight", np.zeros((4, 17), np.float32))),
                     rf"'{re.escape(K)}\.lora_A\.weight' \(4, 17\) .* do not fit "
                     r"'params/transformer/h/0/attn/c_attn/kernel'"),
    "dora_tensor": (dict(tensors=lambda sd: sd.update({K + ".lora_magnitude_vector": np.ones(48, np.float32)})),
                    r"lora_magnitude_vector' is a DoRA magnitude"),
    "untargeted": (dict(config=set_("target_modules", ["c_proj"])),
                   r"module 'transformer\.h\.0\.attn\.c_attn', which target_modules \['c_proj'\] does not select"),
    "targets_more": (dict(config=set_("target_modules", ["c_attn", "c_proj", "c_fc"])),
                     r"no lora_A/lora_B for module 'transformer\.h\.0\.mlp\.c_fc'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_folders_raise_naming_the_problem(tiny, tmp_path, case):
  params, _, _, folder = tiny
  changes, message = BAD[case]
  bad = corrupt(folder, tmp_path / case, **changes)
  with pytest.raises(jlora.LoraPeftError, match=message):
    jlora.peft.load(bad, params, jlora.peft.Rules.gpt2())


def test_harmless_config_keys_are_accepted(tiny, tmp_path):
  params, _, trainable, folder = tiny
  ok = corrupt(folder, tmp_path, config=lambda c: c.update(
      use_magic=None, peft_version="9.9", task_type="CAUSAL_LM", init_lora_weights="gaussian"))
  ad = jlora.peft.load(ok, params, jlora.peft.Rules.gpt2())
  want = trainable["params"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
  got = ad.trainable["params"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
  assert got.layout == want.layout and got.scale == want.scale and got.a.shape == want.a.shape


def test_missing_or_pickled_files_raise(tiny, tmp_path):
  params, _, _, folder = tiny
  with pytest.raises(jlora.LoraPeftError, match="has no adapter_config.json"):
    jlora.peft.load(tmp_path, params, jlora.peft.Rules.gpt2())
  corrupt(folder, tmp_path / "bin")
  os.rename(tmp_path / "bin" / "adapter_model.safetensors", tmp_path / "bin" / "adapter_model.bin")
  with pytest.raises(jlora.LoraPeftError, match="adapter_model.bin, a pickle, which jlora never reads"):
    jlora.peft.load(tmp_path / "bin", params, jlora.peft.Rules.gpt2())


def test_stack_with_per_layer_ranks_raises(stacked, tmp_path):
  cfg, model, params, layouts, tokens = stacked
  spec = jlora.LoraSpec(rank=2, targets=r".*/layers/up/kernel")
  _, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0), layouts=layouts)
  rules = jlora.peft.Rules.scanned()
  jlora.peft.save(tmp_path / "ok", trainable, rules)
  up = PREFIX + "model.layers.1.up"

  def rank1(sd):
    sd[up + ".lora_A.weight"] = sd[up + ".lora_A.weight"][:1]
    sd[up + ".lora_B.weight"] = sd[up + ".lora_B.weight"][:, :1]
  bad = corrupt(tmp_path / "ok", tmp_path / "bad", config=set_("rank_pattern", {"layers.1.up": 1}),
                 tensors=rank1)
  with pytest.raises(jlora.LoraPeftError, match=r"modules of stacked 'params/layers/up/kernel' have different"):
    jlora.peft.load(bad, params, rules, layouts=layouts)
  gap = corrupt(tmp_path / "ok", tmp_path / "gap", tensors=lambda sd: [sd.pop(up + ".lora_A.weight"),
                                                                         sd.pop(up + ".lora_B.weight")])
  with pytest.raises(jlora.LoraPeftError, match=r"missing keys 'base_model\.model\.model\.layers\.1\.up\.lora_A"):
    jlora.peft.load(gap, params, rules, layouts=layouts)
  with pytest.raises(jlora.LoraLayoutError, match="params/layers/up/kernel"):
    jlora.peft.load(tmp_path / "ok", params, rules)  # a 3-D stacked kernel needs its layout
