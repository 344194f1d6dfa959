"""PEFT round trips on transformers' own Flax models, against PyTorch PEFT.

GPT-2, Llama, Mistral and BERT are built tiny with random weights in
PyTorch, ported to transformers' Flax classes (which ship with transformers
< 5), and adapted both ways with ``modules_to_save`` on a square kernel:

* PyTorch PEFT -> ``jlora.peft.load`` -> ``jlora.merge`` -> the Flax model
  gives PEFT's logits;
* ``jlora.lora_transform`` -> ``jlora.peft.save`` -> ``PeftModel.from_pretrained``
  gives jlora's logits, with no missing or unexpected key;
* ``jlora merge --rules NAME`` on the Flax base gives the same merged weights.

transformers' Flax GPT-2 stores its Conv1D kernels (out, in), so square ones
(``attn.c_proj``) are where a wrong layout would be silent: ``Rules.gpt2()``
knows it. Skipped without torch, PEFT or a transformers that has Flax models.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import cli

from flax.traverse_util import flatten_dict, unflatten_dict

from lazy import lazy, skip_without

torch = lazy("torch")
peft = lazy("peft")
transformers = lazy("transformers")


@pytest.fixture(autouse=True, scope="module")
def _needs_flax_models():
  pytest.importorskip("torch")
  pytest.importorskip("peft")
  skip_without(transformers, "FlaxGPT2LMHeadModel", "transformers >= 5 has no Flax models")


SMALL = dict(vocab_size=32)
# Each model: transformers' PyTorch and Flax classes by name, and the
# arguments of its config class (transformers is imported when a test runs).
MODELS = {
    "gpt2": dict(
        torch="GPT2LMHeadModel", flax="FlaxGPT2LMHeadModel",
        config=("GPT2Config", dict(n_embd=16, n_layer=2, n_head=2, n_positions=16, **SMALL)),
        rules=jlora.peft.Rules.gpt2, cli="gpt2",
        targets=["c_attn", "c_fc", "mlp.c_proj"], saved=["h.0.attn.c_proj"], fan_in_fan_out=True,
        flax_targets=r".*/(c_attn|c_fc|mlp/c_proj)/kernel", flax_saved=r".*/h/0/attn/c_proj/.*"),
    "llama": dict(
        torch="LlamaForCausalLM", flax="FlaxLlamaForCausalLM",
        config=("LlamaConfig", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=16, **SMALL)),
        rules=jlora.peft.Rules.llama, cli="llama",
        targets=["q_proj", "v_proj", "down_proj"], saved=["layers.0.self_attn.o_proj"],
        flax_targets=r".*/(q_proj|v_proj|down_proj)/kernel",
        flax_saved=r".*/layers/0/self_attn/o_proj/.*"),
    "mistral": dict(
        torch="MistralForCausalLM", flax="FlaxMistralForCausalLM",
        config=("MistralConfig", dict(hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=16,
                                      **SMALL)),
        rules=jlora.peft.Rules.llama, cli="llama",
        targets=["k_proj", "o_proj", "gate_proj"], saved=["layers.1.self_attn.q_proj"],
        flax_targets=r".*/(k_proj|o_proj|gate_proj)/kernel",
        flax_saved=r".*/layers/1/self_attn/q_proj/.*"),
    "bert": dict(
        torch="BertForMaskedLM", flax="FlaxBertForMaskedLM",
        config=("BertConfig", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, max_position_embeddings=16,
                                   **SMALL)),
        rules=jlora.peft.Rules.bert, cli="bert",
        targets=["query", "value"], saved=["layer.0.attention.output.dense"],
        flax_targets=r".*/(query|value)/kernel",
        flax_saved=r".*/layer/0/attention/output/dense/.*"),
}


def _models(name):
  """(case, torch model, Flax model, Flax params holding the torch weights)."""
  m = dict(MODELS[name])
  config_class, config_args = m["config"]
  m["config"] = getattr(transformers, config_class)(**config_args)
  torch.manual_seed(0)
  tm = getattr(transformers, m["torch"])(m["config"]).eval()
  # _do_init=False: no (slow, eager) random init
  fm = getattr(transformers, m["flax"])(m["config"], _do_init=False)
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  flat = {}
  for path, shape in flatten_dict(fm.params_shape_tree).items():
    torch_leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(path[-1],
                                                                                  path[-1])
    value = sd[".".join(path[:-1] + (torch_leaf,))]
    if path[-1] == "kernel":  # nn.Linear (out, in) -> Dense (in, out); Conv1D (in, out) -> (out, in)
      value = value.T
    assert value.shape == shape.shape, (path, value.shape, shape.shape)
    flat[path] = jnp.asarray(value)
  return m, tm, fm, unflatten_dict(flat)


def params_at(params, path):
  node = params
  for part in path.split("/"):
    node = node[part]
  return node


def _ids():
  return np.random.default_rng(0).integers(0, 32, size=(2, 8), dtype=np.int64)


def _torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.from_numpy(ids)).logits.numpy()


_FORWARD = {}


def _flax_logits(fm, params, ids):
  """The Flax model's logits, one compilation per model (not op by op)."""
  if id(fm) not in _FORWARD:
    _FORWARD[id(fm)] = (fm, jax.jit(lambda p, x: fm(x, params=p).logits))
  return np.asarray(_FORWARD[id(fm)][1](params, jnp.asarray(ids, jnp.int32)))


def _randomize(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
      elif "modules_to_save" in name:
        p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _load_in_peft(tm, folder):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = peft.PeftModel.from_pretrained(copy.deepcopy(tm), folder)
  bad = [str(w.message) for w in caught
         if re.search(r"missing|unexpected|fan_in_fan_out|ignored", str(w.message), re.I)]
  assert not bad, bad
  res = model.load_adapter(folder, adapter_name="check")
  assert not res.missing_keys and not res.unexpected_keys, res
  model.set_adapter("default")
  return model.eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trips_with_peft(name, tmp_path):
  m, tm, fm, params = _models(name)
  rules = m["rules"]()
  ids = _ids()
  base_logits = _torch_logits(tm, ids)
  np.testing.assert_allclose(_flax_logits(fm, params, ids), base_logits, atol=1e-4)

  # PyTorch PEFT -> jlora
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=m["targets"],
                           modules_to_save=m["saved"],
                           fan_in_fan_out=m.get("fan_in_fan_out", False))
  pm = peft.get_peft_model(copy.deepcopy(tm), config)
  _randomize(pm, 1)
  pm.save_pretrained(tmp_path / "from_peft")
  expected = _torch_logits(pm.eval(), ids)
  assert np.max(np.abs(expected - base_logits)) > 0.05          # the adapter matters
  ad = jlora.peft.load(tmp_path / "from_peft", params, rules)
  got = _flax_logits(fm, jlora.merge(ad.frozen, ad.trainable), ids)
  np.testing.assert_allclose(got, expected, atol=1e-4)
  assert any(isinstance(x, jax.Array) for x in jax.tree.leaves(ad.trainable))   # saved module

  # jlora -> PyTorch PEFT
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=m["flax_targets"],
                        extra_trainable=m["flax_saved"])
  layouts = jlora.infer_layouts(lambda p, x: fm(x, params=p).logits, params,
                                jnp.asarray(ids, jnp.int32))
  # Factors drawn by NumPy on the abstract split: no XLA compilation for their init.
  _, trainable = jlora.lora_transform(jax.eval_shape(lambda: params), spec, layouts=layouts)
  rng = np.random.default_rng(2)
  trainable = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype),
                           trainable)
  extras = {jlora.path_str(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(
      trainable) if re.fullmatch(m["flax_saved"], jlora.path_str(kp))}
  assert extras, "no weight trained in full"
  trainable = jax.tree_util.tree_map_with_path(   # a saved module starts at the base's values
      lambda kp, x: x + params_at(params, jlora.path_str(kp)) if jlora.path_str(kp) in extras
      else x, trainable)
  frozen = jlora.frozen_like(params, trainable)
  saved = jlora.peft.save(tmp_path / "from_jlora", trainable, rules, spec=spec)
  assert saved["modules_to_save"] and saved["fan_in_fan_out"] == m.get("fan_in_fan_out", False)
  ours = _flax_logits(fm, jlora.merge(frozen, trainable), ids)
  theirs = _torch_logits(_load_in_peft(tm, tmp_path / "from_jlora"), ids)
  assert np.max(np.abs(ours - base_logits)) > 0.05
  np.testing.assert_allclose(theirs, ours, atol=1e-4)

  # jlora merge on the command line, from the base on disk, with --rules NAME.
  base = jlora.base.save(tmp_path / "base.safetensors", params)
  out = tmp_path / "merged.safetensors"
  assert cli.main(["merge", "--base", str(base), "--adapter", str(tmp_path / "from_peft"),
                   "--out", str(out), "--rules", m["cli"], "--quiet"]) == 0
  merged = jlora.base.load(out, like=params)
  np.testing.assert_allclose(_flax_logits(fm, merged, ids), expected, atol=1e-4)


def test_gpt2_kernels_are_out_in_and_a_wrong_order_is_refused(tmp_path):
  """transformers' Flax GPT-2 stores c_attn (3d, d): the generic rules (Flax's
  (in, out)) are refused with a hint, not applied transposed; with an unknown
  order the square attn.c_proj is refused rather than guessed."""
  m, tm, fm, params = _models("gpt2")
  assert params["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].shape == (48, 16)
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                           fan_in_fan_out=True)
  pm = peft.get_peft_model(copy.deepcopy(tm), config)
  _randomize(pm, 3)
  pm.save_pretrained(tmp_path)
  with pytest.raises(jlora.LoraPeftError,
                     match=r"c_attn/kernel' \(48, 16\) only if it is stored \(out, in\), but "
                           r"the rules say kernel_order='in_out'.*infer_layouts"):
    jlora.peft.load(tmp_path, params, jlora.peft.Rules.gpt2(kernel_order="in_out"))
  only_square = jlora.peft.Rules.gpt2(kernel_order=None)
  with pytest.raises(jlora.LoraLayoutError,
                     match=r"attn/c_proj/kernel' \(16, 16\): cannot tell whether this square "
                           r"kernel.*--layout"):
    jlora.peft.load(tmp_path, params, only_square)
  # The model function tells: infer_layouts, then any rules.
  layouts = jlora.infer_layouts(lambda p, x: fm(x, params=p).logits, params,
                                jnp.zeros((1, 4), jnp.int32))
  ad = jlora.peft.load(tmp_path, params, only_square, layouts=layouts)
  ids = _ids()
  np.testing.assert_allclose(_flax_logits(fm, jlora.merge(ad.frozen, ad.trainable), ids),
                             _torch_logits(pm.eval(), ids), atol=1e-4)


@pytest.mark.parametrize("saved", ["h.0.attn.c_proj", "h.0.mlp.c_fc"])
def test_rules_that_contradict_the_folders_fan_in_fan_out_are_refused(saved, tmp_path):
  """A GPT-2 folder PEFT wrote says fan_in_fan_out=true (Conv1D weights stored
  (in, out)); the generic rules say its modules are nn.Linear (out, in), which
  would put the modules_to_save weight in transposed: silently on the square
  attn.c_proj, a shape error on mlp.c_fc. Refused, naming both; Rules.gpt2()
  (which agrees with the file) loads PEFT's logits."""
  m, tm, fm, params = _models("gpt2")
  pm = peft.get_peft_model(copy.deepcopy(tm), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["c_attn"], modules_to_save=[saved],
      fan_in_fan_out=True))
  _randomize(pm, 4)
  pm.save_pretrained(tmp_path)
  layouts = jlora.infer_layouts(lambda p, x: fm(x, params=p).logits, params,
                                jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(jlora.LoraPeftError,
                     match=r"adapter_config.json': fan_in_fan_out=true .*\(in, out\).*"
                           r"transformer.h.0.attn.c_attn.*Rules.fan_in_fan_out=False"):
    jlora.peft.load(tmp_path, params, jlora.peft.Rules.generic(), layouts=layouts)
  ad = jlora.peft.load(tmp_path, params, jlora.peft.Rules.gpt2(), layouts=layouts)
  ids = _ids()
  np.testing.assert_allclose(_flax_logits(fm, jlora.merge(ad.frozen, ad.trainable), ids),
                             _torch_logits(pm.eval(), ids), atol=1e-4)
  # The other way round: a file that says not every adapted module is stored
  # (in, out), rules that say all are.
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": False}))
  with pytest.raises(jlora.LoraPeftError, match=r"fan_in_fan_out=false .*all of them are"):
    jlora.peft.load(tmp_path, params, jlora.peft.Rules.gpt2(), layouts=layouts)
