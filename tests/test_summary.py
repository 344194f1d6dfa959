"""jlora.summary: parameter counts and bytes against hand computations and PEFT's
printout for Llama-2-7B, on concrete and abstract parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from models import LinenLM, LinenMLP, LMConfig

KEY = jax.random.key(0)


def _mlp_abstract(dtype=jnp.float32):
  x = jnp.zeros((1, 16), dtype)
  abstract = jax.eval_shape(LinenMLP(hidden=32, out=8).init, KEY, x)
  return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), abstract)


# fc1 (16, 32) + 32, fc2 (32, 32) + 32, head (32, 8) + 8
BASE = 16 * 32 + 32 + 32 * 32 + 32 + 32 * 8 + 8


def test_counts_for_a_small_model():
  s = jlora.summary(_mlp_abstract(), jlora.LoraSpec(rank=4, targets=["kernel"]))
  lora = 4 * (16 + 32) + 4 * (32 + 32) + 4 * (32 + 8)
  assert s.base_params == BASE
  assert s.lora_params == lora and s.extra_params == 0 and s.trainable_params == lora
  assert s.total_params == BASE + lora
  assert s.trainable_percent == pytest.approx(100 * lora / (BASE + lora))
  assert s.trainable_bytes == 4 * lora and s.frozen_bytes == 4 * BASE
  rows = {r.path: r for r in s.rows}
  assert list(rows) == ["params/fc1/kernel", "params/fc2/kernel", "params/head/kernel"]
  r = rows["params/head/kernel"]
  assert (r.shape, r.rank, r.a_shape, r.b_shape, r.params) == ((32, 8), 4, (32, 4), (4, 8), 160)


def test_extras_rank_pattern_and_dtypes():
  spec = jlora.LoraSpec(rank=4, targets=["fc1/kernel", "head/kernel"], extra_trainable=["bias"],
                        rank_pattern={"head/kernel": 2})
  s = jlora.summary(_mlp_abstract(jnp.bfloat16), spec)
  lora = 4 * (16 + 32) + 2 * (32 + 8)
  extra = 32 + 32 + 8
  assert (s.lora_params, s.extra_params, s.trainable_params) == (lora, extra, lora + extra)
  assert s.base_params == BASE and s.total_params == BASE + lora
  # A and B are float32 (the spec's dtype) over a bf16 base; the biases stay bf16 and
  # leave the frozen part.
  assert s.trainable_bytes == 4 * lora + 2 * extra
  assert s.frozen_bytes == 2 * (BASE - extra)
  assert [r.rank for r in s.rows] == [4, 2]
  s16 = jlora.summary(_mlp_abstract(jnp.bfloat16),
                      jlora.LoraSpec(rank=4, targets=["fc1/kernel"], dtype=jnp.bfloat16))
  assert s16.trainable_bytes == 2 * 4 * (16 + 32)


def test_concrete_and_abstract_agree_and_nothing_changes():
  abstract = _mlp_abstract()
  params = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), abstract)
  spec = jlora.LoraSpec(rank=4, targets=["kernel"], extra_trainable=r".*head/bias")
  assert jlora.summary(params, spec) == jlora.summary(abstract, spec)
  # It agrees with what lora_transform builds.
  frozen, trainable = jlora.lora_transform(abstract, spec)
  s = jlora.summary(params, spec)
  assert s.trainable_params == sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(trainable))
  assert s.frozen_bytes == sum(np.prod(x.shape) * 4 for x in jax.tree_util.tree_leaves(frozen))


def test_stacked_layers_count_once_per_slice():
  cfg = LMConfig()
  model = LinenLM(cfg)
  toks = jax.ShapeDtypeStruct((2, cfg.seq), jnp.int32)
  abstract = jax.eval_shape(model.init, KEY, toks)
  layouts = jlora.infer_layouts(model.apply, abstract, toks)
  spec = jlora.LoraSpec(rank=4, targets=r".*/(query|out|up)/kernel")
  s = jlora.summary(abstract, spec, layouts=layouts)
  d, h, k, mlp, L = cfg.d_model, cfg.heads, cfg.d_model // cfg.heads, cfg.mlp, cfg.layers
  per_layer = 4 * (d + h * k) + 4 * (h * k + d) + 4 * (d + mlp)
  assert s.lora_params == L * per_layer
  rows = {r.path: r for r in s.rows}
  assert rows["params/layers/query/kernel"].a_shape == (L, d, 4)
  assert rows["params/layers/query/kernel"].b_shape == (L, 4, h, k)
  assert rows["params/layers/out/kernel"].params == L * 4 * (h * k + d)
  base = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract))
  assert s.base_params == base


def _llama2_7b_abstract(dtype=jnp.bfloat16):
  """Llama-2-7B's parameters, layers stacked on axis 0, as ShapeDtypeStructs."""
  L, d, f, v = 32, 4096, 11008, 32000
  sds = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
  layers = {name: {"kernel": sds(L, d, d)} for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
  layers.update({"gate_proj": {"kernel": sds(L, d, f)}, "up_proj": {"kernel": sds(L, d, f)},
                 "down_proj": {"kernel": sds(L, f, d)},
                 "input_layernorm": {"scale": sds(L, d)},
                 "post_attention_layernorm": {"scale": sds(L, d)}})
  return {"params": {"embed_tokens": {"embedding": sds(v, d)}, "layers": layers,
                     "norm": {"scale": sds(d)}, "lm_head": {"kernel": sds(d, v)}}}


def test_7b_abstract_summary_matches_peft():
  params = _llama2_7b_abstract()
  spec = jlora.LoraSpec(rank=8, alpha=16, targets=r".*/(q_proj|v_proj)/kernel",
                        layouts={r".*layers/.*/kernel": jlora.Layout((1,), (2,), (0,))})
  s = jlora.summary(params, spec)
  # PEFT on meta-llama/Llama-2-7b-hf with r=8, target_modules=["q_proj", "v_proj"]:
  # "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622"
  assert s.base_params == 6_738_415_616
  assert s.lora_params == 4_194_304 and s.trainable_params == 4_194_304
  assert s.total_params == 6_742_609_920
  assert round(s.trainable_percent, 4) == 0.0622
  assert s.trainable_bytes == 4 * 4_194_304 and s.frozen_bytes == 2 * 6_738_415_616
  text = str(s)
  assert "trainable params: 4,194,304" in text
  assert "all params: 6,742,609,920" in text
  assert "trainable%: 0.0622" in text
  assert "trainable bytes: 16.0 MiB" in text and "frozen bytes: 12.6 GiB" in text
  lines = text.splitlines()
  assert lines[0].split()[:2] == ["target", "shape"]
  q = next(line for line in lines if line.startswith("params/layers/q_proj/kernel"))
  assert "(32, 4096, 4096)" in q and "(32, 4096, 8)" in q and "(32, 8, 4096)" in q
  assert q.rstrip().endswith("2,097,152")
  assert len(lines) == 1 + 2 + 2


def test_all_linear_7b_with_inferred_layouts_on_an_abstract_linen_model():
  # A 7B-sized Linen model (nn.scan, DenseGeneral): eval_shape and infer_layouts only.
  cfg = LMConfig(vocab=32000, d_model=4096, heads=32, layers=32, mlp=11008, seq=4096,
                 dtype=jnp.bfloat16)
  model = LinenLM(cfg)
  toks = jax.ShapeDtypeStruct((1, 16), jnp.int32)
  abstract = jax.eval_shape(model.init, KEY, toks)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(abstract))
  layouts = jlora.infer_layouts(model.apply, abstract, toks)
  spec = jlora.LoraSpec(rank=16, targets=["kernel"], exclude=["lm_head/kernel"])
  s = jlora.summary(abstract, spec, layouts=layouts)
  d, f, L = 4096, 11008, 32
  assert s.lora_params == L * 16 * (4 * (d + d) + (d + f) + (f + d))
  v, seq = 32000, 4096
  per_layer = 4 * d * d + 4 * d + d * f + f + f * d + d + 2 * 2 * d   # kernels, biases, 2 LNs
  assert s.base_params == v * d + seq * d + L * per_layer + 2 * d + d * v + v
  assert s.frozen_bytes == 4 * s.base_params      # param_dtype stays float32
  assert "trainable params: " + f"{s.lora_params:,}" in str(s)


# -- the memory table (full fine-tuning, LoRA, QLoRA) ----------------------------------------


def _nf4_bytes(n):
  """Bytes of one NF4 slice of n values: codes, absmax codes, nested scales, offset."""
  nb = -(-n // 64)
  return -(-n // 2) + nb + 4 * -(-nb // 256) + 4


def test_memory_table_for_a_small_model():
  spec = jlora.LoraSpec(rank=4, targets=["kernel"])
  s = jlora.summary(_mlp_abstract(), spec, batch=2, seq_len=3, device_memory=2 ** 20)
  m = s.memory
  lora = 4 * (16 + 32) + 4 * (32 + 32) + 4 * (32 + 8)
  quantized = _nf4_bytes(16 * 32) + _nf4_bytes(32 * 32) + _nf4_bytes(32 * 8)
  acts = 2 * 3 * 4 * ((16 + 32) + (32 + 32) + (32 + 8))   # tokens x (in + out) x f32
  assert m.rows["full"] == {"weights": 4 * BASE, "adapters": 0, "gradients": 4 * BASE,
                            "optimizer state": 8 * BASE, "activations": acts}
  assert m.rows["lora"] == {"weights": 4 * BASE, "adapters": 4 * lora, "gradients": 4 * lora,
                            "optimizer state": 8 * lora, "activations": acts}
  assert m.rows["qlora"] == dict(m.rows["lora"], weights=quantized + 4 * (32 + 32 + 8))
  assert m.total("qlora") == quantized + 4 * 72 + 4 * lora * 2 + 8 * lora + acts
  assert m.headroom("qlora") == 2 ** 20 - m.total("qlora") and m.fits("full")
  assert m.activation_bytes_per_token == acts // 6
  assert m.tokens_that_fit("lora") == (2 ** 20 - m.total("lora") + acts) // (acts // 6)
  lines = str(m).splitlines()
  assert lines[0].split() == ["memory", "(KiB)", "full", "FT", "LoRA", "QLoRA"]
  assert [line.split()[0] for line in lines[1:]] == [
      "weights", "adapters", "gradients", "optimizer", "activations", "total", "room"]
  assert "activations (6 tokens)" in lines[5] and lines[-1].startswith("room on 1 MiB")
  # The summary of the quantized params counts their bytes as frozen bytes.
  q = jlora.summary(jlora.quantize(_mlp_abstract()), spec)
  assert q.frozen_bytes == quantized + 4 * 72 and q.base_params == BASE
  assert q.memory.rows == dict(m.rows, **{k: dict(v, activations=0) for k, v in m.rows.items()})


def _llama2_70b_abstract(dtype=jnp.bfloat16):
  """Llama-2-70B's parameters (grouped-query attention: 8 key/value heads),
  layers stacked on axis 0, as ShapeDtypeStructs."""
  L, d, f, v, kv = 80, 8192, 28672, 32000, 1024
  sds = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
  layers = {"q_proj": {"kernel": sds(L, d, d)}, "k_proj": {"kernel": sds(L, d, kv)},
            "v_proj": {"kernel": sds(L, d, kv)}, "o_proj": {"kernel": sds(L, d, d)},
            "gate_proj": {"kernel": sds(L, d, f)}, "up_proj": {"kernel": sds(L, d, f)},
            "down_proj": {"kernel": sds(L, f, d)},
            "input_layernorm": {"scale": sds(L, d)},
            "post_attention_layernorm": {"scale": sds(L, d)}}
  return {"params": {"embed_tokens": {"embedding": sds(v, d)}, "layers": layers,
                     "norm": {"scale": sds(d)}, "lm_head": {"kernel": sds(d, v)}}}


def test_llama2_70b_qlora_fits_a_48gb_gpu():
  """QLoRA's claim, on Llama-2-70B's shapes (abstract, nothing allocated):
  the NF4 base with LoRA r=16 on every projection (float32 factors, Adam),
  fits a 48 GiB GPU with room left for activations; LoRA on the bf16 base
  does not."""
  params = _llama2_70b_abstract()
  spec = jlora.LoraSpec(rank=16, alpha=32, targets=r".*_proj/kernel",
                        layouts={r".*layers/.*/kernel": jlora.Layout((1,), (2,), (0,))})
  gib = 2 ** 30
  s = jlora.summary(params, spec, device_memory=48 * gib)
  m = s.memory
  assert s.base_params == 68_976_648_192
  L, d, f, v, kv = 80, 8192, 28672, 32000, 1024
  per_layer = [d * d, d * kv, d * kv, d * d, d * f, d * f, f * d]
  quantized = L * sum(_nf4_bytes(n) for n in per_layer) + _nf4_bytes(d * v)
  others = 2 * (v * d + 2 * L * d + d)                      # embedding, norms: bf16
  assert m.rows["qlora"]["weights"] == quantized + others
  assert m.rows["lora"]["weights"] == 2 * s.base_params
  lora = L * 16 * (2 * (d + d) + 2 * (d + kv) + 3 * (d + f))
  assert s.lora_params == lora
  assert m.rows["qlora"]["adapters"] == m.rows["qlora"]["gradients"] == 4 * lora
  assert m.rows["qlora"]["optimizer state"] == 8 * lora
  # 0.5159 bytes per quantized parameter: 4.127 bits.
  assert quantized * 8 / (L * sum(per_layer) + d * v) == pytest.approx(4.127, abs=1e-3)
  assert m.fits("qlora") and not m.fits("lora") and not m.fits("full")
  room = m.headroom("qlora")
  assert 11 * gib < room < 12 * gib        # ~11.4 GiB left for activations
  # Activations, estimated without rematerialization: about 24.8 MiB per token.
  assert m.activation_bytes_per_token == 2 * (L * sum(
      a + b for a, b in [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]) + d + v)
  assert 400 < m.tokens_that_fit("qlora") < 500
  text = str(m)
  assert text.splitlines()[0].split()[:2] == ["memory", "(GiB)"]
  assert "room on 48 GiB" in text


def test_dora_counts_its_magnitudes_like_the_trainable_tree():
  # Before: a DoraParam was flattened into its arrays and paired with the wrong
  # frozen leaves, so its A, B and magnitude were counted as "extra" params.
  spec = jlora.LoraSpec(rank=4, targets=["kernel"], use_dora=True, extra_trainable=["head/bias"])
  abstract = _mlp_abstract()
  s = jlora.summary(abstract, spec)
  lora = 4 * (16 + 32) + 4 * (32 + 32) + 4 * (32 + 8) + (32 + 32 + 8)  # + magnitudes
  assert (s.lora_params, s.extra_params) == (lora, 8)
  params = jax.tree_util.tree_map(lambda a: jnp.ones(a.shape, a.dtype), abstract)
  _, trainable = jlora.lora_transform(params, spec, key=KEY)
  assert s.trainable_params == sum(x.size for x in jax.tree_util.tree_leaves(trainable))
  assert [r.params for r in s.rows] == [4 * 48 + 32, 4 * 64 + 32, 4 * 40 + 8]
  assert s.memory.rows["lora"]["adapters"] == 4 * (lora + 8)
