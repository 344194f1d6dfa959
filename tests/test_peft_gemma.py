"""PEFT folders to and from the gemma library's Gemma 3
(``jlora.peft.Rules.gemma``), held to PyTorch ``transformers`` + ``peft``.

At a tiny size (one sliding and one global layer, qk norms, GQA or, with as
many kv heads as heads, ``qkv_einsum``): a gemma-library ``gm.nn.Transformer``
with random weights, and ``transformers``' ``Gemma3ForCausalLM`` holding the
same weights (``_to_hf`` below), with equal base logits. A jlora adapter of
the Linen model, written by ``jlora.peft.save``, gives the adapted model's
logits when PEFT loads it onto the PyTorch model; a PEFT adapter made in
PyTorch (``init_lora_weights=False``: nonzero B), read by ``jlora.peft.load``,
gives PyTorch's logits in the Linen model. The fused ``kv_einsum``,
``qkv_einsum`` and ``gating_einsum`` are split into PyTorch modules on the way
out and joined on the way in.

Skipped without the gemma library, which needs an environment of its own
(docs/development.md):

    PYTHONPATH=$PWD /tmp/gemma_venv/bin/python -m pytest -q tests/test_peft_gemma.py
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

gm_nn = pytest.importorskip("gemma.gm.nn")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", minversion="5")
peft = pytest.importorskip("peft")

from jlora.errors import LoraError, LoraPeftError  # noqa: E402

V, D, F, N, H, K, T, W = 64, 32, 48, 4, 8, 2, 12, 4
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = r".*/attn/(q_einsum|kv_einsum|qkv_einsum|attn_vec_einsum)/w|.*/mlp/(gating_einsum|linear)"
TYPES = (gm_nn.AttentionType.LOCAL_SLIDING, gm_nn.AttentionType.GLOBAL)


def _model(k, d=D):
  return gm_nn.Transformer(config=gm_nn.config.TransformerConfig(
      num_embed=V, embed_dim=d, hidden_dim=F, num_heads=N, head_dim=H, num_kv_heads=k,
      final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True,
      attention_types=TYPES, sliding_window_size=W, transpose_gating_einsum=True,
      use_qk_norm=True, local_base_frequency=10_000, global_base_frequency=1_000_000))


def _hf_model(k):
  return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
      vocab_size=V, hidden_size=D, intermediate_size=F, num_attention_heads=N,
      num_key_value_heads=k, head_dim=H, num_hidden_layers=len(TYPES), sliding_window=W,
      layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=H,
      hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
      final_logit_softcapping=None, attn_logit_softcapping=None))


def _to_hf(params, k):
  """The Hugging Face state dict of gemma-library params (test-only converter)."""
  p = {key: np.asarray(v, np.float32) for key, v in
       ((jlora.path_str(kp), v) for kp, v in jax.tree_util.tree_leaves_with_path(params))}
  heads = lambda w: w.transpose(0, 2, 1).reshape(-1, w.shape[1])     # (n, D, H) -> (n*H, D)
  out = {"model.embed_tokens.weight": p["embedder/input_embedding"],
         "model.norm.weight": p["final_norm/scale"]}
  for i in range(len(TYPES)):
    s, t = f"layer_{i}/", f"model.layers.{i}."
    if k == N:
      q, kk, v = p[s + "attn/qkv_einsum/w"]
    else:
      q, (kk, v) = p[s + "attn/q_einsum/w"], p[s + "attn/kv_einsum/w"]
    gate, up = p[s + "mlp/gating_einsum"]                            # (2, F, D)
    out.update({
        t + "self_attn.q_proj.weight": heads(q), t + "self_attn.k_proj.weight": heads(kk),
        t + "self_attn.v_proj.weight": heads(v),
        t + "self_attn.o_proj.weight": p[s + "attn/attn_vec_einsum/w"].reshape(N * H, D).T,
        t + "self_attn.q_norm.weight": p[s + "attn/_query_norm/scale"],
        t + "self_attn.k_norm.weight": p[s + "attn/_key_norm/scale"],
        t + "mlp.gate_proj.weight": gate, t + "mlp.up_proj.weight": up,
        t + "mlp.down_proj.weight": p[s + "mlp/linear"].T,
        t + "input_layernorm.weight": p[s + "pre_attention_norm/scale"],
        t + "post_attention_layernorm.weight": p[s + "post_attention_norm/scale"],
        t + "pre_feedforward_layernorm.weight": p[s + "pre_ffw_norm/scale"],
        t + "post_feedforward_layernorm.weight": p[s + "post_ffw_norm/scale"]})
  return {key: torch.from_numpy(np.array(v, np.float32)) for key, v in out.items()}


def _close(got, want, rtol=1e-4):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err = float(np.max(np.abs(got - want)))
  assert err <= rtol * float(np.max(np.abs(want))), (err, float(np.max(np.abs(want))))


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


class Case:
  """A gemma-library Gemma 3 with random weights and the same model in PyTorch."""

  def __init__(self, k, tmp):
    self.k, self.model = k, _model(k)
    self.tokens = np.random.default_rng(0).integers(3, V, (2, T)).astype(np.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (2, T, T))
    self.fn = lambda variables, tokens: self.model.apply(
        variables, tokens, positions=positions, attention_mask=mask).logits
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(self.model.init, jax.random.key(0), jnp.asarray(self.tokens),
                            positions=positions, attention_mask=mask)
    self.params = jax.tree.map(
        lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), jnp.float32), shapes)
    torch.manual_seed(0)
    hf = _hf_model(k)
    missing, unexpected = hf.load_state_dict(_to_hf(self.params["params"], k), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    self.hf_dir = os.fspath(tmp / "hf")
    hf.save_pretrained(self.hf_dir)

  def hf(self):
    return transformers.Gemma3ForCausalLM.from_pretrained(self.hf_dir,
                                                          dtype=torch.float32).eval()

  def logits(self, frozen, trainable=None):
    if trainable is None:
      return np.asarray(jax.jit(self.fn)(frozen, jnp.asarray(self.tokens)))
    return np.asarray(jax.jit(jlora.lora(self.fn))(frozen, trainable, jnp.asarray(self.tokens)))

  def layouts(self):
    return jlora.infer_layouts(self.fn, self.params, jnp.asarray(self.tokens))


@pytest.fixture(scope="module", params=[K, N], ids=["kv_einsum", "qkv_einsum"])
def case(request, tmp_path_factory):
  return Case(request.param, tmp_path_factory.mktemp(f"gemma{request.param}"))


def _adapted(case, rank=4, alpha=8, seed=1, targets=TARGETS):
  """``(frozen, trainable, spec)``: the model adapted by jlora, random nonzero A and B."""
  spec = jlora.LoraSpec(rank=rank, alpha=alpha, targets=targets)
  frozen, trainable = jlora.lora_transform(case.params, spec, key=jax.random.key(seed),
                                           layouts=case.layouts())
  rng = np.random.default_rng(seed)
  trainable = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype),
                           trainable)
  return frozen, trainable, spec


def test_the_converter_gives_the_base_logits(case):
  _close(case.logits(case.params), _torch_logits(case.hf(), case.tokens))


def test_the_rules_layouts_are_the_models(case):
  # The layouts the rules state for every kernel of the layers are the ones
  # jlora reads from the model's einsums.
  inferred = {p: lay for p, lay in case.layouts().items() if "/layer_" in p}
  per_layer = 4 if case.k == N else 5         # q/kv or qkv, o, gating, linear
  assert len(inferred) == per_layer * len(TYPES), sorted(inferred)
  assert jlora.peft.Rules.gemma(case.model).layouts_for(list(inferred)) == inferred


def test_jlora_adapter_loads_in_pytorch_peft(case, tmp_path):
  frozen, trainable, spec = _adapted(case)
  rules = jlora.peft.Rules.gemma(case.model)
  config = jlora.peft.save(tmp_path / "a", trainable, rules, spec=spec,
                           base_model_name_or_path=case.hf_dir, task_type="CAUSAL_LM")
  assert sorted(config["target_modules"]) == sorted(MODULES)
  peft_model = peft.PeftModel.from_pretrained(case.hf(), os.fspath(tmp_path / "a")).eval()
  want = case.logits(frozen, trainable)
  _close(_torch_logits(peft_model, case.tokens), want)
  # The adapter matters: the base model's logits are far from these.
  assert np.max(np.abs(want - case.logits(case.params))) > 0.1
  # jlora reads its own folder back as it was.
  back = jlora.peft.load(tmp_path / "a", case.params, rules)
  _close(case.logits(back.frozen, back.trainable), want, rtol=1e-5)


def test_pytorch_peft_adapter_loads_in_gemma(case, tmp_path):
  torch.manual_seed(2)
  cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODULES, init_lora_weights=False,
                        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4})
  peft_model = peft.get_peft_model(case.hf(), cfg).eval()
  want = _torch_logits(peft_model, case.tokens)
  peft_model.save_pretrained(os.fspath(tmp_path / "p"))
  adapter = jlora.peft.load(tmp_path / "p", case.params, jlora.peft.Rules.gemma(case.model))
  _close(case.logits(adapter.frozen, adapter.trainable), want)
  assert np.max(np.abs(want - case.logits(case.params))) > 0.1


# Bad input: one line, naming what is wrong ----------------------------------

def _one_line(err):
  assert "\n" not in str(err.value), str(err.value)
  return str(err.value)


def test_a_model_without_rules_is_refused():
  with pytest.raises(LoraError) as err:
    jlora.peft.Rules.gemma(object())
  assert "supported: the gemma library's Gemma 3" in _one_line(err)


def test_a_folder_that_adapts_part_of_a_fused_kernel_is_refused(tmp_path_factory, tmp_path):
  case = Case(K, tmp_path_factory.mktemp("gemma_errors"))
  cfg = peft.LoraConfig(r=2, target_modules=["gate_proj"], init_lora_weights=False)
  peft.get_peft_model(case.hf(), cfg).save_pretrained(os.fspath(tmp_path / "g"))
  with pytest.raises(LoraPeftError) as err:
    jlora.peft.load(tmp_path / "g", case.params, jlora.peft.Rules.gemma(case.model))
  msg = _one_line(err)
  assert "'model.layers.0.mlp.up_proj' is not" in msg
  assert re.search(r"'params/layer_0/mlp/gating_einsum'", msg)
