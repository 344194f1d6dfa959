"""0.1's names still work until 0.3: each warns, naming its new place, and
0.1-style calls give what the 0.2 API gives (jlora/_deprecated.py)."""

import os
import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import jlora
from jlora import _deprecated

# jlora.__all__ at the last 0.1 commit (e842fc1, before the formats moved into
# namespaces), copied from `git show e842fc1:jlora/__init__.py`.
ALL_0_1 = [
    "CheckpointManager", "Layout", "LoraCheckpointError", "LoraError", "LoraFileError",
    "LoraLayoutError", "LoraMaterializeWarning", "LoraParam", "LoraPeftError", "LoraSpec",
    "LoraSpecError", "LoraSummary", "LoraTreeError", "PeftAdapter", "PeftRules",
    "adapter_metadata", "frozen_like", "infer_layouts", "load_adapter", "load_params",
    "load_peft", "lora", "lora_transform", "merge", "optimizer", "path_str", "save_adapter",
    "save_params", "save_peft", "summary", "unmerge"]
# The public names of 0.1's jlora/peft.py module.
PEFT_0_1 = ["CONFIG_NAME", "WEIGHTS_NAME", "KEY_PREFIX", "DEFAULT_LEAF_NAMES", "PeftRules",
            "RulesLike", "save_peft", "PeftAdapter", "load_peft"]

NAMESPACES = [(jlora, _deprecated.TOP_LEVEL), (jlora.peft, _deprecated.PEFT)]
OLD_NAMES = [(module.__name__, name) for module, table in NAMESPACES for name in table]
quiet_01 = pytest.mark.filterwarnings(r"ignore:jlora\..* is deprecated since 0\.2:DeprecationWarning")


def _new(dotted):
  module, _, attr = dotted.rpartition(".")
  obj = jlora
  for part in module.split(".")[1:]:
    obj = getattr(obj, part)
  return getattr(obj, attr)


# -- the names ----------------------------------------------------------------------


def test_every_0_1_name_is_still_there_or_forwarded():
  for name in ALL_0_1:
    assert name in jlora.__all__ or name in _deprecated.TOP_LEVEL, name
  for name in PEFT_0_1:
    assert name in _deprecated.PEFT, name
  # and the forwards are exactly the removed names (no forward shadows a live one)
  assert set(_deprecated.TOP_LEVEL) == set(ALL_0_1) - set(jlora.__all__)


def test_the_changelog_migration_table_lists_every_forward():
  changelog = pathlib.Path(__file__).resolve().parent.parent.joinpath("CHANGELOG.md").read_text()
  table = changelog[changelog.index("### Migrating from 0.1 to 0.2"):]
  rows = [line for line in table.splitlines() if line.startswith("| `")]
  for module_name, name in OLD_NAMES:
    moved = (_deprecated.TOP_LEVEL if module_name == "jlora" else _deprecated.PEFT)[name]
    assert any(f"`{module_name}.{name}`" in row.split("|")[1] and f"`{moved.new}`" in row
               for row in rows), f"{module_name}.{name}"


@pytest.mark.parametrize("module_name, name", OLD_NAMES)
def test_old_name_warns_naming_its_new_place(module_name, name):
  module = jlora if module_name == "jlora" else jlora.peft
  moved = (_deprecated.TOP_LEVEL if module is jlora else _deprecated.PEFT)[name]
  message = (f"{module_name}.{name} is deprecated since 0.2 and will be removed in 0.3: "
             f"use {moved.new}")
  with pytest.warns(DeprecationWarning, match=re.escape(message)) as record:
    got = getattr(module, name)
  # the warning points at the line that used the name, not at jlora
  assert record[0].filename == __file__
  new = _new(moved.new)
  if moved.adapter is None:
    assert got is new
  elif isinstance(new, type):
    assert issubclass(got, new)
  else:
    assert callable(got) and got is not new
  # `from jlora import <old>` warns too
  with pytest.warns(DeprecationWarning, match=re.escape(message)):
    exec(f"from {module_name} import {name}", {})


@pytest.mark.parametrize("module", [jlora, jlora.peft], ids=["jlora", "jlora.peft"])
def test_old_names_are_not_first_class(module):
  table = _deprecated.TOP_LEVEL if module is jlora else _deprecated.PEFT
  for name in table:
    assert name not in module.__all__ and name not in dir(module) and name not in vars(module)
  with warnings.catch_warnings():
    warnings.simplefilter("error")   # star-imports and dir() touch no deprecated name
    namespace = {}
    exec(f"from {module.__name__} import *", namespace)
    assert not set(table) & set(namespace)


@pytest.mark.parametrize("module", [jlora, jlora.peft], ids=["jlora", "jlora.peft"])
def test_unknown_attribute_is_the_usual_error(module):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with pytest.raises(AttributeError) as e:
      module.save_adaptor   # noqa: B018
    assert str(e.value) == f"module '{module.__name__}' has no attribute 'save_adaptor'"
    assert e.value.name == "save_adaptor" and e.value.obj is module
    assert not hasattr(module, "load_peft_folder")
    with pytest.raises(ImportError, match="cannot import name 'nothing_here'"):
      exec(f"from {module.__name__} import nothing_here", {})


def test_peft_rules_keeps_0_1_fields_and_gpt2():
  with pytest.warns(DeprecationWarning):
    PeftRules = jlora.PeftRules
  name = lambda path: "m." + path.split("/")[-2]
  # 0.1's positional order: patterns, fan_in_fan_out, leaf_names, kernel_leaves, function
  rules = PeftRules((("{module}", "{module}"),), True, {"kernel": "weight"}, ("kernel", "w"),
                    name)
  assert isinstance(rules, jlora.peft.Rules)
  assert (rules.fan_in_fan_out, rules.kernel_leaves, rules.function, rules.kernel_order) == (
      True, ("kernel", "w"), name, "in_out")
  assert rules("a/fc/kernel") == "m.fc"
  old, new = PeftRules.gpt2(), jlora.peft.Rules.gpt2()
  assert old.fan_in_fan_out == new.fan_in_fan_out
  assert old("transformer/h/0/attn/c_attn/kernel") == new("transformer/h/0/attn/c_attn/kernel")
  assert (old.kernel_order, new.kernel_order) == ("in_out", "out_in")
  assert PeftRules.generic().kernel_order == PeftRules.scanned().kernel_order == "in_out"


# -- 0.1-style code, end to end -------------------------------------------------------

D_IN, D_HID, D_OUT = 8, 12, 6


def apply(params, x):
  p = params["params"]
  h = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  return h @ p["fc2"]["kernel"]


@pytest.fixture(scope="module")
def model():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(0.3 * rng.standard_normal(s), jnp.float32)
  params = {"params": {"fc1": {"kernel": f(D_IN, D_HID), "bias": f(D_HID)},
                       "fc2": {"kernel": f(D_HID, D_OUT)}}}
  spec = jlora.LoraSpec(rank=2, alpha=4, targets=r".*kernel")
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  # trained: B off zero, so a mix-up of A and B or of the scale would show
  trainable = jax.tree.map(lambda t: t + f(*t.shape), trainable)
  x = f(4, D_IN)
  return params, spec, frozen, trainable, x


def _assert_trees_equal(got, want):
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and np.array_equal(np.asarray(g), np.asarray(w))


@quiet_01
def test_0_1_adapter_files(model, tmp_path):
  params, spec, frozen, trainable, x = model
  # 0.1's README, as written then
  old_dir = jlora.save_adapter(os.path.join(tmp_path, "adapter"), trainable, spec, base=frozen)
  restored, spec2 = jlora.load_adapter(os.path.join(tmp_path, "adapter"), base=frozen)
  # 0.2
  new_dir = jlora.orbax.save(tmp_path / "new", trainable, spec, base=frozen)
  want, want_spec = jlora.orbax.load(new_dir, base=frozen)
  assert spec2 == want_spec == spec
  _assert_trees_equal(restored, want)
  assert jlora.adapter_metadata(old_dir) == jlora.orbax.metadata(new_dir)
  np.testing.assert_array_equal(jlora.lora(apply)(frozen, restored, x),
                                jlora.lora(apply)(frozen, want, x))


@quiet_01
def test_0_1_checkpoint_manager(model, tmp_path):
  params, spec, frozen, trainable, x = model
  tx = jlora.optimizer(optax.adam(1e-2), trainable)
  opt_state = tx.init(trainable)
  grads = jax.grad(lambda t: jnp.sum(jlora.lora(apply)(frozen, t, x) ** 2))(trainable)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  got = {}
  for name, manager in (("old", jlora.CheckpointManager), ("new", jlora.orbax.CheckpointManager)):
    with manager(tmp_path / name, base=frozen, spec=spec, max_to_keep=2) as mngr:
      assert mngr.save(1, trainable, opt_state, extra={"seen": 4})
      got[name] = mngr.restore(opt_state=tx.init(trainable))
  assert got["old"].step == got["new"].step == 1
  assert got["old"].extra == got["new"].extra == {"seen": 4}
  _assert_trees_equal(got["old"].trainable, got["new"].trainable)
  _assert_trees_equal(got["old"].opt_state, got["new"].opt_state)
  _assert_trees_equal(got["new"].opt_state, opt_state)
  # a step directory of the 0.1 manager is an adapter for 0.1's load_adapter
  with jlora.CheckpointManager(tmp_path / "old", base=frozen) as mngr:
    step, _ = jlora.load_adapter(mngr.step_path(1), base=frozen)
  _assert_trees_equal(step, trainable)


@quiet_01
def test_0_1_peft_folders(model, tmp_path):
  params, spec, frozen, trainable, x = model
  folder = os.path.join(tmp_path, "peft")
  config = jlora.save_peft(folder, trainable, jlora.PeftRules.generic(), spec=spec)
  adapter = jlora.load_peft(folder, params, jlora.PeftRules.generic())
  new_config = jlora.peft.save(tmp_path / "new", trainable, jlora.peft.Rules.generic(), spec=spec)
  want = jlora.peft.load(tmp_path / "new", params, jlora.peft.Rules.generic())
  assert config == new_config and adapter.config == want.config
  assert isinstance(adapter, jlora.PeftAdapter) and adapter.spec == want.spec
  _assert_trees_equal(adapter.trainable, want.trainable)
  _assert_trees_equal(adapter.frozen, want.frozen)
  old_t, new_t = (load_file(os.path.join(d, "adapter_model.safetensors"))
                  for d in (folder, tmp_path / "new"))
  assert sorted(old_t) == sorted(new_t)
  for k in old_t:
    np.testing.assert_array_equal(old_t[k], new_t[k])
  np.testing.assert_array_equal(jlora.lora(apply)(adapter.frozen, adapter.trainable, x),
                                jlora.lora(apply)(frozen, trainable, x))
  # 0.1 replaced the folder's files when saving again; 0.2's save refuses
  # without overwrite, the 0.1 name keeps 0.1's behaviour
  trained_more = jax.tree.map(lambda t: 2 * t, trainable)
  with pytest.raises(jlora.LoraPeftError, match="overwrite"):
    jlora.peft.save(folder, trained_more, jlora.peft.Rules.generic(), spec=spec)
  jlora.save_peft(folder, trained_more, jlora.PeftRules.generic(), spec=spec)
  again = jlora.load_peft(folder, params, jlora.PeftRules.generic())
  _assert_trees_equal(again.trainable,
                      jlora.peft.load(folder, params, jlora.peft.Rules.generic()).trainable)
  np.testing.assert_allclose(np.asarray(again.trainable["params"]["fc1"]["kernel"].b),
                             2 * np.asarray(trainable["params"]["fc1"]["kernel"].b))


@quiet_01
def test_0_1_gpt2_rules_read_in_out_kernels(tmp_path):
  # A GPT-2-named Flax port with (in, out) kernels, as 0.1's PeftRules.gpt2() assumed.
  rng = np.random.default_rng(1)
  params = {"transformer": {"h": {"0": {"attn": {"c_attn": {
      "kernel": jnp.asarray(rng.standard_normal((8, 24)), jnp.float32)}}}}}}
  spec = jlora.LoraSpec(rank=2, alpha=4, targets=r".*c_attn/kernel")
  _, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  trainable = jax.tree.map(lambda t: t + 0.1, trainable)
  jlora.save_peft(tmp_path / "p", trainable, jlora.PeftRules.gpt2(), spec=spec)
  back = jlora.load_peft(tmp_path / "p", params, jlora.PeftRules.gpt2())
  _assert_trees_equal(back.trainable, trainable)
  # 0.2's Rules.gpt2() reads transformers' (out, in) kernels and refuses these
  with pytest.raises(jlora.LoraPeftError, match="kernel_order"):
    jlora.peft.load(tmp_path / "p", params, jlora.peft.Rules.gpt2())


@quiet_01
@pytest.mark.parametrize("name", ["base.safetensors", "base"])
def test_0_1_params_files(model, tmp_path, name):
  params = model[0]
  old = jlora.save_params(os.path.join(tmp_path, "old", name), params)
  new = jlora.base.save(tmp_path / "new" / name, params)
  _assert_trees_equal(jlora.load_params(old, like=params), jlora.base.load(new, like=params))
  _assert_trees_equal(jlora.load_params(old), jlora.base.load(new))
  _assert_trees_equal(jlora.load_params(old, params), params)
  if name.endswith(".safetensors"):
    old_t, new_t = load_file(old), load_file(new)
    assert sorted(old_t) == sorted(new_t)
    for k in old_t:
      np.testing.assert_array_equal(old_t[k], new_t[k])
