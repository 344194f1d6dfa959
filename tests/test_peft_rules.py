"""Name rules: jlora.peft.Rules maps Flax parameter paths to PyTorch modules and back."""

import pytest

import jlora


def test_rules_map_both_ways():
  gpt2 = jlora.peft.Rules.gpt2()
  assert gpt2("transformer/h/0/attn/c_attn/kernel") == "transformer.h.0.attn.c_attn"
  assert gpt2("params/transformer/h/1/mlp/c_fc/bias") == "transformer.h.1.mlp.c_fc"
  assert gpt2.param_path("transformer.h.0.attn.c_attn") == ("params/transformer/h/0/attn/c_attn/kernel", ())
  assert gpt2.is_in_out("transformer.h.0.mlp.c_proj") and not gpt2.is_in_out("lm_head")
  assert gpt2("kernel") is None

  scan = jlora.peft.Rules.scanned(renames={"query": "self_attn.q_proj"})
  assert scan("params/layers/query/kernel") == "model.layers.{0}.self_attn.q_proj"
  assert scan("params/layers/up/kernel") == "model.layers.{0}.up"
  assert scan("params/lm_head/kernel") == "lm_head"
  assert scan.param_path("model.layers.7.self_attn.q_proj") == ("params/layers/query/kernel", (7,))
  assert scan.param_path("model.layers.7.up", "bias") == ("params/layers/up/bias", (7,))

  generic = jlora.peft.Rules.generic()
  assert generic("blocks/0/query/kernel") == "blocks.0.query"
  assert generic.param_path("blocks.0.query") == ("params/blocks/0/query/kernel", ())

  two = jlora.peft.Rules(patterns=[("experts/{e}/{name}", "moe.{layer}.experts.{e}.{name}")])
  assert two("experts/3/w1/kernel") == "moe.{0}.experts.3.w1"
  assert two.param_path("moe.2.experts.3.w1") == ("experts/3/w1/kernel", (2,))

  with pytest.raises(jlora.LoraSpecError, match="not used in the module name"):
    jlora.peft.Rules(patterns=[("a/{x}/{y}", "a.{x}")])


def test_gemma_library_rules_need_no_gemma():
  # The table of Rules.gemma is stated in jlora; tests/test_peft_gemma.py
  # holds it to PyTorch where the gemma library is installed.
  rules = jlora.peft.Rules.gemma()
  names = {"params/layer_0/attn/q_einsum/w": "model.layers.0.self_attn.q_proj",
           "layer_1/attn/kv_einsum/w": "model.layers.1.self_attn.k_proj+v_proj",
           "layer_1/attn/qkv_einsum/w": "model.layers.1.self_attn.q_proj+k_proj+v_proj",
           "layer_2/attn/attn_vec_einsum/w": "model.layers.2.self_attn.o_proj",
           "layer_0/attn/_query_norm/scale": "model.layers.0.self_attn.q_norm",
           "layer_0/mlp/gating_einsum": "model.layers.0.mlp.gate_proj+up_proj",
           "layer_0/mlp/linear": "model.layers.0.mlp.down_proj",
           "layer_0/pre_ffw_norm/scale": "model.layers.0.pre_feedforward_layernorm",
           "params/embedder/input_embedding": "model.embed_tokens",
           "final_norm/scale": "model.norm",
           "embedder/mm_input_projection/w": None, "vision_encoder/siglip/w": None}
  assert {p: rules(p) for p in names} == names
  gating = "params/layer_0/mlp/gating_einsum"
  assert rules.layouts_for([gating])[gating] == jlora.Layout((2,), (0, 1))      # (2, F, D)
  flat = jlora.peft.Rules.gemma(transpose_gating_einsum=False)                  # (2, D, F)
  assert flat.layouts_for([gating])[gating] == jlora.Layout((1,), (0, 2))
  assert rules.tied_to("model.embed_tokens") == ("lm_head",)
  with pytest.raises(jlora.LoraError, match="^jlora.peft.Rules.gemma: no PEFT rules for "
                     "builtins.object; supported: the gemma library's Gemma 3") as err:
    jlora.peft.Rules.gemma(object())
  assert "\n" not in str(err.value)
