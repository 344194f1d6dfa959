"""``jlora.hf.load`` into google-tunix's Llama 3, Qwen 3 (and MoE) and Gemma 3, against PyTorch.

For each family at a tiny size, a random ``transformers`` model is saved
sharded (``save_pretrained(max_shard_size=...)``) and loaded into the Tunix
model: its logits equal PyTorch's (float32, 1e-4 relative), and its tree
equals the one Tunix's own loader makes. A ``*-bnb-4bit`` checkpoint written
by transformers with bitsandbytes loads as ``NF4Array`` leaves holding
bitsandbytes' own arrays, and runs through ``jlora.nnx.lora`` to PyTorch's
4-bit logits; quantizing while loading gives ``quantize_4bit``'s codes and absmax.

Skipped without tunix (CI has none): run it in the Tunix environment
(docs/development.md). The parts that need no Tunix are in tests/test_hf.py.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

llama = pytest.importorskip("tunix.models.llama3.model")
qwen = pytest.importorskip("tunix.models.qwen3.model")
gemma = pytest.importorskip("tunix.models.gemma3.model")
sft_utils = pytest.importorskip("tunix.sft.utils")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from flax import nnx  # noqa: E402

import jlora  # noqa: E402
import jlora.hf  # noqa: E402
import jlora.nnx  # noqa: E402
from jlora.hf.tensors import Checkpoint  # noqa: E402

# Rows (input features) are multiples of 64: bitsandbytes' CPU kernels are right there.
V, D, F, L, N, K, H = 128, 64, 128, 2, 4, 2, 16
# Tunix's Llama 3 and Qwen 3 apply RoPE with their default theta (1e6) whatever the
# config says, so the PyTorch models use that theta.
THETA = 1_000_000
TUNIX_LOADER = {"llama3": "tunix.models.llama3.params", "qwen3": "tunix.models.qwen3.params",
                "gemma3": "tunix.models.gemma3.params_safetensors"}
FAMILIES = list(TUNIX_LOADER)


def torch_model(family, kv_heads=K):
  torch.manual_seed(0)
  common = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                num_attention_heads=N, num_key_value_heads=kv_heads, head_dim=H)
  if family == "llama3":
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        rope_theta=THETA, rms_norm_eps=1e-5, tie_word_embeddings=False, **common))
  elif family == "qwen3":
    m = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        rope_theta=THETA, rms_norm_eps=1e-5, tie_word_embeddings=False, **common))
  else:   # every layer local (sliding window 8, longer than the inputs)
    m = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        rms_norm_eps=1e-6, sliding_window=8, query_pre_attn_scalar=H, rope_theta=10_000.0,
        rope_local_base_freq=10_000.0, tie_word_embeddings=True, **common))
  with torch.no_grad():
    for p in m.parameters():
      p.normal_(0, 0.3)
  return m.float().eval()


def tunix_config(family, kv_heads=K):
  small = dict(num_layers=L, embed_dim=D, hidden_dim=F, num_heads=N, head_dim=H,
               num_kv_heads=kv_heads)
  if family == "llama3":
    return llama.ModelConfig(vocab_size=V, rope_theta=THETA, norm_eps=1e-5, **small)
  if family == "qwen3":
    return qwen.ModelConfig(vocab_size=V, rope_theta=THETA, norm_eps=1e-5, **small)
  return gemma.ModelConfig(num_embed=V, sliding_window_size=8, param_dtype=jnp.float32, **small)


def abstract_model(family, kv_heads=K):
  cls = {"llama3": llama.Llama3, "qwen3": qwen.Qwen3, "gemma3": gemma.Gemma3}[family]
  cfg = tunix_config(family, kv_heads)
  return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))


def save(model, path, **kw):
  model.save_pretrained(path, max_shard_size="30KB", **kw)
  assert (path / "model.safetensors.index.json").is_file()   # sharded
  assert len(list(path.glob("*.safetensors"))) > 1
  return path


TOKENS = np.random.default_rng(0).integers(3, V, (2, 7)).astype(np.int32)


def model_args():
  mask = np.ones_like(TOKENS, bool)
  return (TOKENS, sft_utils.build_positions_from_mask(mask), None,
          sft_utils.make_causal_attn_mask(mask))


def tunix_logits(model):
  return np.asarray(model(*model_args())[0])


def torch_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


def assert_close(got, want, rtol=1e-4):
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert err < rtol, err


def params(model):
  return nnx.state(model, nnx.Param).to_pure_dict()


def linear_weights(torch_m, model):
  """(PyTorch key, tree path, slice index, (out, in) weight) of every linear layer."""
  mapping = jlora.hf.tunix_mapping(model)
  out = []
  for key, w in torch_m.state_dict().items():
    t = mapping.resolve(key, "test")
    if t is not None and t.linear(tuple(w.shape)) and "lm_head" not in t.path:
      out.append((key, t.path, t.index, w))
  assert len(out) == 7 * L
  return out


def leaf(tree, path):
  for k in path.split("/"):
    tree = tree[int(k) if k.isdigit() and int(k) in tree else k]
  return tree


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_checkpoint_gives_pytorchs_logits_and_tunixs_tree(family, tmp_path):
  m = torch_model(family)
  d = save(m, tmp_path / "ckpt")
  model = jlora.hf.load(d, abstract_model(family))
  logits = tunix_logits(model)
  assert_close(logits, torch_logits(m))
  theirs = importlib.import_module(TUNIX_LOADER[family]).create_model_from_safe_tensors(
      str(d), tunix_config(family))
  assert jax.tree.structure(params(theirs)) == jax.tree.structure(params(model))
  jax.tree.map(np.testing.assert_array_equal, params(theirs), params(model))


def test_gemma3_fused_qkv_and_bf16(tmp_path):
  """N == K: Tunix's Gemma 3 fuses q, k, v into qkv_einsum (3, N, D, H). A bf16
  checkpoint loads in bf16 (``dtype`` casts), equal to Tunix's loader."""
  m = torch_model("gemma3", kv_heads=N).to(torch.bfloat16)
  d = save(m, tmp_path / "ckpt")
  model = jlora.hf.load(d, abstract_model("gemma3", N))
  tree = params(model)
  assert leaf(tree, "layers/0/attn/qkv_einsum/w").shape == (3, N, D, H)
  assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(jnp.bfloat16)}
  theirs = importlib.import_module(TUNIX_LOADER["gemma3"]).create_model_from_safe_tensors(str(d), tunix_config("gemma3", N))
  jax.tree.map(np.testing.assert_array_equal, params(theirs), tree)
  f32 = params(jlora.hf.load(d, abstract_model("gemma3", N), dtype=jnp.float32))
  assert {x.dtype for x in jax.tree.leaves(f32)} == {jnp.dtype(jnp.float32)}
  logits = tunix_logits(jlora.hf.load(d, abstract_model("gemma3", N), dtype=jnp.float32))
  assert_close(logits, torch_logits(m.float()))


def _bnb_checkpoint(family, tmp_path):
  m = torch_model(family)
  dense = save(m, tmp_path / "dense")
  q = type(m).from_pretrained(dense, dtype=torch.float32,
                              quantization_config=transformers.BitsAndBytesConfig(
                                  load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32))
  return m, q, save(q, tmp_path / "bnb-4bit")


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_bnb_4bit_checkpoint_loads_bitsandbytes_arrays(family, tmp_path):
  m, q, d = _bnb_checkpoint(family, tmp_path)
  model = jlora.hf.load(d, abstract_model(family))
  tree = params(model)
  modules = dict(q.named_modules())
  for key, path, index, _ in linear_weights(m, model):
    got = leaf(tree, path)
    assert isinstance(got, jlora.NF4Array), path
    w4 = modules[key.removesuffix(".weight")].weight
    state = w4.quant_state
    sl = (lambda x: x[index]) if index is not None else (lambda x: x)
    np.testing.assert_array_equal(np.asarray(sl(got.codes)), w4.data.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(sl(got.absmax)), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(sl(got.nested_absmax)),
                                  state.state2.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(sl(got.offset)), state.offset.numpy())
  # It runs through jlora.nnx.lora (B = 0: the base) to PyTorch's 4-bit logits.
  args = model_args()
  spec = jlora.LoraSpec(rank=2, targets=r".*/(gate_proj|up_proj|down_proj)/kernel")
  adapted = jlora.nnx.lora(model, spec, rngs=nnx.Rngs(1), example_args=args)
  assert_close(np.asarray(adapted(*args)[0]), torch_logits(q), rtol=1e-4)


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_on_load_gives_bitsandbytes_codes(family, double_quant, tmp_path):
  m = torch_model(family)
  d = save(m, tmp_path / "ckpt")
  model = jlora.hf.load(d, abstract_model(family), quantize=True, double_quant=double_quant)
  tree = params(model)
  for _, path, index, w in linear_weights(m, model):
    got = leaf(tree, path)
    assert isinstance(got, jlora.NF4Array) and got.double_quant == double_quant, path
    codes, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                compress_statistics=double_quant)
    sl = (lambda x: x[index]) if index is not None else (lambda x: x)
    np.testing.assert_array_equal(np.asarray(sl(got.codes)), codes.numpy().reshape(-1))
    if double_quant:   # the offset may differ in its last bit (jlora.quant.nf4)
      ours = jlora.quant.nf4.dequantize_absmax(sl(got.absmax), sl(got.nested_absmax),
                                               sl(got.offset))
      theirs = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
      np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-6, atol=1e-7)
    else:
      np.testing.assert_array_equal(np.asarray(sl(got.absmax)), state.absmax.numpy())
  # The embeddings, norms and lm_head stay dense; dequantized, every weight is
  # the dense one within half the widest NF4 step (the layout is right).
  assert not isinstance(leaf(tree, "embedder/input_embedding"), jlora.NF4Array)
  dense = params(jlora.hf.load(d, abstract_model(family)))
  for (p, a), b in zip(jlora._paths.flatten_with_paths(jlora.dequantize(tree))[0],
                       jax.tree.leaves(dense)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= 0.16 * np.max(np.abs(b)), p


def test_quantize_selects_by_path_regex(tmp_path):
  d = save(torch_model("qwen3"), tmp_path / "ckpt")
  tree = params(jlora.hf.load(d, abstract_model("qwen3"), quantize=r".*/mlp/.*",
                              block_size=128))
  nf4 = {p for p, x in jlora._paths.flatten_with_paths(tree)[0]
         if isinstance(x, jlora.NF4Array)}
  assert nf4 == {f"layers/{i}/mlp/{n}/kernel" for i in range(L)
                 for n in ("gate_proj", "up_proj", "down_proj")}
  assert leaf(tree, "layers/0/mlp/up_proj/kernel").block_size == 128


def test_checkpoint_of_another_family_is_refused(tmp_path):
  d = save(torch_model("qwen3"), tmp_path / "qwen")
  with pytest.raises(jlora.LoraFileError, match=r"config\.json': model_type 'qwen3' is not "
                     r"one the tunix llama3 mapping reads"):
    jlora.hf.load(d, abstract_model("llama3"))


def test_qwen3_moe_experts_stack_per_tensor(tmp_path):
  """Qwen 3 MoE: each expert's PyTorch weights are one slice of Tunix's stacked
  (E, D, F) kernels, as Tunix's loader stacks them; quantized, each expert's
  slice holds quantize_4bit's codes for that expert."""
  experts = 4
  torch.manual_seed(0)
  m = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
      vocab_size=V, hidden_size=D, intermediate_size=F, moe_intermediate_size=F,
      num_hidden_layers=L, num_attention_heads=N, num_key_value_heads=K, head_dim=H,
      num_experts=experts, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
      norm_topk_prob=True, rope_theta=THETA, rms_norm_eps=1e-5, tie_word_embeddings=False))
  with torch.no_grad():
    for p in m.parameters():
      p.normal_(0, 0.3)
  m = m.float().eval()
  d = save(m, tmp_path / "ckpt")
  cfg = dataclasses.replace(tunix_config("qwen3"), num_experts=experts, num_experts_per_tok=2)
  abstract = lambda: nnx.eval_shape(lambda: qwen.Qwen3(cfg, rngs=nnx.Rngs(0)))  # noqa: E731
  model = jlora.hf.load(d, abstract())
  assert_close(tunix_logits(model), torch_logits(m))
  theirs = importlib.import_module(TUNIX_LOADER["qwen3"]).create_model_from_safe_tensors(
      str(d), cfg)
  jax.tree.map(np.testing.assert_array_equal, params(theirs), params(model))
  q = leaf(params(jlora.hf.load(d, abstract(), quantize=r".*/mlp/(gate|up|down)_proj")),
           "layers/1/mlp/down_proj")
  assert isinstance(q, jlora.NF4Array) and q.shape == (experts, F, D)
  for e in range(experts):
    # transformers 5 holds the experts fused, and saves them one by one
    w = torch.from_numpy(Checkpoint(d).get(f"model.layers.1.mlp.experts.{e}.down_proj.weight"))
    codes, _ = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(np.asarray(q.codes[e]), codes.numpy().reshape(-1))
