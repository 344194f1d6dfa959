"""Export: jlora.peft.save's names, dtypes, modules_to_save and refusals."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jlora
from peft_util import PORT_RULES, PREFIX, make_tiny, perturb


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return make_tiny(tmp_path_factory.mktemp("tiny"))


def test_function_rules_and_dtype(tmp_path):
  params = {"enc": {"proj": {"w": jnp.ones((6, 5))}}}
  spec = jlora.LoraSpec(rank=2, alpha=2, targets=["w"])
  _, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  trainable = perturb(trainable, 0)
  fn = lambda path: path.rpartition("/")[0].replace("/", ".")  # noqa: E731
  jlora.peft.save(tmp_path, trainable, fn, dtype=jnp.bfloat16)
  sd = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  assert sd[PREFIX + "enc.proj.lora_A.weight"].dtype == jnp.bfloat16
  rules = jlora.peft.Rules(function=fn, kernel_leaves=("w",), leaf_names={"w": "weight"})
  ad = jlora.peft.load(tmp_path, params, rules)
  lp = ad.trainable["enc"]["proj"]["w"]
  assert lp.a.dtype == jnp.bfloat16 and ad.spec.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(lp.b, np.float32),
                             np.asarray(trainable["enc"]["proj"]["w"].b.astype(jnp.bfloat16), np.float32))


def test_linear_modules_to_save_are_transposed(tmp_path):
  params = {"body": {"kernel": jnp.ones((6, 5))}, "head": {"kernel": jnp.arange(15.0).reshape(5, 3),
                                                           "bias": jnp.arange(3.0)}}
  spec = jlora.LoraSpec(rank=2, targets=["body/kernel"], extra_trainable=r"head/.*")
  _, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  jlora.peft.save(tmp_path, trainable, jlora.peft.Rules())
  sd = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  # nn.Linear stores (out, in).
  np.testing.assert_array_equal(sd[PREFIX + "head.weight"], np.arange(15.0).reshape(5, 3).T)
  ad = jlora.peft.load(tmp_path, params, jlora.peft.Rules())
  np.testing.assert_array_equal(ad.trainable["head"]["kernel"], params["head"]["kernel"])
  assert ad.frozen["head"]["kernel"] is None and ad.frozen["body"]["kernel"] is not None


def test_export_errors(tiny, tmp_path):
  params, spec, trainable, _ = tiny
  gpt2 = PORT_RULES
  with pytest.raises(jlora.LoraPeftError, match="'params/transformer/h/0/attn/c_attn/kernel': the rules give no"):
    jlora.peft.save(tmp_path, trainable, lambda path: None)
  with pytest.raises(jlora.LoraPeftError, match="both map to PyTorch module 'x'"):
    jlora.peft.save(tmp_path, trainable, lambda path: "x")
  with pytest.raises(jlora.LoraPeftError, match="1 stack-index field.*has 0 stack axes"):
    jlora.peft.save(tmp_path, trainable, jlora.peft.Rules.scanned(stack="params/transformer/h/0"))
  with pytest.raises(jlora.LoraPeftError, match="not the spec's"):
    jlora.peft.save(tmp_path, trainable, gpt2, spec=jlora.LoraSpec(rank=4, alpha=4, targets=spec.targets))
  with pytest.raises(jlora.LoraPeftError, match="does not select adapted module"):
    jlora.peft.save(tmp_path, trainable, gpt2, target_modules=["c_attn"])
  with pytest.raises(jlora.LoraPeftError, match="selects 'transformer.h.0.mlp.c_fc', which has no LoRA"):
    jlora.peft.save(tmp_path, trainable, gpt2, target_modules=["c_attn", "c_proj", "c_fc"])

  half = jlora.LoraSpec(rank=4, targets=r".*/c_attn/kernel", extra_trainable=r".*/c_attn/bias")
  _, t = jlora.lora_transform(params, half, key=jax.random.key(0))
  with pytest.raises(jlora.LoraPeftError, match="'params/transformer/h/0/attn/c_attn/bias' is trained in full "
                     "but 'params/transformer/h/0/attn/c_attn/kernel' of the same PyTorch module"):
    jlora.peft.save(tmp_path, t, gpt2)
  emb = jlora.LoraSpec(rank=4, targets=r".*/wte/embedding")
  _, t = jlora.lora_transform(params, emb, key=jax.random.key(0))
  with pytest.raises(jlora.LoraPeftError, match="'params/transformer/wte/embedding': the table of "
                     r"'transformer.wte' is tied to \['lm_head'\].*only for an embedding named "
                     "'embed_tokens'"):
    jlora.peft.save(tmp_path, t, gpt2)
