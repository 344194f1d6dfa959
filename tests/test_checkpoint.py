"""Adapters as files: save_adapter/load_adapter and CheckpointManager.

Round trips are checked bit for bit against the saved trees (and through
jlora.lora / jlora.merge); resume is checked against an uninterrupted run;
faults are made for real (a killed process, garbled files).
"""

import dataclasses
import gc
import glob
import json
import logging
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import checkpoint_worker as cw
import jlora
from models import LinenLM, LMConfig, NNXLM

WORKER = pathlib.Path(__file__).with_name("checkpoint_worker.py")
TINY_LM = LMConfig(vocab=64, d_model=32, heads=4, layers=2, mlp=64, seq=16)
LM_TARGETS = r"params/layers/(query|value|out|down)/kernel|params/lm_head/kernel"


def _is_lp(x):
  return isinstance(x, jlora.LoraParam)


# Values are made with NumPy: eager jax.random would compile once per shape.


def np_fill(tree, seed=0, scale=0.1):
  """Random arrays with the shapes and dtypes of ``tree``'s leaves (abstract or not)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray((scale * rng.standard_normal(x.shape)).astype(x.dtype)), tree)


def perturb(tree, seed=0):
  """Every trainable leaf moved off its value (B nonzero)."""
  noise = np_fill(tree, seed)
  return jax.tree.map(lambda x, n: jnp.asarray(np.asarray(x) + np.asarray(n)), tree, noise)


def assert_trees_equal(got, want):
  """Same treedef (LoraParam's scale/layout/dropout included) and bitwise-equal leaves."""
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    assert np.array_equal(np.asarray(g), np.asarray(w))


def dir_bytes(path):
  return sum(os.path.getsize(f) for f in glob.glob(f"{path}/**", recursive=True)
             if os.path.isfile(f))


def worker_cmd(*args):
  return [sys.executable, str(WORKER), *map(str, args)]


def worker_env(**extra):
  return {**os.environ, "JAX_PLATFORMS": "cpu", **extra}


def run_worker(*args, **env):
  proc = subprocess.run(worker_cmd(*args), env=worker_env(**env), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  return proc.stdout


@pytest.fixture(scope="module")
def lm():
  """A scanned Linen LM (stacked DenseGeneral kernels) with a trained-looking adapter."""
  model = LinenLM(TINY_LM)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, TINY_LM.vocab, (2, 12)), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
  params = np_fill(abstract)
  layouts = jlora.infer_layouts(model.apply, params, tokens)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=LM_TARGETS, rank_pattern={"down/kernel": 2},
                        alpha_pattern={"lm_head/kernel": 3.0}, use_rslora=True, init="gaussian",
                        dropout=0.1, dtype=jnp.bfloat16, extra_trainable=r"params/lm_head/bias")
  # lora_transform on the abstract tree gives the LoRA metadata; the values come from NumPy.
  _, trainable = jlora.lora_transform(abstract, spec, layouts=layouts)
  trainable = np_fill(trainable, seed=2)
  return model, tokens, params, spec, jlora.frozen_like(params, trainable), trainable


@pytest.fixture(scope="module")
def saved(lm, tmp_path_factory):
  _, _, _, spec, frozen, trainable = lm
  return jlora.save_adapter(tmp_path_factory.mktemp("saved") / "adapter", trainable, spec,
                            base=frozen)


# -- save_adapter / load_adapter ----------------------------------------------------


def test_round_trip_is_exact_and_usable(lm, saved):
  model, tokens, params, spec, frozen, trainable = lm
  loaded, loaded_spec = jlora.load_adapter(saved, base=frozen)
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
  assert_trees_equal(jlora.load_adapter(saved, base=params)[0], trainable)
  abstract = jax.eval_shape(lambda: params)
  assert_trees_equal(jlora.load_adapter(saved, base=abstract)[0], trainable)


def test_metadata_is_json_with_base_fingerprint(lm, saved, tmp_path):
  _, _, params, spec, frozen, trainable = lm
  meta = jlora.adapter_metadata(saved)
  with open(saved / "adapter_meta" / "metadata") as f:
    assert json.load(f) == meta
  rows = meta["base"]["params"]
  want = [[jlora.path_str(kp), list(x.shape), x.dtype.name]
          for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]
          if jlora.path_str(kp) != "params/lm_head/bias"]       # the extra leaf is in the adapter
  assert rows == want
  assert len(meta["base"]["sha256"]) == 64
  # The fingerprint is the same whether the frozen part or the parameters are passed.
  from_params = jlora.save_adapter(tmp_path / "p", trainable, spec, base=params)
  assert jlora.adapter_metadata(from_params)["base"] == meta["base"]
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
  assert _is_lp(trainable["blocks"][1]["value"]["kernel"].get_value())   # the nnx.Einsum kernel
  jlora.save_adapter(tmp_path / "a", trainable, spec, base=frozen)
  loaded, loaded_spec = jlora.load_adapter(tmp_path / "a", base=frozen)
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
  jlora.save_adapter(tmp_path / "a", trainable, spec, base=frozen)
  meta = jlora.adapter_metadata(tmp_path / "a")
  assert meta["spec"]["fields"]["targets"]["name"].endswith("is_big_kernel")
  assert "spec.targets was a callable" in meta["spec"]["notes"][0]
  loaded, loaded_spec = jlora.load_adapter(tmp_path / "a", base=frozen)
  assert_trees_equal(loaded, trainable)
  assert loaded_spec.targets == "l1/kernel" and loaded_spec.extra_trainable == ["l2/bias"]
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
  path = jlora.save_adapter(tmp_path / "a", trainable, spec, base=frozen)
  size = dir_bytes(path)
  assert jlora.adapter_metadata(path)["adapter_bytes"] == adapter_bytes
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
  path = jlora.save_adapter(tmp_path / "a", trainable, cw.SPEC, base=frozen)
  other = jax.tree.map(lambda x: x, params)
  change(other)
  with pytest.raises(jlora.LoraCheckpointError) as err:
    jlora.load_adapter(path, base=other)
  assert message in str(err.value) and str(path) in str(err.value)


def test_bad_paths_and_inputs(tmp_path):
  params, frozen, trainable, tx, opt_state = cw.problem()
  with pytest.raises(jlora.LoraCheckpointError, match="does not exist"):
    jlora.load_adapter(tmp_path / "missing", base=frozen)
  (tmp_path / "empty").mkdir()
  with pytest.raises(jlora.LoraCheckpointError, match="is not a jlora adapter"):
    jlora.load_adapter(tmp_path / "empty", base=frozen)
  (tmp_path / "file").write_text("x")
  with pytest.raises(jlora.LoraCheckpointError, match="is a file"):
    jlora.load_adapter(tmp_path / "file", base=frozen)
  # An orbax checkpoint of something else, and a manager root, are no adapters.
  with jlora.CheckpointManager(tmp_path / "root", base=frozen) as mngr:
    mngr.save(1, trainable, opt_state)
  with pytest.raises(jlora.LoraCheckpointError, match="pass one of its steps"):
    jlora.load_adapter(tmp_path / "root", base=frozen)
  shutil.copytree(tmp_path / "root" / "1", tmp_path / "other")
  shutil.rmtree(tmp_path / "other" / "adapter_meta")
  with pytest.raises(jlora.LoraCheckpointError, match="is not a jlora adapter"):
    jlora.load_adapter(tmp_path / "other", base=frozen)
  shutil.copytree(tmp_path / "root" / "1" / "train_meta", tmp_path / "other" / "adapter_meta")
  with pytest.raises(jlora.LoraCheckpointError, match="is not jlora.adapter metadata"):
    jlora.load_adapter(tmp_path / "other", base=frozen)

  path = jlora.save_adapter(tmp_path / "a", trainable, base=frozen)
  assert jlora.load_adapter(path, base=frozen)[1] is None      # saved without a spec
  # Valid JSON that is not what this jlora wrote.
  meta_file = path / "adapter_meta" / "metadata"
  good = meta_file.read_text()
  for edit, message in ((lambda m: m.update(version=99), "version 99 is not supported"),
                        (lambda m: m.pop("entries"), "is malformed"),
                        (lambda m: m["entries"][0].update(path="l9/kernel"), "is malformed")):
    meta = json.loads(good)
    edit(meta)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(jlora.LoraCheckpointError, match=message):
      jlora.load_adapter(path, base=frozen)
  meta_file.write_text(good)
  with pytest.raises(jlora.LoraCheckpointError, match="already exists"):
    jlora.save_adapter(path, trainable, base=frozen)
  newer = perturb(trainable, seed=5)
  jlora.save_adapter(path, newer, base=frozen, overwrite=True)
  assert_trees_equal(jlora.load_adapter(path, base=frozen)[0], newer)
  assert sorted(os.listdir(tmp_path)) == ["a", "empty", "file", "other", "root"]

  with pytest.raises(jlora.LoraSpecError, match="'l1/kernel': the spec gives rank 8"):
    jlora.save_adapter(tmp_path / "b", trainable, jlora.LoraSpec(rank=8, targets=["kernel"]),
                       base=frozen)
  with pytest.raises(jlora.LoraTreeError, match="different structures"):
    jlora.save_adapter(tmp_path / "b", trainable, base={"l1": frozen["l1"]})
  with pytest.raises(jlora.LoraTreeError, match="'l1/kernel': factors"):
    jlora.save_adapter(tmp_path / "b", trainable, base={**frozen, "l1": {
        "kernel": jnp.ones((16, 16)), "bias": jnp.zeros(32)}})
  with pytest.raises(jlora.LoraCheckpointError, match="abstract or traced"):
    jlora.save_adapter(tmp_path / "b", jax.eval_shape(lambda: trainable), base=frozen)
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
        loaded, _ = jlora.load_adapter(copy, base=frozen)
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
  other = jlora.save_adapter(tmp_path / "other", perturb(trainable, seed=3), spec, base=frozen)
  shutil.copytree(saved, tmp_path / "mixed")
  shutil.rmtree(tmp_path / "mixed" / "adapter")
  shutil.copytree(other / "adapter", tmp_path / "mixed" / "adapter")
  with pytest.raises(jlora.LoraCheckpointError, match="fails its checksum") as err:
    jlora.load_adapter(tmp_path / "mixed", base=frozen)
  assert str(tmp_path / "mixed") in str(err.value)


def test_nothing_is_unpickled(lm, saved, tmp_path, monkeypatch):
  _, _, _, _, frozen, trainable = lm
  def refuse(*args, **kwargs):
    raise AssertionError("pickle used")
  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, refuse)
  assert_trees_equal(jlora.load_adapter(saved, base=frozen)[0], trainable)
  _, frozen2, trainable2, tx, opt_state = cw.problem()
  with jlora.CheckpointManager(tmp_path, base=frozen2) as mngr:
    mngr.save(1, trainable2, opt_state)
    assert_trees_equal(mngr.restore(opt_state=opt_state).opt_state, opt_state)


# -- CheckpointManager ----------------------------------------------------------------


def test_manager_keeps_last_n_and_restores_any_step(tmp_path):
  _, frozen, trainable, tx, opt_state = cw.problem()
  step_fn = cw.make_step(frozen, tx)
  states = {}
  with jlora.CheckpointManager(tmp_path, base=frozen, spec=cw.SPEC, max_to_keep=2,
                               save_interval_steps=2) as mngr:
    for step in range(1, 8):
      trainable, opt_state = cw.train(step_fn, trainable, opt_state, step - 1, step)
      states[step] = (trainable, opt_state)
      assert mngr.save(step, trainable, opt_state, extra={"epoch": step // 3}) == (step % 2 == 0)
    mngr.wait_until_finished()
    assert mngr.all_steps() == [4, 6] and mngr.latest_step() == 6
    assert sorted(os.listdir(tmp_path)) == ["4", "6"]
    assert mngr.save(7, *states[7], extra={"epoch": 2}, force=True)
    with pytest.raises(jlora.LoraCheckpointError, match="step 7 already exists"):
      mngr.save(7, *states[7], force=True)
  with jlora.CheckpointManager(tmp_path, base=frozen) as mngr:   # a fresh manager reads the dir
    assert mngr.all_steps() == [6, 7]
    latest = mngr.restore(opt_state=opt_state)
    assert latest.step == 7 and latest.extra == {"epoch": 2}
    assert_trees_equal((latest.trainable, latest.opt_state), states[7])
    six = mngr.restore(6, opt_state=opt_state)
    assert_trees_equal((six.trainable, six.opt_state), states[6])
    assert jlora.load_adapter(mngr.step_path(6), base=frozen)[1] == cw.SPEC
    with pytest.raises(jlora.LoraCheckpointError, match=r"no checkpoint for step 4 .*\[6, 7\]"):
      mngr.restore(4, opt_state=opt_state)
    wrong_tx = jlora.optimizer(optax.sgd(0.1, momentum=0.9), trainable)
    with pytest.raises(jlora.LoraCheckpointError, match="optimizer state mismatch"):
      mngr.restore(opt_state=wrong_tx.init(trainable))
  with jlora.CheckpointManager(tmp_path / "empty", base=frozen) as mngr:
    with pytest.raises(jlora.LoraCheckpointError, match="no complete checkpoint"):
      mngr.restore(opt_state=opt_state)
  with pytest.raises(jlora.LoraCheckpointError, match="max_to_keep"):
    jlora.CheckpointManager(tmp_path, base=frozen, max_to_keep=0)


def test_manager_with_stateless_optimizer_and_base_check(tmp_path):
  params, frozen, trainable, _, _ = cw.problem()
  tx = jlora.optimizer(optax.sgd(0.1), trainable)
  opt_state = tx.init(trainable)
  assert jax.tree.leaves(opt_state) == []
  with jlora.CheckpointManager(tmp_path, base=frozen, async_save=False) as mngr:
    mngr.save(1, perturb(trainable), opt_state)
    got = mngr.restore(opt_state=opt_state)
    assert_trees_equal(got.trainable, perturb(trainable))
    assert jax.tree_util.tree_structure(got.opt_state) == jax.tree_util.tree_structure(opt_state)
    # A trainable template must describe the same adapter (here: another alpha).
    spec16 = dataclasses.replace(cw.SPEC, alpha=16)
    _, other_template = jlora.lora_transform(jax.eval_shape(lambda: params), spec16)
    with pytest.raises(jlora.LoraTreeError, match="scale/layout/dropout"):
      mngr.restore(opt_state=opt_state, trainable=other_template)
  other = jax.tree.map(lambda x: x, frozen)
  other["l2"]["kernel"] = jnp.ones((32, 8), jnp.bfloat16)
  with jlora.CheckpointManager(tmp_path, base=other) as mngr:
    with pytest.raises(jlora.LoraCheckpointError, match="'l2/kernel' expected shape"):
      mngr.restore(opt_state=opt_state)


def test_resume_in_a_new_process_is_bit_exact(tmp_path):
  _, frozen, trainable0, tx, opt_state0 = cw.problem()
  step_fn = cw.make_step(frozen, tx)
  straight = cw.train(step_fn, trainable0, opt_state0, 0, 10)
  half = cw.train(step_fn, trainable0, opt_state0, 0, 5)
  with jlora.CheckpointManager(tmp_path, base=frozen, spec=cw.SPEC) as mngr:
    mngr.save(5, *half)
  assert "RESUMED" in run_worker("resume", tmp_path)   # restores 5, trains 5 more, saves 10
  with jlora.CheckpointManager(tmp_path, base=frozen) as mngr:
    resumed = mngr.restore(10, opt_state=opt_state0)
  assert resumed.step == 10
  assert_trees_equal((resumed.trainable, resumed.opt_state), straight)
  assert not np.array_equal(straight[0]["l1"]["kernel"].b, half[0]["l1"]["kernel"].b)


def test_restore_onto_other_shardings_with_8_devices(tmp_path):
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert "MESH8 OK" in run_worker("mesh8", tmp_path, **env)
  # The same checkpoint, written from 8 devices, restores here on one.
  _, frozen, trainable, tx, opt_state = cw.problem()
  with jlora.CheckpointManager(tmp_path, base=frozen) as mngr:
    got = mngr.restore(3, opt_state=jlora.optimizer(optax.adam(1e-2), trainable).init(trainable))
  assert_trees_equal(got.trainable, cw.shifted(trainable, 0.5))
  assert all(len(x.devices()) == 1 for x in jax.tree.leaves((got.trainable, got.opt_state)))


class Worker:
  """A worker process the test kills; its output is read by a thread so that
  waiting on it never blocks past the timeout."""

  def __init__(self, tmp_path, *args):
    self.log = tmp_path / f"{args[0]}.log"
    with open(self.log, "w") as log:
      self.proc = subprocess.Popen(worker_cmd(*args), env=worker_env(), stdout=subprocess.PIPE,
                                   stderr=log, text=True)
    self.lines = []
    threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

  def wait_for(self, predicate, what, timeout=120):
    start = time.time()
    while not predicate():
      if self.proc.poll() is not None or time.time() - start > timeout:
        self.kill()
        pytest.fail(f"worker {'exited' if self.proc.returncode else 'timed out'} before "
                    f"{what}: {self.lines} {self.log.read_text()[-3000:]}")
      time.sleep(0.002)

  def printed(self, prefix):
    return any(line.startswith(prefix) for line in self.lines)

  def kill(self):
    if self.proc.poll() is None:
      os.kill(self.proc.pid, signal.SIGKILL)
    self.proc.wait()


def test_killed_between_write_and_finalize_keeps_the_last_checkpoint(tmp_path):
  ckpt, adapter = tmp_path / "ckpt", tmp_path / "adapter"
  workers = [Worker(tmp_path, "hang_manager", ckpt), Worker(tmp_path, "hang_adapter", adapter)]
  try:
    for w in workers:
      w.wait_for(lambda: w.printed("FINALIZE"), "the save reached finalize")
  finally:
    for w in workers:
      w.kill()
  assert (ckpt / "2.orbax-checkpoint-tmp" / "opt_state").is_dir()   # written, not finalized
  _, frozen, trainable, tx, opt_state = cw.problem()
  step1 = cw.shifted(trainable, 1.0)
  assert_trees_equal(jlora.load_adapter(adapter, base=frozen)[0], step1)   # old adapter intact
  with jlora.CheckpointManager(ckpt, base=frozen) as mngr:
    assert mngr.all_steps() == [1]
    got = mngr.restore(opt_state=opt_state)
    assert got.step == 1
    assert_trees_equal((got.trainable, got.opt_state), (step1, opt_state))
    assert mngr.save(2, trainable, opt_state)       # the step can be written again
  jlora.save_adapter(adapter, trainable, base=frozen, overwrite=True)   # cleans the leftovers
  assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".log") == ["adapter", "ckpt"]


def test_killed_mid_write_keeps_the_last_checkpoint(tmp_path):
  ckpt = tmp_path / "ckpt"
  worker = Worker(tmp_path, "big_save", ckpt)
  tmp = ckpt / "2.orbax-checkpoint-tmp"
  try:
    worker.wait_for(lambda: worker.printed("SAVED 1"), "step 1")
    worker.wait_for(lambda: tmp.is_dir() and dir_bytes(tmp) > (1 << 20), "step 2's writing")
  finally:
    worker.kill()
  assert not (ckpt / "2").exists() and dir_bytes(tmp) < 64 << 20   # killed part-way
  _, frozen, trainable, tx, opt_state = cw.problem()
  with jlora.CheckpointManager(ckpt, base=frozen) as mngr:
    assert mngr.all_steps() == [1]
    got = mngr.restore(opt_state=opt_state)
    assert_trees_equal((got.trainable, got.opt_state), (cw.shifted(trainable, 1.0), opt_state))
    assert mngr.save(2, trainable, opt_state)
  assert not tmp.exists()            # the manager cleaned up the interrupted save
  assert sorted(os.listdir(ckpt)) == ["1", "2"]
