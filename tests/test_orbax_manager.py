"""Training checkpoints: jlora.orbax.CheckpointManager.

Resume is checked against an uninterrupted run; faults are made for real (a
killed process).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
import orbax_worker as cw
from orbax_util import Worker, assert_trees_equal, dir_bytes, perturb, run_worker


# -- CheckpointManager ----------------------------------------------------------------


def test_manager_keeps_last_n_and_restores_any_step(tmp_path):
  _, frozen, trainable, tx, opt_state = cw.problem()
  step_fn = cw.make_step(frozen, tx)
  states = {}
  with jlora.orbax.CheckpointManager(tmp_path, base=frozen, spec=cw.SPEC, max_to_keep=2,
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
  with jlora.orbax.CheckpointManager(tmp_path, base=frozen) as mngr:   # a fresh manager reads the dir
    assert mngr.all_steps() == [6, 7]
    latest = mngr.restore(opt_state=opt_state)
    assert latest.step == 7 and latest.extra == {"epoch": 2}
    assert_trees_equal((latest.trainable, latest.opt_state), states[7])
    six = mngr.restore(6, opt_state=opt_state)
    assert_trees_equal((six.trainable, six.opt_state), states[6])
    assert jlora.orbax.load(mngr.step_path(6), base=frozen)[1] == cw.SPEC
    with pytest.raises(jlora.LoraCheckpointError, match=r"no checkpoint for step 4 .*\[6, 7\]"):
      mngr.restore(4, opt_state=opt_state)
    wrong_tx = jlora.optimizer(optax.sgd(0.1, momentum=0.9), trainable)
    with pytest.raises(jlora.LoraCheckpointError, match="optimizer state mismatch"):
      mngr.restore(opt_state=wrong_tx.init(trainable))
  with jlora.orbax.CheckpointManager(tmp_path / "empty", base=frozen) as mngr:
    with pytest.raises(jlora.LoraCheckpointError, match="no complete checkpoint"):
      mngr.restore(opt_state=opt_state)
  with pytest.raises(jlora.LoraCheckpointError, match="max_to_keep"):
    jlora.orbax.CheckpointManager(tmp_path, base=frozen, max_to_keep=0)


def test_manager_with_stateless_optimizer_and_base_check(tmp_path):
  params, frozen, trainable, _, _ = cw.problem()
  tx = jlora.optimizer(optax.sgd(0.1), trainable)
  opt_state = tx.init(trainable)
  assert jax.tree.leaves(opt_state) == []
  with jlora.orbax.CheckpointManager(tmp_path, base=frozen, async_save=False) as mngr:
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
  with jlora.orbax.CheckpointManager(tmp_path, base=other) as mngr:
    with pytest.raises(jlora.LoraCheckpointError, match="'l2/kernel' expected shape"):
      mngr.restore(opt_state=opt_state)


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory):
  """One new process doing the work of three tests in turn (a new Python that
  imports JAX and orbax costs seconds): resume, mesh8, then no_close, which
  exits with its save unfinished. Returns (directory of each, its output, the
  resumed run's step-5 state)."""
  tmp = tmp_path_factory.mktemp("fresh")
  dirs = {mode: tmp / mode for mode in ("resume", "mesh8", "no_close")}
  _, frozen, trainable0, tx, opt_state0 = cw.problem()
  half = cw.train(cw.make_step(frozen, tx), trainable0, opt_state0, 0, 5)
  with jlora.orbax.CheckpointManager(dirs["resume"], base=frozen, spec=cw.SPEC) as mngr:
    mngr.save(5, *half)
  # mesh8 needs 8 devices. Appended to the session's flags: the worker must
  # compile as this process does, or its random initial factors may round
  # differently and the trees differ (and resume's steps must be bit-exact).
  env = {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                       + " --xla_force_host_platform_device_count=8").strip()}
  out = run_worker(*(x for mode, d in dirs.items() for x in (mode, d)), **env)
  return dirs, out, half


def test_resume_in_a_new_process_is_bit_exact(fresh_process):
  dirs, out, half = fresh_process
  _, frozen, trainable0, tx, opt_state0 = cw.problem()
  step_fn = cw.make_step(frozen, tx)
  straight = cw.train(step_fn, trainable0, opt_state0, 0, 10)
  assert "RESUMED" in out   # restored 5, trained 5 more, saved 10
  with jlora.orbax.CheckpointManager(dirs["resume"], base=frozen) as mngr:
    resumed = mngr.restore(10, opt_state=opt_state0)
  assert resumed.step == 10
  assert_trees_equal((resumed.trainable, resumed.opt_state), straight)
  assert not np.array_equal(straight[0]["l1"]["kernel"].b, half[0]["l1"]["kernel"].b)


def test_restore_onto_other_shardings_with_8_devices(fresh_process):
  dirs, out, _ = fresh_process
  assert "MESH8 OK" in out
  # The same checkpoint, written from 8 devices, restores here on one.
  _, frozen, trainable, tx, opt_state = cw.problem()
  with jlora.orbax.CheckpointManager(dirs["mesh8"], base=frozen) as mngr:
    got = mngr.restore(3, opt_state=jlora.optimizer(optax.adam(1e-2), trainable).init(trainable))
  assert_trees_equal(got.trainable, cw.shifted(trainable, 0.5))
  assert all(len(x.devices()) == 1 for x in jax.tree.leaves((got.trainable, got.opt_state)))


def test_killed_between_write_and_finalize_keeps_the_last_checkpoint(tmp_path):
  ckpt, adapter = tmp_path / "ckpt", tmp_path / "adapter"
  # One process: the manager's save stops in its background thread, the adapter's in the main one.
  worker = Worker(tmp_path, "hang_both", f"{ckpt},{adapter}")
  try:
    worker.wait_for(lambda: worker.printed("FINALIZE", times=2), "both saves reached finalize")
  finally:
    worker.kill()
  assert (ckpt / "2.orbax-checkpoint-tmp" / "opt_state").is_dir()   # written, not finalized
  _, frozen, trainable, tx, opt_state = cw.problem()
  step1 = cw.shifted(trainable, 1.0)
  assert_trees_equal(jlora.orbax.load(adapter, base=frozen)[0], step1)   # old adapter intact
  with jlora.orbax.CheckpointManager(ckpt, base=frozen) as mngr:
    assert mngr.all_steps() == [1]
    got = mngr.restore(opt_state=opt_state)
    assert got.step == 1
    assert_trees_equal((got.trainable, got.opt_state), (step1, opt_state))
    assert mngr.save(2, trainable, opt_state)       # the step can be written again
  jlora.orbax.save(adapter, trainable, base=frozen, overwrite=True)   # cleans the leftovers
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
  with jlora.orbax.CheckpointManager(ckpt, base=frozen) as mngr:
    assert mngr.all_steps() == [1]
    got = mngr.restore(opt_state=opt_state)
    assert_trees_equal((got.trainable, got.opt_state), (cw.shifted(trainable, 1.0), opt_state))
    assert mngr.save(2, trainable, opt_state)
  assert not tmp.exists()            # the manager cleaned up the interrupted save
  assert sorted(os.listdir(ckpt)) == ["1", "2"]


# -- file safety (issue 10) --------------------------------------------------------------


def test_saving_an_existing_or_older_step_raises_or_overwrites(tmp_path):
  """Issue 10 item 3: after restoring an earlier step and training on, a save
  must not silently write nothing."""
  _, frozen, trainable, tx, opt_state = cw.problem()
  with jlora.orbax.CheckpointManager(tmp_path, base=frozen, spec=cw.SPEC) as mngr:
    for step in (2, 4):
      assert mngr.save(step, cw.shifted(trainable, step), opt_state)
    with pytest.raises(jlora.LoraCheckpointError,
                       match=r"step 3 is older than the latest step 4 .* overwrite=True"):
      mngr.save(3, cw.shifted(trainable, 3.0), opt_state)
    with pytest.raises(jlora.LoraCheckpointError, match="step 4 already exists"):
      mngr.save(4, cw.shifted(trainable, 3.0), opt_state)
    assert mngr.save(3, cw.shifted(trainable, 3.0), opt_state, overwrite=True)
    mngr.wait_until_finished()
    assert mngr.all_steps() == [2, 3]                 # the abandoned step 4 is gone
    got = mngr.restore(opt_state=opt_state)
    assert got.step == 3
    assert_trees_equal(got.trainable, cw.shifted(trainable, 3.0))


def test_an_async_save_is_finished_at_exit_without_close(fresh_process):
  """Issue 10 item 4: a program that exits normally without close() keeps its
  last checkpoint."""
  dirs, out, _ = fresh_process
  assert "STARTED" in out
  _, frozen, trainable, tx, opt_state = cw.problem()
  with jlora.orbax.CheckpointManager(dirs["no_close"], base=frozen) as mngr:
    assert mngr.all_steps() == [1]
    big = (opt_state, np.zeros((1024, 1024), np.float32))
    got = mngr.restore(opt_state=big)
  assert_trees_equal(got.trainable, cw.shifted(trainable, 1.0))


def test_a_manager_with_another_spec_refuses_to_restore(tmp_path):
  """Issue 10 item 12: restoring with another spec must not silently return
  the stored scale."""
  _, frozen, trainable, tx, opt_state = cw.problem()
  with jlora.orbax.CheckpointManager(tmp_path, base=frozen, spec=cw.SPEC) as mngr:
    mngr.save(1, trainable, opt_state)
  other = dataclasses.replace(cw.SPEC, alpha=16)
  with jlora.orbax.CheckpointManager(tmp_path, base=frozen, spec=other) as mngr:
    with pytest.raises(jlora.LoraCheckpointError,
                       match=r"saved with another spec .* 'l1/kernel': rank 4, scale 2.0, "
                             r"dropout 0.1 stored; the spec gives rank 4, scale 4.0"):
      mngr.restore(opt_state=opt_state)
  with jlora.orbax.CheckpointManager(tmp_path, base=frozen) as mngr:   # no spec: the stored one
    assert mngr.restore(opt_state=opt_state).trainable["l1"]["kernel"].scale == 2.0


def test_half_deleted_steps_are_not_listed(tmp_path):
  """Issue 10 item 13: a step left half-deleted (a kill during max_to_keep's
  cleanup, by orbax's own deletion) is not listed as complete, and what a
  killed jlora cleanup left in .jlora-deleted is emptied by the next manager."""
  _, frozen, trainable, tx, opt_state = cw.problem()
  with jlora.orbax.CheckpointManager(tmp_path, base=frozen, max_to_keep=None) as mngr:
    for step in (1, 2, 3):
      mngr.save(step, cw.shifted(trainable, step), opt_state)
  for f in sorted((tmp_path / "1" / "adapter").rglob("*"))[:3]:   # orbax's rmtree, killed
    if f.is_file():
      f.unlink()
  (tmp_path / ".jlora-deleted" / "0" / "adapter").mkdir(parents=True)
  (tmp_path / ".jlora-deleted" / "0" / "adapter" / "x").write_text("half deleted")
  with jlora.orbax.CheckpointManager(tmp_path, base=frozen) as mngr:
    assert mngr.all_steps() == [2, 3]
    assert mngr.restore(opt_state=opt_state).step == 3
  assert not (tmp_path / ".jlora-deleted").exists()


def test_a_damaged_latest_step_names_the_good_ones(tmp_path):
  """Issue 10 item 13: restore names the older steps that verify, and
  fall_back=True restores the latest of them, with a warning."""
  _, frozen, trainable, tx, opt_state = cw.problem()
  with jlora.orbax.CheckpointManager(tmp_path, base=frozen, max_to_keep=None) as mngr:
    for step in (1, 2, 3):
      mngr.save(step, cw.shifted(trainable, step), opt_state)
  meta = tmp_path / "3" / "adapter_meta" / "metadata"
  meta.write_bytes(meta.read_bytes().replace(b'"scale": 2.0', b'"scale": 9.0'))
  with jlora.orbax.CheckpointManager(tmp_path, base=frozen) as mngr:
    assert mngr.all_steps() == [1, 2, 3]
    with pytest.raises(jlora.LoraCheckpointError,
                       match=r"'adapter_meta/metadata' is corrupted .* the older steps \[1, 2\] "
                             r"verify: restore\(step=2, ...\) or restore\(..., fall_back=True\)"):
      mngr.restore(opt_state=opt_state)
    with pytest.warns(UserWarning, match=r"skipped damaged checkpoint steps \[3\]"):
      got = mngr.restore(opt_state=opt_state, fall_back=True)
    assert got.step == 2
    assert_trees_equal(got.trainable, cw.shifted(trainable, 2.0))
    with pytest.raises(jlora.LoraCheckpointError, match="is corrupted"):
      mngr.restore(3, opt_state=opt_state)
