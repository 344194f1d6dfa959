"""PEFT folders to and from google-tunix's Llama 3, Qwen 3 and Gemma 3
(``jlora.peft.Rules.tunix``), held to PyTorch ``transformers`` + ``peft``.

For each family at a tiny size: a random Hugging Face model
(``LlamaForCausalLM``, ``Qwen3ForCausalLM``, ``Gemma3ForCausalLM``) is saved
and read into the Tunix model by Tunix's own converter
(``create_model_from_safe_tensors``), with equal base logits. A jlora
adapter of that Tunix model, written by ``jlora.peft.save``, gives the
adapted Tunix model's logits when PEFT loads it onto the PyTorch model; a
PEFT adapter made in PyTorch (``init_lora_weights=False``: nonzero B), read
by ``jlora.peft.load``, gives PyTorch's logits in the Tunix model. Gemma 3's
fused ``kv_einsum`` (and ``qkv_einsum``, when it has as many kv heads as
heads) is split into ``k_proj``/``v_proj`` on the way out and joined on
the way in.

Skipped without tunix, which needs an environment of its own
(docs/development.md):

    PYTHONPATH=$PWD /tmp/tunix/bin/python -m pytest -q tests/test_peft_tunix.py
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
import jlora.nnx

llama = pytest.importorskip("tunix.models.llama3.model")
llama_params = pytest.importorskip("tunix.models.llama3.params")
qwen = pytest.importorskip("tunix.models.qwen3.model")
qwen_params = pytest.importorskip("tunix.models.qwen3.params")
gemma = pytest.importorskip("tunix.models.gemma3.model")
gemma_params = pytest.importorskip("tunix.models.gemma3.params_safetensors")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from jlora._paths import flatten_with_paths  # noqa: E402
from jlora.adapters.adapter import is_adapter  # noqa: E402
from jlora.errors import LoraError, LoraPeftError  # noqa: E402

V, D, F, N, H, K, L, T = 64, 32, 64, 4, 8, 2, 2, 12
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLP = r"|.*/(gate_proj|up_proj|down_proj)/kernel"
ATTN = r".*/attn/(q_proj|k_proj|v_proj|o_proj)/w"
GEMMA_ATTN = r".*/attn/(q_einsum|kv_einsum|qkv_einsum|attn_vec_einsum)/w"


def _hf_llama(k):
  # Tunix's Llama 3 and Qwen 3 attention apply RoPE at theta 1e6 whatever
  # the config says, so the PyTorch model uses 1e6 too.
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=V, hidden_size=D, intermediate_size=F, num_attention_heads=N,
      num_key_value_heads=k, head_dim=H, num_hidden_layers=L, rope_theta=1e6,
      rms_norm_eps=1e-5, tie_word_embeddings=False))


def _hf_qwen(k):
  return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
      vocab_size=V, hidden_size=D, intermediate_size=F, num_attention_heads=N,
      num_key_value_heads=k, head_dim=H, num_hidden_layers=L, rope_theta=1e6,
      rms_norm_eps=1e-5, tie_word_embeddings=False))


def _hf_gemma(k):
  return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
      vocab_size=V, hidden_size=D, intermediate_size=F, num_attention_heads=N,
      num_key_value_heads=k, head_dim=H, num_hidden_layers=L, sliding_window=8,
      query_pre_attn_scalar=H))


def _tunix_llama(folder, k, d=D):
  cfg = llama.ModelConfig(num_layers=L, vocab_size=V, embed_dim=d, hidden_dim=F, num_heads=N,
                          head_dim=H, num_kv_heads=k, rope_theta=1_000_000, norm_eps=1e-5)
  return llama_params.create_model_from_safe_tensors(folder, cfg, dtype=jnp.float32)


def _tunix_qwen(folder, k, d=D):
  cfg = qwen.ModelConfig(num_layers=L, vocab_size=V, embed_dim=d, hidden_dim=F, num_heads=N,
                         head_dim=H, num_kv_heads=k, rope_theta=1_000_000, norm_eps=1e-5)
  return qwen_params.create_model_from_safe_tensors(folder, cfg, dtype=jnp.float32)


def _tunix_gemma(folder, k, d=D):
  cfg = gemma.ModelConfig(num_layers=L, num_embed=V, embed_dim=d, hidden_dim=F, num_heads=N,
                          head_dim=H, num_kv_heads=k, sliding_window_size=8,
                          param_dtype=jnp.float32)
  return gemma_params.create_model_from_safe_tensors(folder, cfg)


# case -> (Hugging Face model, Tunix model from its folder, kv heads, jlora targets)
CASES = {
    "llama3": (_hf_llama, _tunix_llama, K, ATTN + MLP),
    "qwen3": (_hf_qwen, _tunix_qwen, K, ATTN + MLP),
    "gemma3": (_hf_gemma, _tunix_gemma, K, GEMMA_ATTN + MLP),          # q_einsum, kv_einsum
    "gemma3-qkv": (_hf_gemma, _tunix_gemma, N, GEMMA_ATTN + MLP),      # qkv_einsum
}


def _close(got, want, rtol=1e-4):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err = float(np.max(np.abs(got - want)))
  assert err <= rtol * float(np.max(np.abs(want))), (err, float(np.max(np.abs(want))))


def _inputs():
  tokens = np.random.default_rng(0).integers(3, V, (2, T)).astype(np.int32)
  positions = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T))
  mask = np.broadcast_to(np.tril(np.ones((T, T), bool)), (2, T, T))
  return tokens, (jnp.asarray(tokens), jnp.asarray(positions), None, jnp.asarray(mask))


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


class Case:
  """A random Hugging Face model, saved, and the Tunix model read from it."""

  def __init__(self, name, tmp):
    make_hf, make_tunix, self.k, self.targets = CASES[name]
    self.name = name
    torch.manual_seed(0)
    hf = make_hf(self.k)
    with torch.no_grad():
      for p in hf.parameters():
        p.normal_(0.0, 0.2)
    self.hf_dir = os.fspath(tmp / "hf")
    hf.save_pretrained(self.hf_dir)
    self.hf_class = type(hf)
    self.model = make_tunix(self.hf_dir, self.k)
    self.tokens, self.args = _inputs()

  def hf(self):
    return self.hf_class.from_pretrained(self.hf_dir, dtype=torch.float32).eval()

  def tunix_logits(self, module):
    return np.asarray(module(*self.args)[0])


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
  return Case(request.param, tmp_path_factory.mktemp(request.param))


def _adapted(case, rank=4, alpha=8, seed=1, targets=None, **spec_kw):
  """The Tunix model adapted by jlora, with random nonzero A and B."""
  spec = jlora.LoraSpec(rank=rank, alpha=alpha, targets=targets or case.targets, **spec_kw)
  m = jlora.nnx.lora(case.model, spec, rngs=nnx.Rngs(seed), example_args=case.args)
  rng = np.random.default_rng(seed)
  nnx.update(m, jax.tree.map(lambda v: jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype),
                             nnx.state(m, nnx.LoRAParam)))
  return m, spec


def _module(case, trainable):
  """The Tunix model with the loaded adapters, as jlora.nnx runs it."""
  pairs, _ = flatten_with_paths(trainable, is_leaf=is_adapter)
  return jlora.nnx.LoraModule(case.model, {p: t for p, t in pairs if is_adapter(t)})


def test_the_converter_gives_the_base_logits(case):
  _close(case.tunix_logits(case.model), _torch_logits(case.hf(), case.tokens))


def test_the_rules_layouts_are_the_models(case):
  # The layouts the rules state for Tunix's attention kernels are the ones
  # jlora reads from the model's einsums.
  m, _ = _adapted(case)
  rules = jlora.peft.Rules.tunix(case.model)
  inferred = {p: a.layout for p, a in m.adapters().items() if "/attn/" in p}
  assert inferred and rules.layouts_for(list(inferred)) == inferred


def test_jlora_adapter_loads_in_pytorch_peft(case, tmp_path):
  m, spec = _adapted(case)
  _, _, trainable = m.split_lora()
  rules = jlora.peft.Rules.tunix(m)
  config = jlora.peft.save(tmp_path / "a", trainable, rules, spec=spec,
                           base_model_name_or_path=case.hf_dir, task_type="CAUSAL_LM")
  assert sorted(config["target_modules"]) == sorted(MODULES)
  peft_model = peft.PeftModel.from_pretrained(case.hf(), os.fspath(tmp_path / "a")).eval()
  want = case.tunix_logits(m)
  _close(_torch_logits(peft_model, case.tokens), want)
  # The adapter matters: the base model's logits are far from these.
  assert np.max(np.abs(want - case.tunix_logits(case.model))) > 0.1
  # And jlora reads its own folder back as it was (a fused kernel's shared A
  # comes back as one pair of rank r).
  back = jlora.peft.load(tmp_path / "a", nnx.state(case.model), rules)
  got = dict(flatten_with_paths(back.trainable, is_leaf=is_adapter)[0])
  for path, a in m.adapters().items():
    np.testing.assert_array_equal(np.asarray(got[path].a), np.asarray(a.a))
    np.testing.assert_array_equal(np.asarray(got[path].b), np.asarray(a.b))
    assert got[path].layout == a.layout and got[path].scale == a.scale


def test_pytorch_peft_adapter_loads_in_tunix(case, tmp_path):
  torch.manual_seed(2)
  cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODULES, init_lora_weights=False,
                        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4})
  peft_model = peft.get_peft_model(case.hf(), cfg).eval()
  want = _torch_logits(peft_model, case.tokens)
  peft_model.save_pretrained(os.fspath(tmp_path / "p"))
  adapter = jlora.peft.load(tmp_path / "p", nnx.state(case.model),
                            jlora.peft.Rules.tunix(case.model))
  got = case.tunix_logits(_module(case, adapter.trainable))
  _close(got, want)
  assert np.max(np.abs(want - case.tunix_logits(case.model))) > 0.1


def test_config_holds_what_vllm_reads(tmp_path):
  case = Case("llama3", tmp_path)
  m, spec = _adapted(case, targets=MLP[1:])
  config = jlora.peft.save(tmp_path / "a", m.split_lora()[2], jlora.peft.Rules.tunix("llama3"),
                           spec=spec, base_model_name_or_path="meta-llama/Llama-3.2-1B",
                           task_type="CAUSAL_LM")
  on_disk = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  assert on_disk == config
  assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
  assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
  assert config["base_model_name_or_path"] == "meta-llama/Llama-3.2-1B"
  assert not config["use_dora"] and config["modules_to_save"] is None
  assert config["bias"] == "none"
  # DoRA, which vLLM does not serve, is written with a warning that says so.
  m, spec = _adapted(case, targets=MLP[1:], use_dora=True)
  with pytest.warns(UserWarning, match="vLLM does not serve"):
    config = jlora.peft.save(tmp_path / "d", m.split_lora()[2],
                             jlora.peft.Rules.tunix("llama3"), spec=spec)
  assert config["use_dora"]


# Bad input: one line, naming what is wrong ----------------------------------

def _one_line(err):
  assert "\n" not in str(err.value), str(err.value)
  return str(err.value)


@pytest.mark.parametrize("what", ["gemma4", "nnx"])
def test_a_family_without_rules_is_refused(what):
  model = what if what == "gemma4" else nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  with pytest.raises(LoraError) as err:
    jlora.peft.Rules.tunix(model)
  msg = _one_line(err)
  assert "supported: gemma3, llama3, qwen3" in msg and ("gemma4" in msg or "Linear" in msg)


@pytest.fixture(scope="module")
def gemma_case(tmp_path_factory):
  return Case("gemma3", tmp_path_factory.mktemp("gemma_errors"))


def test_a_folder_for_another_architecture_is_refused(gemma_case, tmp_path):
  gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=V, n_embd=D, n_layer=1, n_head=N, n_positions=T))
  peft.get_peft_model(gpt2, peft.LoraConfig(r=2, target_modules=["c_attn"],
                                            fan_in_fan_out=True)).save_pretrained(
      os.fspath(tmp_path / "g"))
  with pytest.raises(LoraPeftError) as err:
    jlora.peft.load(tmp_path / "g", nnx.state(gemma_case.model),
                    jlora.peft.Rules.tunix(gemma_case.model))
  assert re.search(r"adapter_model\.safetensors': key 'base_model\.model\.transformer\.h\.0"
                   r"\.attn\.c_attn\.lora_A\.weight'", _one_line(err))


def test_a_shape_mismatch_is_refused(gemma_case, tmp_path):
  # An adapter of a Gemma 3 of width 32 read onto one of width 48.
  m, spec = _adapted(gemma_case)
  jlora.peft.save(tmp_path / "a", m.split_lora()[2], jlora.peft.Rules.tunix(m), spec=spec)
  wider = gemma.Gemma3(gemma.ModelConfig(
      num_layers=L, num_embed=V, embed_dim=48, hidden_dim=F, num_heads=N, head_dim=H,
      num_kv_heads=K, sliding_window_size=8, param_dtype=jnp.float32), rngs=nnx.Rngs(0))
  with pytest.raises(LoraPeftError) as err:
    jlora.peft.load(tmp_path / "a", nnx.state(wider), jlora.peft.Rules.tunix(wider))
  assert re.search(r"do not fit 'layers/\d+/(attn|mlp)/\w+/(w|kernel)' \(", _one_line(err))


def test_a_folder_that_adapts_part_of_a_fused_kernel_is_refused(gemma_case, tmp_path):
  cfg = peft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False)
  peft.get_peft_model(gemma_case.hf(), cfg).save_pretrained(os.fspath(tmp_path / "k"))
  with pytest.raises(LoraPeftError) as err:
    jlora.peft.load(tmp_path / "k", nnx.state(gemma_case.model),
                    jlora.peft.Rules.tunix(gemma_case.model))
  msg = _one_line(err)
  assert "'model.layers.0.self_attn.v_proj' is not" in msg
  assert "'layers/0/attn/kv_einsum/w'" in msg


def test_a_fused_kernel_without_its_axis_is_refused(gemma_case, tmp_path):
  # Rules that call q_einsum (N=4 heads on its first output axis) a fusion
  # of two modules are refused when writing, naming the weight.
  m, spec = _adapted(gemma_case, targets=r".*/q_einsum/w")
  rules = jlora.peft.Rules.tunix(m)
  bad = jlora.peft.Rules(patterns=[("layers/{i}/attn/q_einsum", "model.layers.{i}.a+b")],
                         kernel_leaves=("w",), layouts=rules.layouts)
  with pytest.raises(LoraPeftError) as err:
    jlora.peft.save(tmp_path / "x", m.split_lora()[2], bad, spec=spec)
  assert "'layers/0/attn/q_einsum/w'" in _one_line(err)
