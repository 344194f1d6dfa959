"""One adapter in one directory: jlora.orbax.save / load / metadata / describe.

Round trips are checked bit for bit against the saved trees (and through
jlora.lora / jlora.merge); faults are made for real (garbled files).
"""

import gc
import glob
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
import orbax_worker as cw
from jlora.orbax import manifest
from models import NNXLM
from orbax_util import (TINY_LM, assert_trees_equal, dir_bytes, is_lp, make_lm, np_fill,
                        perturb)


@pytest.fixture(scope="module")
def lm():
  return make_lm()


@pytest.fixture(scope="module")
def saved(lm, tmp_path_factory):
  _, _, _, spec, frozen, trainable = lm
  return jlora.orbax.save(tmp_path_factory.mktemp("saved") / "adapter", trainable, spec,
                          base=frozen)


# -- save, load, metadata ---------------------------------------------------------


def test_round_trip_is_exact_and_usable(lm, saved):
  model, tokens, params, spec, frozen, trainable = lm
  loaded, loaded_spec = jlora.orbax.load(saved, base=frozen)
  assert_trees_equal(loaded, trainable)
  assert loaded_spec == spec
  lp = loaded["params"]["layers"]["out"]["kernel"]
  assert lp.layout == trainable["params"]["layers"]["out"]["kernel"].layout
  assert lp.layout.stack_axes == (0,) and lp.a.dtype == jnp.bfloat16
  apply = jax.jit(jlora.lora(model.apply))
  np.testing.assert_array_equal(apply(frozen, loaded, tokens), apply(frozen, trainable, tokens))
  merge = jax.jit(jlora.merge)
  assert_trees_equal(merge(frozen, loaded), merge(frozen, trainable))
  # The full parameters and an abstract tree are valid bases too.
  assert_trees_equal(jlora.orbax.load(saved, base=params)[0], trainable)
  abstract = jax.eval_shape(lambda: params)
  assert_trees_equal(jlora.orbax.load(saved, base=abstract)[0], trainable)


def test_metadata_is_json_with_base_fingerprint(lm, saved, tmp_path):
  _, _, params, spec, frozen, trainable = lm
  meta = jlora.orbax.metadata(saved)
  with open(saved / "adapter_meta" / "metadata") as f:
    assert json.load(f) == meta
  rows = meta["base"]["params"]
  want = [[jlora.path_str(kp), list(x.shape), x.dtype.name]
          for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]
          if jlora.path_str(kp) != "params/lm_head/bias"]       # the extra leaf is in the adapter
  assert rows == want
  assert len(meta["base"]["sha256"]) == 64
  # The fingerprint is the same whether the frozen part or the parameters are passed.
  from_params = jlora.orbax.save(tmp_path / "p", trainable, spec, base=params)
  assert jlora.orbax.metadata(from_params)["base"] == meta["base"]
  entry = next(e for e in meta["entries"] if e["path"] == "params/layers/down/kernel")
  lp = trainable["params"]["layers"]["down"]["kernel"]
  assert entry["static"]["scale"] == lp.scale == 8 / np.sqrt(2)
  assert entry["arrays"]["a"]["shape"] == [2, 64, 2] and entry["arrays"]["a"]["dtype"] == "bfloat16"


def test_nnx_state_round_trip(tmp_path):
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NNXLM(TINY_LM, rngs=nnx.Rngs(0))))
  state = np_fill(abstract)
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  layouts = jlora.infer_layouts(fn, state, jnp.zeros((2, 12), jnp.int32))
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=r"blocks/\d+/(query|value|out)/kernel|head/kernel",
                        extra_trainable=r"head/bias")
  _, trainable = jlora.lora_transform(abstract, spec, layouts=layouts)
  trainable = np_fill(trainable, seed=1)
  frozen = jlora.frozen_like(state, trainable)
  assert is_lp(trainable["blocks"][1]["value"]["kernel"].get_value())   # the nnx.Einsum kernel
  jlora.orbax.save(tmp_path / "a", trainable, spec, base=frozen)
  loaded, loaded_spec = jlora.orbax.load(tmp_path / "a", base=frozen)
  assert_trees_equal(loaded, trainable)
  assert loaded_spec == spec
  merge = jax.jit(jlora.merge)
  assert_trees_equal(merge(frozen, loaded), merge(frozen, trainable))


def test_callable_targets_are_recorded_and_replaced_by_the_saved_paths(tmp_path):
  params = cw.base_params()
  def is_big_kernel(path, leaf):
    return path.endswith("kernel") and leaf.shape[1] > 8
  spec = jlora.LoraSpec(rank=2, targets=is_big_kernel, extra_trainable=["l2/bias"])
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  jlora.orbax.save(tmp_path / "a", trainable, spec, base=frozen)
  meta = jlora.orbax.metadata(tmp_path / "a")
  assert meta["spec"]["fields"]["targets"]["name"].endswith("is_big_kernel")
  assert "spec.targets was a callable" in meta["spec"]["notes"][0]
  loaded, loaded_spec = jlora.orbax.load(tmp_path / "a", base=frozen)
  assert_trees_equal(loaded, trainable)
  assert loaded_spec.targets == "l1/kernel" and loaded_spec.extra_trainable == ("l2/bias",)
  # The substituted spec selects exactly what the callable did.
  _, again = jlora.lora_transform(params, loaded_spec, key=jax.random.key(0))
  assert_trees_equal(again, jlora.lora_transform(params, spec, key=jax.random.key(0))[1])


def test_size_on_disk_is_the_adapter_not_the_base(tmp_path):
  params = {f"layer{i}": {"kernel": jnp.ones((512, 512)), "bias": jnp.zeros(512)}
            for i in range(4)}
  spec = jlora.LoraSpec(rank=4, targets=["kernel"])
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  trainable = perturb(trainable)          # random values: nothing compresses away
  adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(trainable))
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  assert base_bytes >= 50 * adapter_bytes
  path = jlora.orbax.save(tmp_path / "a", trainable, spec, base=frozen)
  size = dir_bytes(path)
  assert jlora.orbax.metadata(path)["adapter_bytes"] == adapter_bytes
  assert size <= adapter_bytes + 24 * 1024, (size, adapter_bytes)
  assert size < base_bytes / 40


@pytest.mark.parametrize("change, message", [
    (lambda p: p["l1"].update(kernel=jnp.ones((16, 33))),
     "'l1/kernel' expected shape (16, 32) dtype float32, got shape (16, 33) dtype float32"),
    (lambda p: p["l1"].update(bias=jnp.zeros(32, jnp.bfloat16)),
     "'l1/bias' expected shape (32,) dtype float32, got shape (32,) dtype bfloat16"),
    (lambda p: p["l2"].update(bias=jnp.zeros(9)),
     "'l2/bias' expected shape (8,) dtype float32, got shape (9,) dtype float32"),
    (lambda p: p["l1"].pop("bias"), "with 'l1/bias' (shape (32,) dtype float32), which this base lacks"),
    (lambda p: p.update(l3={"kernel": jnp.ones((8, 8))}), "this base has 'l3/kernel' (shape (8, 8)"),
])
def test_loading_onto_another_base_names_the_parameter(tmp_path, change, message):
  params, frozen, trainable, _, _ = cw.problem()
  path = jlora.orbax.save(tmp_path / "a", trainable, cw.SPEC, base=frozen)
  other = jax.tree.map(lambda x: x, params)
  change(other)
  with pytest.raises(jlora.LoraCheckpointError) as err:
    jlora.orbax.load(path, base=other)
  assert message in str(err.value) and str(path) in str(err.value)


def test_bad_paths_and_inputs(tmp_path):
  params, frozen, trainable, tx, opt_state = cw.problem()
  with pytest.raises(jlora.LoraCheckpointError, match="does not exist"):
    jlora.orbax.load(tmp_path / "missing", base=frozen)
  (tmp_path / "empty").mkdir()
  with pytest.raises(jlora.LoraCheckpointError, match="is not a jlora adapter"):
    jlora.orbax.load(tmp_path / "empty", base=frozen)
  (tmp_path / "file").write_text("x")
  with pytest.raises(jlora.LoraCheckpointError, match="is a file"):
    jlora.orbax.load(tmp_path / "file", base=frozen)
  # An orbax checkpoint of something else, and a manager root, are no adapters.
  with jlora.orbax.CheckpointManager(tmp_path / "root", base=frozen) as mngr:
    mngr.save(1, trainable, opt_state)
  with pytest.raises(jlora.LoraCheckpointError, match="pass one of its steps"):
    jlora.orbax.load(tmp_path / "root", base=frozen)
  shutil.copytree(tmp_path / "root" / "1", tmp_path / "other")
  shutil.rmtree(tmp_path / "other" / "adapter_meta")
  with pytest.raises(jlora.LoraCheckpointError, match="is not a jlora adapter"):
    jlora.orbax.load(tmp_path / "other", base=frozen)
  shutil.copytree(tmp_path / "root" / "1" / "train_meta", tmp_path / "other" / "adapter_meta")
  with pytest.raises(jlora.LoraCheckpointError, match="'adapter_meta/commit_success.txt' is corrupted"):
    jlora.orbax.load(tmp_path / "other", base=frozen)     # the manifest catches the swap
  manifest.write(tmp_path / "other", "jlora.train_state")  # a consistent, wrong file
  with pytest.raises(jlora.LoraCheckpointError, match="is not jlora.adapter metadata"):
    jlora.orbax.load(tmp_path / "other", base=frozen)

  path = jlora.orbax.save(tmp_path / "a", trainable, base=frozen)
  assert jlora.orbax.load(path, base=frozen)[1] is None      # saved without a spec
  # Valid JSON that is not what this jlora wrote.
  meta_file = path / "adapter_meta" / "metadata"
  good = meta_file.read_text()
  for edit, message in ((lambda m: m.update(version=99), "version 99 is not supported"),
                        (lambda m: m.pop("entries"), "is malformed"),
                        (lambda m: m["entries"][0].update(path="l9/kernel"), "is malformed")):
    meta = json.loads(good)
    edit(meta)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(jlora.LoraCheckpointError, match="'adapter_meta/metadata' is corrupted"):
      jlora.orbax.load(path, base=frozen)               # the manifest catches the edit
    manifest.write(path, "jlora.adapter")                # as if written so (another version)
    with pytest.raises(jlora.LoraCheckpointError, match=message):
      jlora.orbax.load(path, base=frozen)
  meta_file.write_text(good)
  manifest.write(path, "jlora.adapter")
  with pytest.raises(jlora.LoraCheckpointError, match="already exists"):
    jlora.orbax.save(path, trainable, base=frozen)
  newer = perturb(trainable, seed=5)
  jlora.orbax.save(path, newer, base=frozen, overwrite=True)
  assert_trees_equal(jlora.orbax.load(path, base=frozen)[0], newer)
  assert sorted(os.listdir(tmp_path)) == ["a", "empty", "file", "other", "root"]

  with pytest.raises(jlora.LoraSpecError, match="'l1/kernel': the spec gives rank 8"):
    jlora.orbax.save(tmp_path / "b", trainable, jlora.LoraSpec(rank=8, targets=["kernel"]),
                       base=frozen)
  with pytest.raises(jlora.LoraTreeError, match="different structures"):
    jlora.orbax.save(tmp_path / "b", trainable, base={"l1": frozen["l1"]})
  with pytest.raises(jlora.LoraTreeError, match="'l1/kernel': factors"):
    jlora.orbax.save(tmp_path / "b", trainable, base={**frozen, "l1": {
        "kernel": jnp.ones((16, 16)), "bias": jnp.zeros(32)}})
  with pytest.raises(jlora.LoraCheckpointError, match="abstract or traced"):
    jlora.orbax.save(tmp_path / "b", jax.eval_shape(lambda: trainable), base=frozen)
  assert not (tmp_path / "b").exists()


def _flip_byte(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(size // 2)
    byte = f.read(1)
    f.seek(size // 2)
    f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


@pytest.fixture
def quiet_asyncio():
  """orbax leaves reads of a broken file pending when it raises; asyncio logs
  each when it is collected. Those are expected here."""
  logger = logging.getLogger("asyncio")
  disabled, logger.disabled = logger.disabled, True
  yield
  gc.collect()
  logger.disabled = disabled


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_any_damaged_file_gives_a_clear_error_or_the_exact_adapter(lm, saved, tmp_path,
                                                                   quiet_asyncio):
  """Garble or truncate each file of a checkpoint in turn: loading either
  raises LoraCheckpointError naming the checkpoint or returns the exact
  adapter (a file orbax does not need), never another error or wrong values."""
  _, _, _, _, frozen, trainable = lm
  files = sorted(os.path.relpath(f, saved) for f in glob.glob(f"{saved}/**", recursive=True)
                 if os.path.isfile(f))
  assert any(f.startswith("adapter/") for f in files) and "adapter_meta/metadata" in files
  caught = set()
  for rel in files:
    for damage in (_flip_byte, _truncate):
      copy = tmp_path / f"{damage.__name__}-{rel.replace('/', '_')}"
      shutil.copytree(saved, copy)
      damage(copy / rel)
      try:
        loaded, _ = jlora.orbax.load(copy, base=frozen)
      except jlora.LoraCheckpointError as e:
        assert f"checkpoint '{copy}'" in str(e)
        caught.add((rel, damage.__name__))
      else:
        assert_trees_equal(loaded, trainable)
  gc.collect()   # orbax's abandoned reads, while quiet_asyncio keeps them quiet
  # Damage to the metadata or to the array data that orbax reads is always caught.
  for rel in files:
    if rel == "adapter_meta/metadata" or rel.startswith("adapter/d/"):
      assert {(rel, "_flip_byte"), (rel, "_truncate")} <= caught, rel


def test_arrays_that_orbax_reads_but_are_wrong_fail_the_checksum(lm, saved, tmp_path):
  """Swap in another adapter's arrays (valid for orbax, same shapes): the
  stored checksums catch it instead of returning a silently wrong adapter."""
  _, _, _, spec, frozen, trainable = lm
  other = jlora.orbax.save(tmp_path / "other", perturb(trainable, seed=3), spec, base=frozen)
  shutil.copytree(saved, tmp_path / "mixed")
  shutil.rmtree(tmp_path / "mixed" / "adapter")
  shutil.copytree(other / "adapter", tmp_path / "mixed" / "adapter")
  with pytest.raises(jlora.LoraCheckpointError, match="is corrupted"):
    jlora.orbax.load(tmp_path / "mixed", base=frozen)   # the manifest catches the swap
  manifest.write(tmp_path / "mixed", "jlora.adapter")   # re-signed: the array checksums still do
  with pytest.raises(jlora.LoraCheckpointError, match="fails its checksum") as err:
    jlora.orbax.load(tmp_path / "mixed", base=frozen)
  assert str(tmp_path / "mixed") in str(err.value)


def test_nothing_is_unpickled(lm, saved, tmp_path, monkeypatch):
  _, _, _, _, frozen, trainable = lm
  def refuse(*args, **kwargs):
    raise AssertionError("pickle used")
  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, refuse)
  assert_trees_equal(jlora.orbax.load(saved, base=frozen)[0], trainable)
  _, frozen2, trainable2, tx, opt_state = cw.problem()
  with jlora.orbax.CheckpointManager(tmp_path, base=frozen2) as mngr:
    mngr.save(1, trainable2, opt_state)
    assert_trees_equal(mngr.restore(opt_state=opt_state).opt_state, opt_state)


# -- file safety (issue 10) --------------------------------------------------------------


def test_overwrite_replaces_only_an_adapter_jlora_wrote(tmp_path):
  """overwrite=True never deletes a user's folder, another kind of jlora folder,
  or a folder whose mark is damaged; it replaces a jlora adapter."""
  _, frozen, trainable, _, opt_state = cw.problem()
  project = tmp_path / "project"
  (project / "src").mkdir(parents=True)
  (project / "src" / "model.py").write_text("print('my code')")
  with pytest.raises(jlora.LoraCheckpointError, match="is not a jlora adapter written by jlora"):
    jlora.orbax.save(project, trainable, base=frozen, overwrite=True)
  assert (project / "src" / "model.py").read_text() == "print('my code')"
  base = jlora.base.save(tmp_path / "base", cw.base_params())
  with pytest.raises(jlora.LoraCheckpointError, match="refusing to replace it"):
    jlora.orbax.save(base, trainable, base=frozen, overwrite=True)     # a base, not an adapter
  assert jlora.base.load(base)["l1"]["kernel"].shape == (16, 32)
  with jlora.orbax.CheckpointManager(tmp_path / "ckpt", base=frozen) as mngr:
    mngr.save(1, trainable, opt_state)
  with pytest.raises(jlora.LoraCheckpointError, match="refusing to replace it"):
    jlora.orbax.save(tmp_path / "ckpt" / "1", trainable, base=frozen, overwrite=True)
  adapter = jlora.orbax.save(tmp_path / "a", trainable, cw.SPEC, base=frozen)
  newer = perturb(trainable, seed=4)
  jlora.orbax.save(adapter, newer, cw.SPEC, base=frozen, overwrite=True)
  assert_trees_equal(jlora.orbax.load(adapter, base=frozen)[0], newer)
  (adapter / "jlora_manifest.json").write_text("{}")                   # its mark is gone
  with pytest.raises(jlora.LoraCheckpointError, match="refusing to replace it"):
    jlora.orbax.save(adapter, trainable, cw.SPEC, base=frozen, overwrite=True)


def test_an_edited_byte_of_metadata_is_caught(tmp_path):
  """Issue 10 item 7: the scale lives in JSON metadata; one edited byte must not
  change it silently. The manifest's checksum catches the edit; metadata that
  is consistent JSON but contradicts the stored spec is refused too."""
  _, frozen, trainable, _, _ = cw.problem()
  path = jlora.orbax.save(tmp_path / "a", trainable, cw.SPEC, base=frozen)
  meta_file = path / "adapter_meta" / "metadata"
  text = meta_file.read_text()
  assert '"scale": 2.0' in text
  meta_file.write_text(text.replace('"scale": 2.0', '"scale": 3.0', 1))   # same length
  with pytest.raises(jlora.LoraCheckpointError, match="'adapter_meta/metadata' is corrupted"):
    jlora.orbax.load(path, base=frozen)
  manifest.write(path, "jlora.adapter")            # as if jlora had written it so
  with pytest.raises(jlora.LoraCheckpointError,
                     match=r"contradicts its own spec: 'l1/kernel': rank 4, scale 3.0"):
    jlora.orbax.load(path, base=frozen)


def test_the_stored_spec_must_select_the_saved_paths(tmp_path):
  """Issue 10 item 12: a spec whose targets (or extra_trainable) select other
  paths than the saved ones is refused, not stored."""
  _, frozen, trainable, _, _ = cw.problem()
  narrower = jlora.LoraSpec(rank=4, alpha=8, targets=["l1/kernel"], extra_trainable=r"l2/bias",
                            dropout=0.1)
  with pytest.raises(jlora.LoraSpecError, match="'l2/kernel' has LoRA factors but the spec's "
                                                "targets"):
    jlora.orbax.save(tmp_path / "a", trainable, narrower, base=frozen)
  wider = jlora.LoraSpec(rank=4, alpha=8, targets=["kernel"], extra_trainable=r".*bias",
                         dropout=0.1)
  with pytest.raises(jlora.LoraSpecError, match="extra_trainable '.*bias' selects 'l1/bias'"):
    jlora.orbax.save(tmp_path / "a", trainable, wider, base=frozen)
  assert not (tmp_path / "a").exists()


def test_bad_paths_give_one_line(tmp_path):
  _, frozen, trainable, _, _ = cw.problem()
  (tmp_path / "file").write_text("x")
  with pytest.raises(jlora.LoraCheckpointError) as err:
    jlora.orbax.save(tmp_path / "file" / "adapter", trainable, base=frozen)
  assert str(err.value) == (f"cannot write jlora adapter '{tmp_path / 'file' / 'adapter'}': "
                            f"a parent of it is a file, not a directory ('{tmp_path / 'file'}')")
  if os.geteuid() != 0:   # root is never denied
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(jlora.LoraCheckpointError, match="permission denied"):
      jlora.orbax.save(locked / "adapter", trainable, base=frozen)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] + (
      [] if os.geteuid() == 0 else ["locked"])


def test_a_caught_error_prints_nothing(tmp_path):
  """A LoraCheckpointError caught by the program leaves stderr empty: no orbax
  log records, no asyncio tracebacks, also after garbage collection."""
  code = f"""
import gc, glob, os, jlora, orbax_worker as cw
_, frozen, trainable, _, _ = cw.problem()
path = jlora.orbax.save({str(tmp_path / 'a')!r}, trainable, cw.SPEC, base=frozen)
for f in sorted(glob.glob(f"{{path}}/adapter/**", recursive=True)):
  if os.path.isfile(f):
    with open(f, "r+b") as h:
      h.truncate(os.path.getsize(f) // 2)
try:
  jlora.orbax.load(path, base=frozen)
except jlora.LoraCheckpointError as e:
  print("CAUGHT", e)
gc.collect()
"""
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        cwd=os.path.dirname(__file__))
  assert proc.stdout.startswith("CAUGHT checkpoint"), proc.stdout + proc.stderr
  assert proc.stderr == "", proc.stderr
