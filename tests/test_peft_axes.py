"""Factor axes: nn.scan stacks and multi-axis kernels, checked against the merged weights."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jlora
from peft_util import PREFIX, make_stacked, perturb


@pytest.fixture(scope="module")
def stacked():
  return make_stacked()


def test_scan_stack_exports_one_module_per_layer(stacked, tmp_path):
  cfg, model, params, layouts, tokens = stacked
  spec = jlora.LoraSpec(rank=3, alpha=6, targets=r".*/layers/(query|out|up)/kernel",
                        extra_trainable=r".*/layers/LayerNorm_1/.*")
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0), layouts=layouts)
  trainable = perturb(trainable, 0)
  rules = jlora.peft.Rules.scanned(renames={"query": "self_attn.q_proj", "out": "self_attn.o_proj",
                                           "up": "mlp.up_proj"})
  config = jlora.peft.save(tmp_path, trainable, rules, spec=spec)
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
  ad = jlora.peft.load(tmp_path, params, rules, layouts=layouts)
  for flax in ("query", "out", "up"):
    got, want = ad.trainable["params"]["layers"][flax]["kernel"], trainable["params"]["layers"][flax]["kernel"]
    assert got.layout == want.layout and got.scale == want.scale
    np.testing.assert_array_equal(np.asarray(got.a), np.asarray(want.a))
    np.testing.assert_array_equal(np.asarray(got.b), np.asarray(want.b))
  apply = jax.jit(jlora.lora(model.apply))
  np.testing.assert_allclose(apply(ad.frozen, ad.trainable, tokens), apply(frozen, trainable, tokens),
                             atol=1e-6)
  again = jlora.peft.save(tmp_path / "again", ad.trainable, rules, spec=ad.spec)
  assert again == config
  sd2 = load_file(os.path.join(tmp_path / "again", "adapter_model.safetensors"))
  assert sd2.keys() == sd.keys() and all(np.array_equal(sd[k], sd2[k]) for k in sd)


def test_multi_axis_layouts_flatten_in_weight_axis_order(tmp_path):
  # A (3, 4, 5) kernel contracted over axes 1 and 0 (A's order), output axis 2:
  # PyTorch's (out, in) weight is the kernel reshaped to (3 * 4, 5), transposed.
  w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 5)), jnp.float32)
  params = {"mix": {"kernel": w}}
  layout = jlora.Layout(in_axes=(1, 0), out_axes=(2,))
  spec = jlora.LoraSpec(rank=2, alpha=3, targets=["mix/kernel"], layouts={"mix/kernel": layout})
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  trainable = perturb(trainable, 0)
  jlora.peft.save(tmp_path, trainable, jlora.peft.Rules(), spec=spec)
  sd = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  a, b = sd[PREFIX + "mix.lora_A.weight"], sd[PREFIX + "mix.lora_B.weight"]
  assert a.shape == (2, 12) and b.shape == (5, 2)
  delta = np.asarray(jlora.merge(frozen, trainable)["mix"]["kernel"] - w).reshape(12, 5)
  np.testing.assert_allclose((1.5 * b @ a).T, delta, atol=1e-5)
  ad = jlora.peft.load(tmp_path, params, jlora.peft.Rules(), layouts={"mix/kernel": layout})
  np.testing.assert_array_equal(np.asarray(ad.trainable["mix"]["kernel"].a),
                                np.asarray(trainable["mix"]["kernel"].a))
  assert ad.spec.layout_override("mix/kernel") == layout


# -- kernels stored (out, in) (issue 10 item 9) -------------------------------------------


def _out_in_model(d_in=6, d_out=6, head=(3, 6)):
  """An Equinox-style model: every Linear weight stored (out, in), used as x @ w.T."""
  rng = np.random.default_rng(0)
  params = {"fc": {"weight": jnp.asarray(rng.standard_normal((d_out, d_in)), jnp.float32)},
            "head": {"weight": jnp.asarray(rng.standard_normal(head), jnp.float32)}}
  fn = lambda p, x: (x @ p["fc"]["weight"].T) @ p["head"]["weight"].T  # noqa: E731
  return params, fn


def test_out_in_kernels_are_never_guessed(tmp_path):
  """A square (out, in) kernel cannot be told apart from an (in, out) one by
  its shape: with rules that do not know (kernel_order=None) it is refused,
  naming it; the model function (infer_layouts) or the rules' kernel_order
  says which, and then the round trip is exact, modules_to_save included."""
  params, fn = _out_in_model()
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 6)), jnp.float32)
  layouts = jlora.infer_layouts(fn, params, x)
  assert layouts["fc/weight"] == jlora.Layout((1,), (0,))
  spec = jlora.LoraSpec(rank=2, targets=["fc/weight"], extra_trainable=["head/weight"],
                        layouts={"fc/weight": layouts["fc/weight"]})
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  trainable = perturb(trainable, 0, std=0.3)
  unknown = jlora.peft.Rules(kernel_leaves=("weight",), kernel_order=None)
  with pytest.raises(jlora.LoraLayoutError, match=r"'head/weight' is trained in full, and "
                                                  r"nothing says.*infer_layouts"):
    jlora.peft.save(tmp_path / "a", trainable, unknown)      # the spec knows fc, not head
  jlora.peft.save(tmp_path / "a", trainable, unknown, spec=spec, layouts=layouts)
  sd = load_file(os.path.join(tmp_path / "a", "adapter_model.safetensors"))
  # nn.Linear stores (out, in), as this model does: no transpose.
  np.testing.assert_array_equal(sd[PREFIX + "head.weight"], np.asarray(trainable["head"]["weight"]))
  with pytest.raises(jlora.LoraLayoutError, match=r"'fc/weight' \(6, 6\): cannot tell whether "
                                                  r"this square kernel.*--layout"):
    jlora.peft.load(tmp_path / "a", params, unknown)
  for rules, kw in ((unknown, dict(layouts=layouts)),
                    (jlora.peft.Rules(kernel_leaves=("weight",), kernel_order="out_in"), {})):
    ad = jlora.peft.load(tmp_path / "a", params, rules, **kw)
    assert ad.trainable["fc"]["weight"].layout == jlora.Layout((1,), (0,))
    np.testing.assert_array_equal(np.asarray(ad.trainable["head"]["weight"]),
                                  np.asarray(trainable["head"]["weight"]))
    np.testing.assert_allclose(jlora.lora(fn)(ad.frozen, ad.trainable, x),
                               jlora.lora(fn)(frozen, trainable, x), atol=1e-6)
  # The Flax convention, declared: the square kernel read (in, out) is what the
  # rules say; a non-square (out, in) one contradicts them and is refused.
  wide, fn2 = _out_in_model(d_in=6, d_out=4, head=(3, 4))
  spec2 = jlora.LoraSpec(rank=2, targets=["fc/weight"],
                         layouts={"fc/weight": jlora.Layout((1,), (0,))})
  _, t2 = jlora.lora_transform(wide, spec2, key=jax.random.key(0))
  jlora.peft.save(tmp_path / "b", t2, unknown, spec=spec2)
  flax_rules = jlora.peft.Rules(kernel_leaves=("weight",))       # kernel_order "in_out"
  with pytest.raises(jlora.LoraPeftError, match=r"fit 'fc/weight' \(4, 6\) only if it is "
                                                r"stored \(out, in\), but the rules say "
                                                r"kernel_order='in_out'"):
    jlora.peft.load(tmp_path / "b", wide, flax_rules)
  ad = jlora.peft.load(tmp_path / "b", wide, unknown)              # the shapes tell
  assert ad.trainable["fc"]["weight"].layout == jlora.Layout((1,), (0,))
