"""PEFT adapter folders: jlora.save_peft / jlora.load_peft against PyTorch PEFT.

The interop tests build the tiny GPT-2 of gpt2_flax.py in transformers, adapt
it with PEFT, and compare logits with the Flax port run through jlora.lora;
they skip when torch, transformers or peft are missing. The other tests need
jax only: name rules, nn.scan stacks checked against the merged weights, and
every bad input.
"""

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
TARGETS = r".*/(c_attn|c_proj|c_fc)/kernel"


# -- helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pt():
  """torch, transformers and peft, or skip the interop tests."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  return torch, peft


def _ids(seed=0, vocab=128):
  return np.random.default_rng(seed).integers(0, vocab, size=(2, 12), dtype=np.int64)


def _torch_logits(torch, model, ids):
  with torch.no_grad():
    return model(torch.from_numpy(ids)).logits.numpy()


def _flax_gpt2(tm):
  """The Flax model and ``{"params": ...}`` holding tm's (base) weights."""
  return GPT2LMHeadModel(config_from_hf(tm.config)), {"params": params_from_torch(tm.state_dict())}


def _jlora_logits(model, frozen, trainable, ids):
  return np.asarray(jax.jit(jlora.lora(model.apply))(frozen, trainable, jnp.asarray(ids, jnp.int32)))


def _perturb(tree, seed, std=0.05):
  """Adds noise to every array of a trainable tree (A, B and extras)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(np.asarray(x) + std * rng.standard_normal(x.shape), x.dtype), tree)


def _random_params(init, *args, seed=0):
  """Parameters with init's shapes, drawn by numpy (faster than an eager Flax init)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                                jax.eval_shape(init, jax.random.key(0), *args))


def _peft_adapter(torch, peft, base, folder, seed=0, **lora_kwargs):
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


def _load_in_peft(torch, peft, folder, seed=0):
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


# -- PyTorch PEFT -> jlora -----------------------------------------------------


def test_peft_adapter_loads_with_same_logits(pt, tmp_path):
  torch, peft = pt
  base = make_tiny_torch_gpt2(0)
  model, params = _flax_gpt2(base)
  ids = _ids()
  base_logits = _torch_logits(torch, base, ids)
  tmodel = _peft_adapter(torch, peft, base, tmp_path, modules_to_save=["ln_f"])
  expected = _torch_logits(torch, tmodel, ids)
  assert np.max(np.abs(expected - base_logits)) > 0.05  # the adapter matters

  ad = jlora.load_peft(tmp_path, params, jlora.PeftRules.gpt2())
  got = _jlora_logits(model, ad.frozen, ad.trainable, ids)
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
  model, params = _flax_gpt2(base)
  ids = _ids(1)
  tmodel = _peft_adapter(torch, peft, base, tmp_path / "peft", seed=1, use_rslora=True,
                         rank_pattern={"h.1.mlp.c_fc": 2}, alpha_pattern={"h.0.attn.c_attn": 16})
  expected = _torch_logits(torch, tmodel, ids)

  ad = jlora.load_peft(tmp_path / "peft", params, jlora.PeftRules.gpt2())
  h = ad.trainable["params"]["transformer"]["h"]
  assert h["1"]["mlp"]["c_fc"]["kernel"].rank == 2
  assert h["1"]["mlp"]["c_fc"]["kernel"].scale == pytest.approx(8 / np.sqrt(2))
  assert h["0"]["attn"]["c_attn"]["kernel"].scale == pytest.approx(16 / 2)
  assert h["0"]["mlp"]["c_fc"]["kernel"].scale == pytest.approx(8 / 2)
  assert ad.spec.use_rslora
  got = _jlora_logits(model, ad.frozen, ad.trainable, ids)
  assert np.max(np.abs(got - expected)) < 1e-4

  config = jlora.save_peft(tmp_path / "jlora", ad.trainable, jlora.PeftRules.gpt2(), spec=ad.spec)
  assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, True)
  assert config["rank_pattern"] == {re.escape("transformer.h.1.mlp.c_fc"): 2}
  assert config["alpha_pattern"] == {re.escape("transformer.h.0.attn.c_attn"): 16}
  back = _load_in_peft(torch, peft, tmp_path / "jlora", seed=1)
  assert np.max(np.abs(_torch_logits(torch, back, ids) - expected)) < 1e-4


# -- jlora -> PyTorch PEFT -----------------------------------------------------


def test_jlora_adapter_loads_in_peft(pt, tmp_path):
  torch, peft = pt
  base = make_tiny_torch_gpt2(2)
  model, params = _flax_gpt2(base)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=TARGETS, extra_trainable=r".*/ln_f/.*")
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  trainable = _perturb(trainable, 0)
  ids = _ids(2)
  ours = _jlora_logits(model, frozen, trainable, ids)

  config = jlora.save_peft(tmp_path, trainable, jlora.PeftRules.gpt2(), spec=spec,
                           base_model_name_or_path="tiny-gpt2")
  assert sorted(config["target_modules"]) == ["c_attn", "c_fc", "c_proj"]
  assert config["modules_to_save"] == ["transformer.ln_f"]
  assert config["fan_in_fan_out"] is True
  sd = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  assert len(sd) == 2 * 4 * 2 + 2
  assert sd[PREFIX + "transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 64)
  assert sd[PREFIX + "transformer.h.0.attn.c_attn.lora_B.weight"].shape == (192, 4)

  tmodel = _load_in_peft(torch, peft, tmp_path, seed=2)
  theirs = _torch_logits(torch, tmodel, ids)
  assert np.max(np.abs(ours - _torch_logits(torch, base, ids))) > 0.05
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
  model, params = _flax_gpt2(base)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=TARGETS, use_rslora=True,
                        rank_pattern={"h/0/mlp/c_proj/kernel": 2}, alpha_pattern={"c_attn/kernel": 3})
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(1))
  trainable = _perturb(trainable, 1)
  config = jlora.save_peft(tmp_path, trainable, jlora.PeftRules.gpt2(), spec=spec)
  assert config["use_rslora"] and (config["r"], config["lora_alpha"]) == (4, 8)
  assert config["rank_pattern"] == {re.escape("transformer.h.0.mlp.c_proj"): 2}
  assert config["alpha_pattern"] == {re.escape(f"transformer.h.{i}.attn.c_attn"): 3 for i in range(2)}
  ids = _ids(3)
  theirs = _torch_logits(torch, _load_in_peft(torch, peft, tmp_path, seed=3), ids)
  assert np.max(np.abs(_jlora_logits(model, frozen, trainable, ids) - theirs)) < 1e-4

  # Without the spec, rsLoRA is unknown: alpha is written for plain LoRA and
  # PEFT still computes the same scale.
  plain = jlora.save_peft(tmp_path / "plain", trainable, jlora.PeftRules.gpt2())
  assert not plain["use_rslora"] and (plain["r"], plain["lora_alpha"]) == (4, 16)
  theirs = _torch_logits(torch, _load_in_peft(torch, peft, tmp_path / "plain", seed=3), ids)
  assert np.max(np.abs(_jlora_logits(model, frozen, trainable, ids) - theirs)) < 1e-4


def test_some_layers_only_writes_full_module_names(pt, tmp_path):
  torch, peft = pt
  base = make_tiny_torch_gpt2(4)
  model, params = _flax_gpt2(base)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=r".*/h/0/attn/c_attn/kernel")
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(2))
  trainable = _perturb(trainable, 2)
  config = jlora.save_peft(tmp_path, trainable, jlora.PeftRules.gpt2(), spec=spec)
  # "c_attn" alone would also select layer 1's c_attn, which has no factors.
  assert config["target_modules"] == ["transformer.h.0.attn.c_attn"]
  ids = _ids(4)
  theirs = _torch_logits(torch, _load_in_peft(torch, peft, tmp_path, seed=4), ids)
  assert np.max(np.abs(_jlora_logits(model, frozen, trainable, ids) - theirs)) < 1e-4


# -- rules ---------------------------------------------------------------------


def test_rules_map_both_ways():
  gpt2 = jlora.PeftRules.gpt2()
  assert gpt2("transformer/h/0/attn/c_attn/kernel") == "transformer.h.0.attn.c_attn"
  assert gpt2("params/transformer/h/1/mlp/c_fc/bias") == "transformer.h.1.mlp.c_fc"
  assert gpt2.param_path("transformer.h.0.attn.c_attn") == ("params/transformer/h/0/attn/c_attn/kernel", ())
  assert gpt2.is_in_out("transformer.h.0.mlp.c_proj") and not gpt2.is_in_out("lm_head")
  assert gpt2("kernel") is None

  scan = jlora.PeftRules.scanned(renames={"query": "self_attn.q_proj"})
  assert scan("params/layers/query/kernel") == "model.layers.{0}.self_attn.q_proj"
  assert scan("params/layers/up/kernel") == "model.layers.{0}.up"
  assert scan("params/lm_head/kernel") == "lm_head"
  assert scan.param_path("model.layers.7.self_attn.q_proj") == ("params/layers/query/kernel", (7,))
  assert scan.param_path("model.layers.7.up", "bias") == ("params/layers/up/bias", (7,))

  generic = jlora.PeftRules.generic()
  assert generic("blocks/0/query/kernel") == "blocks.0.query"
  assert generic.param_path("blocks.0.query") == ("params/blocks/0/query/kernel", ())

  two = jlora.PeftRules(patterns=[("experts/{e}/{name}", "moe.{layer}.experts.{e}.{name}")])
  assert two("experts/3/w1/kernel") == "moe.{0}.experts.3.w1"
  assert two.param_path("moe.2.experts.3.w1") == ("experts/3/w1/kernel", (2,))

  with pytest.raises(jlora.LoraSpecError, match="not used in the module name"):
    jlora.PeftRules(patterns=[("a/{x}/{y}", "a.{x}")])


@pytest.fixture(scope="module")
def stacked():
  """LinenLM: nn.scan stacks each block weight along axis 0 (3 layers)."""
  cfg = LMConfig(vocab=32, d_model=16, heads=2, layers=3, mlp=24, seq=8)
  model = LinenLM(cfg)
  tokens = jnp.asarray(np.arange(16).reshape(2, 8) % cfg.vocab, jnp.int32)
  params = _random_params(model.init, tokens)
  layouts = jlora.infer_layouts(model.apply, params, tokens)
  return cfg, model, params, layouts, tokens


def test_scan_stack_exports_one_module_per_layer(stacked, tmp_path):
  cfg, model, params, layouts, tokens = stacked
  spec = jlora.LoraSpec(rank=3, alpha=6, targets=r".*/layers/(query|out|up)/kernel",
                        extra_trainable=r".*/layers/LayerNorm_1/.*")
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0), layouts=layouts)
  trainable = _perturb(trainable, 0)
  rules = jlora.PeftRules.scanned(renames={"query": "self_attn.q_proj", "out": "self_attn.o_proj",
                                           "up": "mlp.up_proj"})
  config = jlora.save_peft(tmp_path, trainable, rules, spec=spec)
  assert sorted(config["target_modules"]) == ["o_proj", "q_proj", "up_proj"]
  assert config["modules_to_save"] == [f"model.layers.{i}.LayerNorm_1" for i in range(3)]
  assert config["fan_in_fan_out"] is False
  sd = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  d, hd = cfg.d_model, cfg.d_model // cfg.heads
  assert sd[PREFIX + "model.layers.2.self_attn.q_proj.lora_A.weight"].shape == (3, d)
  assert sd[PREFIX + "model.layers.2.self_attn.q_proj.lora_B.weight"].shape == (cfg.heads * hd, 3)
  assert sd[PREFIX + "model.layers.0.self_attn.o_proj.lora_A.weight"].shape == (3, cfg.heads * hd)
  assert sd[PREFIX + "model.layers.1.LayerNorm_1.weight"].shape == (d,)

  # Reference: per layer, PyTorch's delta s * B @ A (out, in) is the merged
  # weight minus W0, flattened in the weight's own axis order.
  merged = jlora.merge(frozen, trainable)["params"]["layers"]
  w0 = params["params"]["layers"]
  for flax, torch_name, n_in in (("query", "self_attn.q_proj", 1), ("out", "self_attn.o_proj", 2),
                                 ("up", "mlp.up_proj", 1)):
    delta = np.asarray(merged[flax]["kernel"] - w0[flax]["kernel"])
    for i in range(cfg.layers):
      a = sd[f"{PREFIX}model.layers.{i}.{torch_name}.lora_A.weight"]
      b = sd[f"{PREFIX}model.layers.{i}.{torch_name}.lora_B.weight"]
      di = delta[i].reshape(int(np.prod(delta.shape[1:1 + n_in])), -1)
      np.testing.assert_allclose((2.0 * b @ a).T, di, atol=1e-5)
  np.testing.assert_array_equal(sd[PREFIX + "model.layers.1.LayerNorm_1.weight"],
                                np.asarray(trainable["params"]["layers"]["LayerNorm_1"]["scale"][1]))

  # And back: same factors, same outputs, same file.
  ad = jlora.load_peft(tmp_path, params, rules, layouts=layouts)
  for flax in ("query", "out", "up"):
    got, want = ad.trainable["params"]["layers"][flax]["kernel"], trainable["params"]["layers"][flax]["kernel"]
    assert got.layout == want.layout and got.scale == want.scale
    np.testing.assert_array_equal(np.asarray(got.a), np.asarray(want.a))
    np.testing.assert_array_equal(np.asarray(got.b), np.asarray(want.b))
  apply = jax.jit(jlora.lora(model.apply))
  np.testing.assert_allclose(apply(ad.frozen, ad.trainable, tokens), apply(frozen, trainable, tokens),
                             atol=1e-6)
  again = jlora.save_peft(tmp_path / "again", ad.trainable, rules, spec=ad.spec)
  assert again == config
  sd2 = load_file(os.path.join(tmp_path / "again", "adapter_model.safetensors"))
  assert sd2.keys() == sd.keys() and all(np.array_equal(sd[k], sd2[k]) for k in sd)


def test_function_rules_and_dtype(tmp_path):
  params = {"enc": {"proj": {"w": jnp.ones((6, 5))}}}
  spec = jlora.LoraSpec(rank=2, alpha=2, targets=["w"])
  _, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  trainable = _perturb(trainable, 0)
  fn = lambda path: path.rpartition("/")[0].replace("/", ".")  # noqa: E731
  jlora.save_peft(tmp_path, trainable, fn, dtype=jnp.bfloat16)
  sd = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  assert sd[PREFIX + "enc.proj.lora_A.weight"].dtype == jnp.bfloat16
  rules = jlora.PeftRules(function=fn, kernel_leaves=("w",), leaf_names={"w": "weight"})
  ad = jlora.load_peft(tmp_path, params, rules)
  lp = ad.trainable["enc"]["proj"]["w"]
  assert lp.a.dtype == jnp.bfloat16 and ad.spec.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(lp.b, np.float32),
                             np.asarray(trainable["enc"]["proj"]["w"].b.astype(jnp.bfloat16), np.float32))


def test_multi_axis_layouts_flatten_in_weight_axis_order(tmp_path):
  # A (3, 4, 5) kernel contracted over axes 1 and 0 (A's order), output axis 2:
  # PyTorch's (out, in) weight is the kernel reshaped to (3 * 4, 5), transposed.
  w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 5)), jnp.float32)
  params = {"mix": {"kernel": w}}
  layout = jlora.Layout(in_axes=(1, 0), out_axes=(2,))
  spec = jlora.LoraSpec(rank=2, alpha=3, targets=["mix/kernel"], layouts={"mix/kernel": layout})
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  trainable = _perturb(trainable, 0)
  jlora.save_peft(tmp_path, trainable, jlora.PeftRules(), spec=spec)
  sd = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  a, b = sd[PREFIX + "mix.lora_A.weight"], sd[PREFIX + "mix.lora_B.weight"]
  assert a.shape == (2, 12) and b.shape == (5, 2)
  delta = np.asarray(jlora.merge(frozen, trainable)["mix"]["kernel"] - w).reshape(12, 5)
  np.testing.assert_allclose((1.5 * b @ a).T, delta, atol=1e-5)
  ad = jlora.load_peft(tmp_path, params, jlora.PeftRules(), layouts={"mix/kernel": layout})
  np.testing.assert_array_equal(np.asarray(ad.trainable["mix"]["kernel"].a),
                                np.asarray(trainable["mix"]["kernel"].a))
  assert ad.spec.layout_override("mix/kernel") == layout


def test_linear_modules_to_save_are_transposed(tmp_path):
  params = {"body": {"kernel": jnp.ones((6, 5))}, "head": {"kernel": jnp.arange(15.0).reshape(5, 3),
                                                           "bias": jnp.arange(3.0)}}
  spec = jlora.LoraSpec(rank=2, targets=["body/kernel"], extra_trainable=r"head/.*")
  _, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  jlora.save_peft(tmp_path, trainable, jlora.PeftRules())
  sd = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  # nn.Linear stores (out, in).
  np.testing.assert_array_equal(sd[PREFIX + "head.weight"], np.arange(15.0).reshape(5, 3).T)
  ad = jlora.load_peft(tmp_path, params, jlora.PeftRules())
  np.testing.assert_array_equal(ad.trainable["head"]["kernel"], params["head"]["kernel"])
  assert ad.frozen["head"]["kernel"] is None and ad.frozen["body"]["kernel"] is not None


# -- bad inputs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A valid folder written by jlora for a tiny Flax GPT-2 (c_attn, c_proj)."""
  cfg = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2)
  params = _random_params(GPT2LMHeadModel(cfg).init, jnp.zeros((1, 4), jnp.int32))
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=r".*/(c_attn|c_proj)/kernel")
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  folder = tmp_path_factory.mktemp("tiny")
  jlora.save_peft(folder, _perturb(trainable, 0), jlora.PeftRules.gpt2(), spec=spec)
  return params, spec, trainable, folder


def _corrupt(src, dst, config=None, tensors=None):
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


K = PREFIX + "transformer.h.0.attn.c_attn"


def _set(key, value):
  return lambda cfg: cfg.__setitem__(key, value)


def _rename(old, new):
  return lambda sd: sd.__setitem__(new, sd.pop(old))


BAD = {
    "peft_type": (dict(config=_set("peft_type", "IA3")), r"peft_type 'IA3' is not supported"),
    "no_peft_type": (dict(config=lambda c: c.pop("peft_type")), r"no 'peft_type'"),
    "dora": (dict(config=_set("use_dora", True)), r"use_dora=True \(DoRA"),
    "bias": (dict(config=_set("bias", "all")), r"bias='all' is not supported"),
    "lora_bias": (dict(config=_set("lora_bias", True)), r"lora_bias=True"),
    "pissa": (dict(config=_set("init_lora_weights", "pissa")), r"init_lora_weights='pissa'"),
    "unknown_option": (dict(config=_set("use_magic", True)), r"unknown option use_magic=True"),
    "rank_mismatch": (dict(config=_set("r", 8)), rf"'{re.escape(K)}\.lora_A\.weight' has rank 4 but .* rank 8"),
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
    "no_prefix": (dict(tensors=_rename(K + ".lora_A.weight", "transformer.h.0.attn.c_attn.lora_A.weight")),
                  r"key 'transformer\.h\.0\.attn\.c_attn\.lora_A\.weight' lacks the 'base_model\.model\.' prefix"),
    "transposed": (dict(tensors=lambda sd: sd.__setitem__(K + ".lora_B.weight", np.zeros((4, 48), np.float32))),
                   rf"'{re.escape(K)}\.lora_A\.weight' \(4, 16\) and '{re.escape(K)}\.lora_B\.weight' \(4, 48\)"),
    "wrong_fan_in": (dict(tensors=lambda sd: sd.__setitem__(K + ".lora_A.weight", np.zeros((4, 17), np.float32))),
                     rf"'{re.escape(K)}\.lora_A\.weight' \(4, 17\) .* do not fit "
                     r"'params/transformer/h/0/attn/c_attn/kernel'"),
    "dora_tensor": (dict(tensors=lambda sd: sd.update({K + ".lora_magnitude_vector": np.ones(48, np.float32)})),
                    r"lora_magnitude_vector' is a DoRA magnitude"),
    "untargeted": (dict(config=_set("target_modules", ["c_proj"])),
                   r"module 'transformer\.h\.0\.attn\.c_attn', which target_modules \['c_proj'\] does not select"),
    "targets_more": (dict(config=_set("target_modules", ["c_attn", "c_proj", "c_fc"])),
                     r"no lora_A/lora_B for module 'transformer\.h\.0\.mlp\.c_fc'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_folders_raise_naming_the_problem(tiny, tmp_path, case):
  params, _, _, folder = tiny
  changes, message = BAD[case]
  bad = _corrupt(folder, tmp_path / case, **changes)
  with pytest.raises(jlora.LoraPeftError, match=message):
    jlora.load_peft(bad, params, jlora.PeftRules.gpt2())


def test_harmless_config_keys_are_accepted(tiny, tmp_path):
  params, _, trainable, folder = tiny
  ok = _corrupt(folder, tmp_path, config=lambda c: c.update(
      use_magic=None, peft_version="9.9", task_type="CAUSAL_LM", init_lora_weights="gaussian"))
  ad = jlora.load_peft(ok, params, jlora.PeftRules.gpt2())
  want = trainable["params"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
  got = ad.trainable["params"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
  assert got.layout == want.layout and got.scale == want.scale and got.a.shape == want.a.shape


def test_missing_or_pickled_files_raise(tiny, tmp_path):
  params, _, _, folder = tiny
  with pytest.raises(jlora.LoraPeftError, match="has no adapter_config.json"):
    jlora.load_peft(tmp_path, params, jlora.PeftRules.gpt2())
  _corrupt(folder, tmp_path / "bin")
  os.rename(tmp_path / "bin" / "adapter_model.safetensors", tmp_path / "bin" / "adapter_model.bin")
  with pytest.raises(jlora.LoraPeftError, match="adapter_model.bin, a pickle, which jlora never reads"):
    jlora.load_peft(tmp_path / "bin", params, jlora.PeftRules.gpt2())


def test_stack_with_per_layer_ranks_raises(stacked, tmp_path):
  cfg, model, params, layouts, tokens = stacked
  spec = jlora.LoraSpec(rank=2, targets=r".*/layers/up/kernel")
  _, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0), layouts=layouts)
  rules = jlora.PeftRules.scanned()
  jlora.save_peft(tmp_path / "ok", trainable, rules)
  up = PREFIX + "model.layers.1.up"

  def rank1(sd):
    sd[up + ".lora_A.weight"] = sd[up + ".lora_A.weight"][:1]
    sd[up + ".lora_B.weight"] = sd[up + ".lora_B.weight"][:, :1]
  bad = _corrupt(tmp_path / "ok", tmp_path / "bad", config=_set("rank_pattern", {"layers.1.up": 1}),
                 tensors=rank1)
  with pytest.raises(jlora.LoraPeftError, match=r"modules of stacked 'params/layers/up/kernel' have different"):
    jlora.load_peft(bad, params, rules, layouts=layouts)
  gap = _corrupt(tmp_path / "ok", tmp_path / "gap", tensors=lambda sd: [sd.pop(up + ".lora_A.weight"),
                                                                         sd.pop(up + ".lora_B.weight")])
  with pytest.raises(jlora.LoraPeftError, match=r"missing keys 'base_model\.model\.model\.layers\.1\.up\.lora_A"):
    jlora.load_peft(gap, params, rules, layouts=layouts)
  with pytest.raises(jlora.LoraLayoutError, match="params/layers/up/kernel"):
    jlora.load_peft(tmp_path / "ok", params, rules)  # a 3-D stacked kernel needs its layout


def test_export_errors(tiny, tmp_path):
  params, spec, trainable, _ = tiny
  gpt2 = jlora.PeftRules.gpt2()
  with pytest.raises(jlora.LoraPeftError, match="'params/transformer/h/0/attn/c_attn/kernel': the rules give no"):
    jlora.save_peft(tmp_path, trainable, lambda path: None)
  with pytest.raises(jlora.LoraPeftError, match="both map to PyTorch module 'x'"):
    jlora.save_peft(tmp_path, trainable, lambda path: "x")
  with pytest.raises(jlora.LoraPeftError, match="1 stack-index field.*has 0 stack axes"):
    jlora.save_peft(tmp_path, trainable, jlora.PeftRules.scanned(stack="params/transformer/h/0"))
  with pytest.raises(jlora.LoraPeftError, match="not the spec's"):
    jlora.save_peft(tmp_path, trainable, gpt2, spec=jlora.LoraSpec(rank=4, alpha=4, targets=spec.targets))
  with pytest.raises(jlora.LoraPeftError, match="does not select adapted module"):
    jlora.save_peft(tmp_path, trainable, gpt2, target_modules=["c_attn"])
  with pytest.raises(jlora.LoraPeftError, match="selects 'transformer.h.0.mlp.c_fc', which has no LoRA"):
    jlora.save_peft(tmp_path, trainable, gpt2, target_modules=["c_attn", "c_proj", "c_fc"])
  with pytest.raises(jlora.LoraPeftError, match=r"use_dora=True"):
    jlora.save_peft(tmp_path, trainable, gpt2, extra_config={"use_dora": True})

  half = jlora.LoraSpec(rank=4, targets=r".*/c_attn/kernel", extra_trainable=r".*/c_attn/bias")
  _, t = jlora.lora_transform(params, half, key=jax.random.key(0))
  with pytest.raises(jlora.LoraPeftError, match="'params/transformer/h/0/attn/c_attn/bias' is trained in full "
                     "but 'params/transformer/h/0/attn/c_attn/kernel' of the same PyTorch module"):
    jlora.save_peft(tmp_path, t, gpt2)
  emb = jlora.LoraSpec(rank=4, targets=r".*/wte/embedding")
  _, t = jlora.lora_transform(params, emb, key=jax.random.key(0))
  with pytest.raises(jlora.LoraPeftError, match="'params/transformer/wte/embedding': PEFT stores LoRA on an embedding"):
    jlora.save_peft(tmp_path, t, gpt2)
