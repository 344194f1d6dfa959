"""Import: jlora.peft.load refuses every folder it cannot load faithfully, naming the problem."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

import jlora
from peft_util import PORT_RULES, PREFIX, corrupt, make_stacked, make_tiny


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
    "dora_without_magnitudes": (dict(config=set_("use_dora", True)),
                                rf"no '{re.escape(K)}\.lora_magnitude_vector' .* use_dora is true"),
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
    "integer_lora_a": (dict(tensors=lambda sd: sd.__setitem__(
        K + ".lora_A.weight", np.ones((4, 16), np.int32))),
        rf"'{re.escape(K)}\.lora_A\.weight' has dtype int32; LoRA factors must be floating"),
    "bool_lora_b": (dict(tensors=lambda sd: sd.__setitem__(
        K + ".lora_B.weight", np.zeros((48, 4), bool))),
        rf"'{re.escape(K)}\.lora_B\.weight' has dtype bool; LoRA factors must be floating"),
    "dora_tensor": (dict(tensors=lambda sd: sd.update({K + ".lora_magnitude_vector": np.ones(48, np.float32)})),
                    r"lora_magnitude_vector' is a DoRA magnitude, but .* use_dora=false"),
    "embedding_copy": (dict(tensors=lambda sd: sd.update({
        PREFIX + "transformer.wte.base_layer.weight": np.ones((32, 16), np.float32)})),
        r"'base_model\.model\.transformer\.wte\.base_layer\.weight' is a copy of the base "
        r"weights of 'transformer\.wte'.*differs from 'params/transformer/wte/embedding'"),
    "lookup_of_a_tied_table": (dict(tensors=lambda sd: sd.update({
        PREFIX + "transformer.wte.lora_embedding_A": np.zeros((4, 32), np.float32),
        PREFIX + "transformer.wte.lora_embedding_B": np.zeros((16, 4), np.float32)}),
        config=set_("target_modules", ["c_attn", "c_proj", "wte"])),
        r"the table of 'transformer\.wte' is tied to \['lm_head'\], and this folder adapts "
        r"its lookup only"),
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
    jlora.peft.load(bad, params, PORT_RULES)


def test_harmless_config_keys_are_accepted(tiny, tmp_path):
  params, _, trainable, folder = tiny
  ok = corrupt(folder, tmp_path, config=lambda c: c.update(
      use_magic=None, peft_version="9.9", task_type="CAUSAL_LM", init_lora_weights="gaussian"))
  ad = jlora.peft.load(ok, params, PORT_RULES)
  want = trainable["params"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
  got = ad.trainable["params"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
  assert got.layout == want.layout and got.scale == want.scale and got.a.shape == want.a.shape


def test_missing_or_pickled_files_raise(tiny, tmp_path):
  params, _, _, folder = tiny
  with pytest.raises(jlora.LoraPeftError, match="has no adapter_config.json"):
    jlora.peft.load(tmp_path, params, PORT_RULES)
  corrupt(folder, tmp_path / "bin")
  os.rename(tmp_path / "bin" / "adapter_model.safetensors", tmp_path / "bin" / "adapter_model.bin")
  with pytest.raises(jlora.LoraPeftError, match="adapter_model.bin, a pickle, which jlora never reads"):
    jlora.peft.load(tmp_path / "bin", params, PORT_RULES)


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


def test_each_factor_keeps_its_values_whatever_the_dtypes(tiny, tmp_path):
  """Issue 10 item 8: a float16 lora_A with a float32 lora_B of large values
  must not turn B into inf; a narrower dtype asked for is refused, naming the key."""
  params, _, _, folder = tiny

  def mixed(sd):
    sd[K + ".lora_A.weight"] = sd[K + ".lora_A.weight"].astype(np.float16)
    sd[K + ".lora_B.weight"] = np.full_like(sd[K + ".lora_B.weight"], 1e5)   # > float16's max
  bad = corrupt(folder, tmp_path / "mixed", tensors=mixed)
  ad = jlora.peft.load(bad, params, PORT_RULES)
  lp = ad.trainable["params"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
  assert lp.a.dtype == lp.b.dtype == np.float32 and ad.spec.dtype == np.float32
  assert np.all(np.asarray(lp.b) == 1e5)
  from safetensors.numpy import load_file
  np.testing.assert_array_equal(np.asarray(lp.a),
                                load_file(bad / "adapter_model.safetensors")[K + ".lora_A.weight"]
                                .astype(np.float32).T)
  with pytest.raises(jlora.LoraPeftError,
                     match=re.escape(f"'{K}.lora_B.weight' does not fit in float16")):
    jlora.peft.load(bad, params, PORT_RULES, dtype=np.float16)
  assert jlora.peft.load(folder, params, PORT_RULES, dtype=np.float16).spec.dtype == np.float16


def _write_config(src, dst, text: bytes):
  shutil.copytree(src, dst)
  (dst / "adapter_config.json").write_bytes(text)
  return dst


MALFORMED = {
    "target_modules=5": (lambda c: c.update(target_modules=5), "target_modules must be"),
    "bad regex in target_modules": (lambda c: c.update(target_modules="(c_attn"),
                                    "target_modules has an invalid regex"),
    "bad regex in rank_pattern": (lambda c: c.update(rank_pattern={"c_attn[": 2}),
                                  "rank_pattern has an invalid regex"),
    "rank_pattern value": (lambda c: c.update(rank_pattern={"c_attn": "four"}),
                           r"rank_pattern\['c_attn'\] must be an integer"),
    "modules_to_save=1": (lambda c: c.update(modules_to_save=1), "modules_to_save must be"),
    "lora_dropout string": (lambda c: c.update(lora_dropout="0.1"), "lora_dropout must be"),
    "layers_to_transform": (lambda c: c.update(layers_to_transform="0"),
                            "layers_to_transform must be"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_configs_raise_one_line(tiny, tmp_path, case):
  """Crashes and poor messages (issue 10): a raw TypeError, re.error,
  UnicodeDecodeError or RecursionError becomes one LoraPeftError line."""
  params, _, _, folder = tiny
  edit, message = MALFORMED[case]
  config = json.loads((folder / "adapter_config.json").read_text())
  edit(config)
  bad = _write_config(folder, tmp_path / "bad", json.dumps(config).encode())
  with pytest.raises(jlora.LoraPeftError, match=message) as err:
    jlora.peft.load(bad, params, PORT_RULES)
  assert len(str(err.value).splitlines()) == 1 and "adapter_config.json" in str(err.value)


@pytest.mark.parametrize("text, message", [
    (b'{"peft_type": "LORA", "r": 4, "lora_alpha": \xff8}', "is not UTF-8 text"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (b'{"peft_type": "LORA", "r": 4', "is not valid JSON"),
])
def test_undecodable_configs_raise_one_line(tiny, tmp_path, text, message):
  params, _, _, folder = tiny
  bad = _write_config(folder, tmp_path / "bad", text)
  for read in (lambda: jlora.peft.load(bad, params, PORT_RULES), lambda: jlora.peft.describe(bad)):
    with pytest.raises(jlora.LoraPeftError, match=message) as err:
      read()
    assert len(str(err.value).splitlines()) == 1


def test_overwrite_replaces_only_a_folder_jlora_wrote(tiny, tmp_path):
  """Issue 10 item 1: a PEFT folder written by another tool, or any other
  folder, is never replaced."""
  params, spec, trainable, folder = tiny
  theirs = corrupt(folder, tmp_path / "theirs")            # no jlora mark, as PEFT writes it
  (theirs / "README.md").write_text("my notes")
  with pytest.raises(jlora.LoraPeftError, match="already exists; pass overwrite=True"):
    jlora.peft.save(theirs, trainable, PORT_RULES, spec=spec)
  with pytest.raises(jlora.LoraPeftError, match="is not a PEFT folder written by jlora"):
    jlora.peft.save(theirs, trainable, PORT_RULES, spec=spec, overwrite=True)
  assert (theirs / "README.md").read_text() == "my notes"
  ours = tmp_path / "ours"
  jlora.peft.save(ours, trainable, PORT_RULES, spec=spec)
  jlora.peft.save(ours, trainable, PORT_RULES, spec=spec, overwrite=True)
  assert sorted(p.name for p in ours.iterdir()) == ["adapter_config.json",
                                                   "adapter_model.safetensors"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "theirs"]


def test_a_changed_config_or_tensor_of_a_jlora_folder_is_refused(tiny, tmp_path):
  """A folder jlora wrote carries checksums: a config edited to another alpha
  (a new config beside old tensors) is refused; a harmless edit is not."""
  params, _, _, folder = tiny
  edited = tmp_path / "edited"
  shutil.copytree(folder, edited)
  config = json.loads((edited / "adapter_config.json").read_text())
  (edited / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 16}))
  with pytest.raises(jlora.LoraPeftError, match="was changed after jlora wrote this folder"):
    jlora.peft.load(edited, params, PORT_RULES)
  (edited / "adapter_config.json").write_text(
      json.dumps({**config, "base_model_name_or_path": "my/base"}))
  jlora.peft.load(edited, params, PORT_RULES)
