"""Several adapters in PEFT's multi-adapter layout, both ways, against PyTorch
PEFT's own mixed-batch inference (``adapter_names=``) on transformers' Llama."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import cli
from lazy import lazy
from test_peft_hf import _models, _needs_flax_models, _randomize  # noqa: F401  (the fixture skips)

torch = lazy("torch")
peft = lazy("peft")
transformers = lazy("transformers")

NAMES = ["__base__", "math", "code", "math"]     # PEFT's name for "no adapter" first


def _ids():
  return np.random.default_rng(3).integers(0, 32, size=(len(NAMES), 8), dtype=np.int64)


def _peft_mixed_logits(pm, ids):
  with torch.no_grad():
    return pm(torch.from_numpy(ids), adapter_names=NAMES).logits.numpy()


def _jlora_mixed_logits(fm, frozen, bank, names, ids):
  index = {name: i for i, name in enumerate(names)}
  adapter_ids = jnp.asarray([index.get(n, -1) for n in NAMES], jnp.int32)
  apply = jax.jit(jlora.lora(lambda p, x: fm(x, params=p).logits))
  return np.asarray(apply(frozen, bank, jnp.asarray(ids, jnp.int32), lora_adapter_ids=adapter_ids))


def test_peft_folder_with_two_adapters_serves_the_same_mixed_batch(tmp_path):
  m, tm, fm, params = _models("llama")
  pm = peft.get_peft_model(copy.deepcopy(tm), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="math")
  pm.add_adapter("code", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["k_proj", "up_proj"]))
  _randomize(pm, 5)
  pm.save_pretrained(tmp_path / "peft")
  assert {p.name for p in (tmp_path / "peft").iterdir() if p.is_dir()} == {"code", "math"}
  ids = _ids()
  want = _peft_mixed_logits(pm.eval(), ids)
  loaded = jlora.peft.load_bank(tmp_path / "peft", params, m["rules"]())
  assert loaded.names == ("code", "math")
  got = _jlora_mixed_logits(fm, loaded.frozen, loaded.bank, loaded.names, ids)
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert np.max(np.abs(want[1] - want[2])) > 0.05        # the adapters differ


def test_jlora_bank_loads_in_peft_and_serves_the_same_mixed_batch(tmp_path):
  m, tm, fm, params = _models("llama")
  rules = m["rules"]()
  abstract = jax.eval_shape(lambda: params)
  rng = np.random.default_rng(7)
  adapters = {}
  for name, kw in (("math", dict(rank=4, alpha=8, targets=r".*/(q_proj|v_proj)/kernel")),
                   ("code", dict(rank=2, alpha=8, targets=r".*/(k_proj|gate_proj)/kernel"))):
    _, t = jlora.lora_transform(abstract, jlora.LoraSpec(**kw))
    adapters[name] = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape),
                                                        x.dtype), t)
  bank = jlora.stack_adapters(adapters)
  configs = jlora.peft.save_bank(tmp_path / "ours", bank, rules)
  assert set(configs) == {"math", "code"} and configs["code"]["r"] == 2
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(tm), tmp_path / "ours" / "math",
                                      adapter_name="math")
  res = pm.load_adapter(tmp_path / "ours" / "code", adapter_name="code")
  assert not res.missing_keys and not res.unexpected_keys
  ids = _ids()
  want = _peft_mixed_logits(pm.eval(), ids)
  got = _jlora_mixed_logits(fm, params, bank, ("math", "code"), ids)
  np.testing.assert_allclose(got, want, atol=1e-4)
  # The folder is jlora's: inspect lists its adapters, overwrite may replace it,
  # the command line refuses it where one adapter is needed.
  assert cli.main(["inspect", str(tmp_path / "ours")]) == 0
  jlora.peft.save_bank(tmp_path / "ours", bank, rules, overwrite=True)
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("mine")
  with pytest.raises(jlora.LoraPeftError, match="not a multi-adapter PEFT folder written"):
    jlora.peft.save_bank(tmp_path / "mine", bank, rules, overwrite=True)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_inspect_lists_a_banks_adapters(tmp_path, capsys):
  params = {"fc": {"kernel": jnp.ones((8, 4))}}
  _, t = jlora.lora_transform(params, jlora.LoraSpec(rank=2, targets=["fc/kernel"]),
                              key=jax.random.key(0))
  jlora.peft.save_bank(tmp_path / "b", jlora.stack_adapters({"a": t, "b": t}),
                       jlora.peft.Rules())
  assert cli.main(["inspect", str(tmp_path / "b")]) == 0
  out = capsys.readouterr().out
  assert "PEFT folder with 2 adapters (a, b)" in out and "adapter 'a':" in out
  assert cli.main(["merge", "--base", str(tmp_path / "b"), "--adapter", str(tmp_path / "b"),
                   "--out", str(tmp_path / "m.safetensors")]) == 1
  assert "holds several PEFT adapters (a, b); pass one adapter's folder" in \
      capsys.readouterr().err


@pytest.mark.parametrize("name, why", [
    ("adapter_model.safetensors", "it is the name of a file of the folder's own adapter"),
    ("adapter_config.json", "it is the name of a file of the folder's own adapter"),
    ("a/b", "it must be one plain path component"), ("..", "it must be one plain"),
    ("", "it must be one plain path component"), (".hidden", "a hidden name"),
])
def test_save_bank_refuses_adapter_names_that_cannot_be_subfolders(tmp_path, name, why):
  params = {"fc": {"kernel": jnp.ones((8, 4))}}
  _, t = jlora.lora_transform(params, jlora.LoraSpec(rank=2, targets=["fc/kernel"]),
                              key=jax.random.key(0))
  bank = jlora.stack_adapters({"default": t, name: t})
  for overwrite in (False, True):
    with pytest.raises(jlora.LoraPeftError, match=(
        rf"^save_bank: adapter name {name!r} cannot be a subfolder's name: {why}")):
      jlora.peft.save_bank(tmp_path / "b", bank, jlora.peft.Rules(), overwrite=overwrite)
    assert not list(tmp_path.iterdir())           # nothing written, nothing staged
  jlora.peft.save_bank(tmp_path / "b", jlora.stack_adapters({"default": t, "x": t}),
                       jlora.peft.Rules())
  assert jlora.peft.load_bank(tmp_path / "b", params, jlora.peft.Rules()).names == (
      "default", "x")


def test_adapters_that_differ_only_in_dropout_load_with_one_rate_on_request(tmp_path):
  """PyTorch PEFT serves adapters with different lora_dropout in one mixed batch
  (dropout is off at inference). A bank has one rate: load_bank says so and
  names the option; with dropout= it loads and serves PEFT's logits."""
  m, tm, fm, params = _models("llama")
  pm = peft.get_peft_model(copy.deepcopy(tm), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
      adapter_name="math")
  pm.add_adapter("code", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                         lora_dropout=0.05))
  _randomize(pm, 6)
  pm.save_pretrained(tmp_path / "peft")
  rules = m["rules"]()
  with pytest.raises(jlora.LoraPeftError,
                     match=r"adapters 'code' and 'math' differ in lora_dropout \(0.05 and 0.1\).*"
                           r"dropout=") as info:
    jlora.peft.load_bank(tmp_path / "peft", params, rules)
  assert "\n" not in str(info.value)
  with pytest.raises(jlora.LoraSpecError, match=r"dropout must be a rate in \[0, 1\), got 1.5"):
    jlora.peft.load_bank(tmp_path / "peft", params, rules, dropout=1.5)
  loaded = jlora.peft.load_bank(tmp_path / "peft", params, rules, dropout=0.0)
  assert {lp.dropout for lp in jax.tree.leaves(
      loaded.bank, is_leaf=lambda x: isinstance(x, jlora.LoraBank))
      if isinstance(lp, jlora.LoraBank)} == {0.0}
  assert (loaded.specs["math"].dropout, loaded.specs["code"].dropout) == (0.1, 0.05)
  ids = _ids()
  got = _jlora_mixed_logits(fm, loaded.frozen, loaded.bank, loaded.names, ids)
  np.testing.assert_allclose(got, _peft_mixed_logits(pm.eval(), ids), atol=1e-4)
