"""PEFT folders for every adapter kind, both ways, against PyTorch PEFT 0.21.

* DoRA (``use_dora``, ``lora_magnitude_vector``) and LoRA on embeddings
  (``lora_embedding_A/B``) on transformers' Llama, and a tied embedding
  (``tie_word_embeddings``, PEFT's ``ensure_weight_tying``) on a Flax Llama
  whose output head is the embedding table;
* DoRA on transformers' GPT-2 (``Conv1D``, ``fan_in_fan_out``);
* Conv2d LoRA and DoRA on a small CNN written twice (PyTorch and Flax, same weights);
* fused experts (``target_parameters``): two parameters of one module (PEFT
  nests their wrappers) and an ``is_transposed`` module, with ``ragged_dot``;
* PiSSA: refused without the initial factors, written as PEFT's rank-2r
  conversion with them; PEFT's own conversion loads.

Each direction compares logits with PEFT's within 1e-4. Skipped without torch,
PEFT or a transformers that has Flax models.
"""

from __future__ import annotations

import copy
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict

import jlora
from jlora.peft import kinds
from lazy import lazy
from test_peft_hf import (_flax_logits, _load_in_peft, _models,  # noqa: F401  (the fixture skips)
                          _needs_flax_models, _randomize, _torch_logits)

torch = lazy("torch")
peft = lazy("peft")
transformers = lazy("transformers")

IDS = np.random.default_rng(0).integers(0, 32, size=(2, 8), dtype=np.int64)


def _noisy(tree, seed, std=0.2):
  """Every array of a trainable tree moved off its value (B nonzero, magnitudes changed)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + std * rng.standard_normal(x.shape),
                                            x.dtype), tree)


def _adapter(params, spec, seed, layouts=None, std=0.2):
  """``lora_transform``'s trainable tree with random arrays drawn by NumPy (no
  XLA compilation for the init; a DoRA magnitude about 1 +- std)."""
  _, t = jlora.lora_transform(jax.eval_shape(lambda: params), spec, layouts=layouts)
  rng = np.random.default_rng(seed)
  fill = lambda kp, x: jnp.asarray((1.0 if kp[-1].name == "magnitude" else 0.0)  # noqa: E731
                                   + std * rng.standard_normal(x.shape), x.dtype)
  return jax.tree_util.tree_map_with_path(fill, t)


def _peft_model(tm, seed, **config):
  pm = peft.get_peft_model(copy.deepcopy(tm), peft.LoraConfig(r=4, lora_alpha=8, **config))
  _randomize(pm, seed)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_magnitude_vector" in name:
        p.mul_(1.3)                     # a magnitude that is not W0's norms
  return pm.eval()


def _lora_logits(fn, frozen, trainable, *args):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", jlora.LoraMaterializeWarning)   # DoRA on a gather, a conv
    return np.asarray(jax.jit(jlora.lora(fn))(frozen, trainable, *args))


def test_dora_and_embeddings_both_ways_on_llama(tmp_path):
  m, tm, fm, params = _models("llama")
  rules, fn = m["rules"](), lambda p, x: fm(x, params=p).logits
  base = _torch_logits(tm, IDS)
  pm = _peft_model(tm, 1, use_dora=True, target_modules=["embed_tokens", "q_proj", "down_proj"])
  pm.save_pretrained(tmp_path / "peft")
  want = _torch_logits(pm, IDS)
  assert np.max(np.abs(want - base)) > 0.05
  ad = jlora.peft.load(tmp_path / "peft", params, rules)    # with PEFT's copy of the embedding
  emb = ad.trainable["model"]["embed_tokens"]["embedding"]
  assert isinstance(emb, jlora.DoraParam) and emb.magnitude.shape == (16,) and ad.spec.use_dora
  np.testing.assert_allclose(_flax_logits(fm, jlora.merge(ad.frozen, ad.trainable), IDS), want,
                             atol=1e-4)
  np.testing.assert_allclose(_lora_logits(fn, ad.frozen, ad.trainable, jnp.asarray(IDS)), want,
                             atol=1e-4)

  spec = jlora.LoraSpec(rank=4, alpha=8, use_dora=True,
                        targets=r".*/(embed_tokens/embedding|q_proj/kernel|down_proj/kernel)")
  frozen, t = params, _adapter(params, spec, 3)
  config = jlora.peft.save(tmp_path / "ours", t, rules, spec=spec)
  assert config["use_dora"] and config["target_modules"] == ["down_proj", "embed_tokens", "q_proj"]
  ours = _flax_logits(fm, jlora.merge(frozen, t), IDS)
  assert np.max(np.abs(ours - base)) > 0.05
  np.testing.assert_allclose(_torch_logits(_load_in_peft(tm, tmp_path / "ours"), IDS), ours,
                             atol=1e-4)
  # One folder is DoRA or not: mixed kinds are refused, as is a bank of DoRA adapters.
  plain = _adapter(params, jlora.LoraSpec(rank=4, targets=r".*/v_proj/kernel"), 1)
  mixed = jax.tree.map(lambda a, b: a if a is not None else b, t, plain,
                       is_leaf=lambda x: x is None or jlora.adapters.is_adapter(x))
  with pytest.raises(jlora.LoraPeftError, match=r"mixes \['DoraParam', 'LoraParam'\].*two folders"):
    jlora.peft.save(tmp_path / "mixed", mixed, rules)
  with pytest.raises(jlora.LoraTreeError, match="is a DoraParam \\('dora'\\); a bank holds plain"):
    jlora.stack_adapters({"a": t, "b": t})
  (tmp_path / "bank").mkdir()
  pm.save_pretrained(tmp_path / "bank" / "x")
  with pytest.raises(jlora.LoraPeftError, match="adapter 'x' is a DoRA adapter.*load it alone"):
    jlora.peft.load_bank(tmp_path / "bank", params, rules)


def _tied_llama():
  """A torch Llama with tie_word_embeddings and transformers' Flax Llama whose
  output head is the embedding table (no lm_head parameter)."""
  config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=16, vocab_size=32,
                                    tie_word_embeddings=True)
  torch.manual_seed(0)
  tm = transformers.LlamaForCausalLM(config).eval()
  fm = transformers.FlaxLlamaForCausalLM(config, _do_init=False)
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  flat = {}
  for path in flatten_dict(fm.params_shape_tree):
    if path[0] != "lm_head":
      value = sd[".".join(path[:-1] + ({"kernel": "weight", "embedding": "weight"}.get(
          path[-1], path[-1]),))]
      flat[path] = jnp.asarray(value.T if path[-1] == "kernel" else value)

  def fn(p, x):
    return fm(x, params={**p, "lm_head": {"kernel": p["model"]["embed_tokens"]["embedding"].T}}
              ).logits
  return tm, fn, unflatten_dict(flat)


def test_tied_embedding_both_ways_on_llama(tmp_path):
  tm, fn, params = _tied_llama()
  rules = jlora.peft.Rules.llama(tie_word_embeddings=True)
  x = jnp.asarray(IDS, jnp.int32)
  np.testing.assert_allclose(np.asarray(jax.jit(fn)(params, x)), _torch_logits(tm, IDS),
                             atol=1e-4)
  pm = _peft_model(tm, 1, target_modules=["embed_tokens", "v_proj"], ensure_weight_tying=True)
  pm.save_pretrained(tmp_path / "peft")
  want = _torch_logits(pm, IDS)
  ad = jlora.peft.load(tmp_path / "peft", params, rules)     # lm_head's factors checked
  with pytest.raises(jlora.LoraPeftError, match=r"module 'lm_head', which no parameter maps "
                                                r"to.*Rules\(tied=\.\.\.\)"):
    jlora.peft.load(tmp_path / "peft", params, jlora.peft.Rules.llama())
  with warnings.catch_warnings():
    warnings.simplefilter("error", jlora.LoraMaterializeWarning)   # lookup and head: low-rank
    np.testing.assert_allclose(_lora_logits(fn, ad.frozen, ad.trainable, x), want, atol=1e-4)

  spec = jlora.LoraSpec(rank=4, alpha=8, targets=r".*/(embed_tokens/embedding|v_proj/kernel)")
  frozen, t = params, _adapter(params, spec, 3, layouts=jlora.infer_layouts(fn, params, x))
  config = jlora.peft.save(tmp_path / "ours", t, rules, spec=spec)
  assert config["ensure_weight_tying"]
  ours = _lora_logits(fn, frozen, t, x)
  np.testing.assert_allclose(_torch_logits(_load_in_peft(tm, tmp_path / "ours"), IDS), ours,
                             atol=1e-4)
  # Without ensure_weight_tying PEFT adapts the lookup alone: refused.
  plain = _peft_model(tm, 1, target_modules=["embed_tokens"])
  plain.save_pretrained(tmp_path / "lookup")
  with pytest.raises(jlora.LoraPeftError, match=r"tied to \['lm_head'\], and this folder adapts "
                                                r"its lookup only"):
    jlora.peft.load(tmp_path / "lookup", params, rules)


def test_dora_on_gpt2_conv1d_from_peft(tmp_path):
  """GPT-2's Conv1D (fan_in_fan_out) with transformers' Flax GPT-2 (kernels (out, in))."""
  m, tm, fm, params = _models("gpt2")
  pm = _peft_model(tm, 2, use_dora=True, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
  pm.save_pretrained(tmp_path)
  ad = jlora.peft.load(tmp_path, params, m["rules"]())
  assert ad.trainable["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].magnitude.shape == (48,)
  np.testing.assert_allclose(_flax_logits(fm, jlora.merge(ad.frozen, ad.trainable), IDS),
                             _torch_logits(pm, IDS), atol=1e-4)


@functools.cache
def _torch_cnn_class():
  """A ``torch.nn.Module``, so defined once torch is imported."""

  class TorchCNN(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
      self.conv2 = torch.nn.Conv2d(8, 6, 3, stride=2, padding=1)
      self.head = torch.nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):                       # x NCHW; flattened NHWC, as Flax
      x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
      return self.head(x.permute(0, 2, 3, 1).flatten(1))

  return TorchCNN


class FlaxCNN(nn.Module):
  @nn.compact
  def __call__(self, x):                      # x NHWC
    x = nn.relu(nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), name="conv1")(x))
    x = nn.relu(nn.Conv(6, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv2")(x))
    return nn.Dense(5, name="head")(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("dora", [False, True])
def test_conv2d_both_ways(tmp_path, dora):
  torch.manual_seed(0)
  tm = _torch_cnn_class()().eval()
  sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
  params = {"params": {
      name: {"kernel": jnp.asarray(sd[f"{name}.weight"].transpose(2, 3, 1, 0) if "conv" in name
                                   else sd[f"{name}.weight"].T),
             "bias": jnp.asarray(sd[f"{name}.bias"])} for name in ("conv1", "conv2", "head")}}
  fm = FlaxCNN()
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)

  def torch_out(model):
    with torch.no_grad():
      return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  base = torch_out(tm)
  np.testing.assert_allclose(np.asarray(fm.apply(params, x)), base, atol=1e-5)
  rules = jlora.peft.Rules(conv=r"conv\d")
  pm = peft.get_peft_model(copy.deepcopy(tm), peft.LoraConfig(
      r=2, lora_alpha=4, target_modules=["conv1", "conv2", "head"], use_dora=dora))
  _randomize(pm, 1)
  pm.save_pretrained(tmp_path / "peft")
  want = torch_out(pm.eval())
  assert np.max(np.abs(want - base)) > 0.05
  ad = jlora.peft.load(tmp_path / "peft", params, rules)
  lp = ad.trainable["params"]["conv1"]["kernel"]
  assert lp.a.shape == (3, 3, 3, 2) and lp.b.shape == (2, 8)
  assert lp.layout == jlora.Layout((0, 1, 2), (3,))
  np.testing.assert_allclose(_lora_logits(fm.apply, ad.frozen, ad.trainable, x), want, atol=1e-4)

  spec = jlora.LoraSpec(rank=2, alpha=4, targets=r".*/(conv\d|head)/kernel", use_dora=dora)
  frozen, t = params, _adapter(params, spec, 3, jlora.infer_layouts(fm.apply, params, x), 0.3)
  jlora.peft.save(tmp_path / "ours", t, rules, spec=spec)
  back = peft.PeftModel.from_pretrained(copy.deepcopy(tm), tmp_path / "ours").eval()
  np.testing.assert_allclose(torch_out(back), _lora_logits(fm.apply, frozen, t, x), atol=1e-4)
  with pytest.raises(jlora.LoraPeftError, match="a PyTorch convolution needs a Flax kernel"):
    jlora.peft.save(tmp_path / "bad", t, jlora.peft.Rules(conv=True))    # head is no conv


E, D, F = 3, 6, 10


@functools.cache
def _torch_moe_class():
  """``torch.nn.Module`` classes, so defined once torch is imported."""

  class Experts(torch.nn.Module):
    """Fused experts as transformers' MoE layers hold them: bare (E, in, out) parameters."""

    def __init__(self):
      super().__init__()
      self.up = torch.nn.Parameter(0.3 * torch.randn(E, D, F))
      self.down = torch.nn.Parameter(0.3 * torch.randn(E, F, D))

    def forward(self, x, ids):
      h = torch.relu(torch.einsum("nd,ndf->nf", x, self.up[ids]))
      return torch.einsum("nf,nfd->nd", h, self.down[ids])


  class Proj(torch.nn.Module):
    is_transposed = True                        # PEFT reads w as (E, out, in)

    def __init__(self):
      super().__init__()
      self.w = torch.nn.Parameter(0.3 * torch.randn(E, 4, D))

    def forward(self, x, ids):
      return torch.einsum("nd,nod->no", x, self.w[ids])


  class MoE(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.experts, self.proj = Experts(), Proj()

    def forward(self, x, ids):
      return self.proj(self.experts(x, ids), ids)

  return MoE


def moe_fn(p, x, ids):
  """The same layer in JAX: tokens grouped by expert, jax.lax.ragged_dot."""
  order = jnp.argsort(ids)
  sizes = jnp.bincount(ids, length=E).astype(jnp.int32)
  h = jax.nn.relu(jax.lax.ragged_dot(x[order], p["experts"]["up"], sizes))
  y = jax.lax.ragged_dot(h, p["experts"]["down"], sizes)
  z = jax.lax.ragged_dot(y, jnp.swapaxes(p["proj"]["w"], 1, 2), sizes)
  return z[jnp.argsort(order)]


def test_fused_experts_both_ways(tmp_path):
  torch.manual_seed(0)
  tm = _torch_moe_class()().eval()
  params = {"experts": {"up": jnp.asarray(tm.experts.up.detach().numpy()),
                        "down": jnp.asarray(tm.experts.down.detach().numpy())},
            "proj": {"w": jnp.asarray(tm.proj.w.detach().numpy())}}
  rng = np.random.default_rng(0)
  x, ids = rng.standard_normal((7, D)).astype(np.float32), rng.integers(0, E, 7)

  def torch_out(model):
    with torch.no_grad():
      return model(torch.from_numpy(x), torch.from_numpy(ids)).numpy()
  layouts = jlora.infer_layouts(moe_fn, params, x, ids)
  rules = jlora.peft.Rules(parameters=True, transposed_parameters=r"proj\.w",
                           parameter_order=("up", "down"))
  pm = peft.get_peft_model(copy.deepcopy(tm), peft.LoraConfig(
      r=2, lora_alpha=4, target_modules=[], target_parameters=["experts.up", "experts.down",
                                                               "proj.w"]))
  _randomize(pm, 1)
  pm.save_pretrained(tmp_path / "peft")
  want = torch_out(pm.eval())
  ad = jlora.peft.load(tmp_path / "peft", params, rules, layouts=layouts)
  assert ad.trainable["experts"]["up"].a.shape == (E, D, 2)
  with warnings.catch_warnings():
    warnings.simplefilter("error", jlora.LoraMaterializeWarning)   # one pair per expert
    np.testing.assert_allclose(_lora_logits(moe_fn, ad.frozen, ad.trainable, x, ids), want,
                               atol=1e-4)
  # Without the rules' parameter_order, the shapes tell which wrapper is which parameter.
  again = jlora.peft.load(tmp_path / "peft", params, jlora.peft.Rules(
      parameters=True, transposed_parameters=r"proj\.w"), layouts=layouts)
  for got, ref in zip(jax.tree.leaves(again.trainable), jax.tree.leaves(ad.trainable)):
    np.testing.assert_array_equal(got, ref)

  spec = jlora.LoraSpec(rank=2, alpha=4, targets=["up", "down", "w"])
  frozen, t = params, _adapter(params, spec, 3, layouts, 0.3)
  config = jlora.peft.save(tmp_path / "ours", t, rules, spec=spec)
  assert config["target_parameters"] == ["experts.down", "experts.up", "proj.w"]
  assert config["target_modules"] == []
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(tm), tmp_path / "ours").eval()
  assert not [w for w in caught if "missing" in str(w.message) or "unexpected" in str(w.message)]
  np.testing.assert_allclose(torch_out(back), _lora_logits(moe_fn, frozen, t, x, ids), atol=1e-4)

  with pytest.raises(jlora.LoraPeftError, match=r"2 parameters of PyTorch module 'experts' are "
                                                r"adapted.*Rules\(parameter_order"):
    jlora.peft.save(tmp_path / "x", t, jlora.peft.Rules(parameters=True))
  with pytest.raises(jlora.LoraPeftError, match="no DoRA for target_parameters"):
    jlora.peft.save(tmp_path / "x", _adapter(
        params, jlora.LoraSpec(rank=2, targets=["w"], use_dora=True), 0, layouts), rules)
  with pytest.raises(jlora.LoraPeftError, match="cannot apply LoRA dropout"):
    jlora.peft.save(tmp_path / "x", _adapter(
        params, jlora.LoraSpec(rank=2, targets=["w"], dropout=0.1), 0, layouts), rules)


def test_kinds_map_each_slice_exactly():
  """The update s B A of every kind is the same array after a trip through PEFT's layout."""
  rng = np.random.default_rng(0)
  cases = [(kinds.LINEAR, jlora.Layout((0, 1), (2,)), (3, 4, 5), False),
           (kinds.CONV, jlora.Layout((0, 1, 2), (3,)), (3, 3, 4, 6), False),
           (kinds.EMBEDDING, jlora.Layout((0,), (1,)), (9, 4), False),
           (kinds.EMBEDDING, jlora.Layout((1,), (0,)), (9, 4), False),
           (kinds.PARAMETER, jlora.Layout((1,), (2,), (0,)), (3, 4, 5), False),
           (kinds.PARAMETER, jlora.Layout((2,), (1,), (0,)), (3, 4, 5), True),
           (kinds.PARAMETER, jlora.Layout((1,), (0,)), (4, 5), False)]
  for kind, lay, shape, transposed in cases:
    a = rng.standard_normal(lay.a_shape(shape, 2)).astype(np.float32)
    b = rng.standard_normal(lay.b_shape(shape, 2)).astype(np.float32)
    lora_a, lora_b = kinds.to_torch(kind, a, b, lay, transposed)
    assert (lora_a.shape, lora_b.shape) == kinds.torch_shapes(kind, shape, lay, 2, transposed)
    a2, b2 = kinds.from_torch(kind, lora_a, lora_b, lay, shape, 2, transposed)
    np.testing.assert_array_equal(a2, a)
    np.testing.assert_array_equal(b2, b)


def test_pissa_is_refused_or_converted_as_peft_does(tmp_path):
  m, tm, fm, params = _models("llama")
  rules = m["rules"]()
  spec = jlora.LoraSpec(rank=2, alpha=4, targets=r".*/(q_proj|v_proj)/kernel", init="pissa")
  residual, initial = jlora.lora_transform(params, spec, key=jax.random.key(0))
  trained = _noisy(initial, 3, 0.05)
  with pytest.raises(jlora.LoraPeftError, match=r"made with init='pissa': it is relative to the "
                                                r"residual W0.*initial="):
    jlora.peft.save(tmp_path / "x", trained, rules, spec=spec)
  config = jlora.peft.save(tmp_path / "ours", trained, rules, initial=initial)
  assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (4, 8, True)
  ours = _flax_logits(fm, jlora.merge(residual, trained), IDS)
  assert np.max(np.abs(ours - _torch_logits(tm, IDS))) > 0.05
  np.testing.assert_allclose(_torch_logits(_load_in_peft(tm, tmp_path / "ours"), IDS), ours,
                             atol=1e-4)
  # PEFT's own conversion (path_initial_model_for_weight_conversion) loads as a plain adapter.
  pm = peft.get_peft_model(copy.deepcopy(tm), peft.LoraConfig(
      r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
  pm.save_pretrained(tmp_path / "init")
  _randomize(pm, 4)
  pm.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=tmp_path / "init")
  ad = jlora.peft.load(tmp_path / "conv", params, rules)
  assert ad.spec.rank == 4
  np.testing.assert_allclose(_flax_logits(fm, jlora.merge(ad.frozen, ad.trainable), IDS),
                             _torch_logits(pm.eval(), IDS), atol=1e-4)
