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
