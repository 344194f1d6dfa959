"""Training problem shared by the orbax tests and their subprocesses.

Run as a script, it does one thing, or several in turn (``MODE DIR [MODE DIR ...]``:
each new Python that imports JAX and orbax costs seconds), in a fresh process
(the tests kill it or check what it leaves behind):

  resume DIR            restore DIR's latest step, train to step 10, save step 10
  mesh8 DIR             save on an 8-device mesh, restore onto another (needs XLA_FLAGS)
  hang_both DIR,AD      a manager in DIR saves step 1, then step 2 stopping between
                        orbax's temporary write and its finalize (the rename), in its
                        background thread; meanwhile adapter AD is saved, then
                        overwritten, stopping likewise (two FINALIZE lines)
  big_save DIR          save step 1, then a large step 2 (the test kills it mid-write)
  no_close DIR          start an async save of a large step 1 and exit normally, without
                        waiting for it or closing the manager
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora

SPEC = jlora.LoraSpec(rank=4, alpha=8, targets=["kernel"], extra_trainable=r"l2/bias",
                      dropout=0.1)


def model(params, x):
  h = jax.nn.relu(x @ params["l1"]["kernel"] + params["l1"]["bias"])
  return h @ params["l2"]["kernel"] + params["l2"]["bias"]


def base_params():
  # NumPy values: no XLA compilation before the part under test.
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(0.3 * rng.standard_normal(shape), jnp.float32)
  return {"l1": {"kernel": normal(16, 32), "bias": jnp.zeros(32)},
          "l2": {"kernel": normal(32, 8), "bias": jnp.zeros(8)}}


def problem():
  """(params, frozen, trainable, tx, opt_state) at step 0."""
  params = base_params()
  frozen, trainable = jlora.lora_transform(params, SPEC, key=jax.random.key(1))
  tx = jlora.optimizer(optax.adamw(1e-2), trainable)
  return params, frozen, trainable, tx, tx.init(trainable)


def shifted(trainable, by: float):
  """A deterministic non-trivial trainable (B nonzero): every leaf + by * index."""
  def shift(x):
    ramp = np.arange(x.size, dtype=np.float32).reshape(x.shape) / x.size
    return jax.device_put((np.asarray(x, np.float32) + by * ramp).astype(x.dtype), x.sharding)
  return jax.tree.map(shift, trainable)


def make_step(frozen, tx):
  apply = jlora.lora(model)

  @jax.jit
  def step_fn(trainable, opt_state, step):
    kx, ky, kd = jax.random.split(jax.random.fold_in(jax.random.key(7), step), 3)
    x, y = jax.random.normal(kx, (8, 16)), jax.random.normal(ky, (8, 8))
    loss = lambda t: jnp.mean((apply(frozen, t, x, lora_dropout_key=kd) - y) ** 2)
    updates, opt_state = tx.update(jax.grad(loss)(trainable), opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  return step_fn


def train(step_fn, trainable, opt_state, start: int, stop: int):
  for step in range(start, stop):
    trainable, opt_state = step_fn(trainable, opt_state, step)
  return trainable, opt_state


def _resume(directory):
  _, frozen, trainable, tx, opt_state = problem()
  with jlora.orbax.CheckpointManager(directory, base=frozen, spec=SPEC, max_to_keep=5) as mngr:
    restored = mngr.restore(opt_state=opt_state)
    assert restored.step == 5, restored.step
    trainable, opt_state = train(make_step(frozen, tx), restored.trainable, restored.opt_state, 5, 10)
    mngr.save(10, trainable, opt_state)
  print("RESUMED", flush=True)


def mesh_trees(mesh, spec_l1, spec_l2):
  """The problem's params placed on ``mesh`` and its LoRA split there."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  params = base_params()
  place = {"l1": {"kernel": spec_l1, "bias": P()}, "l2": {"kernel": spec_l2, "bias": P()}}
  params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, place)
  frozen, trainable = jlora.lora_transform(params, SPEC, key=jax.random.key(1))
  return params, frozen, trainable


def _mesh8(directory):
  from jax.sharding import Mesh, PartitionSpec as P
  devices = np.array(jax.devices())
  assert devices.size == 8, devices
  _, frozen, fresh = mesh_trees(Mesh(devices, ("x",)), P(None, "x"), P("x", None))
  trainable = shifted(fresh, 0.5)
  tx = jlora.optimizer(optax.adam(1e-2), trainable)
  opt_state = tx.init(trainable)
  assert trainable["l1"]["kernel"].b.sharding.spec == P(None, "x")
  with jlora.orbax.CheckpointManager(directory, base=frozen, spec=SPEC) as mngr:
    mngr.save(3, trainable, opt_state)

  # Restore onto a 2x4 mesh with the weights sharded on both axes.
  mesh2 = Mesh(devices.reshape(2, 4), ("a", "b"))
  _, frozen2, fresh2 = mesh_trees(mesh2, P("a", "b"), P("b", "a"))
  template = tx.init(fresh2)
  with jlora.orbax.CheckpointManager(directory, base=frozen2) as mngr:
    got = mngr.restore(opt_state=template)
  want_leaves = jax.tree.leaves(trainable)
  for kind, restored, target, want in (("trainable", got.trainable, fresh2, trainable),
                                       ("opt_state", got.opt_state, template, opt_state)):
    for r, f, w in zip(jax.tree.leaves(restored), jax.tree.leaves(target), jax.tree.leaves(want)):
      assert r.sharding == f.sharding, (kind, r.sharding, f.sharding)
      assert np.array_equal(np.asarray(r), np.asarray(w)), kind
  assert got.trainable["l1"]["kernel"].a.sharding.spec == P("a", None)
  assert got.trainable["l1"]["kernel"].b.sharding.spec == P(None, "b")
  assert got.trainable["l2"]["kernel"].b.sharding.spec == P(None, "a")
  # A trainable template overrides the shardings derived from the base.
  with jlora.orbax.CheckpointManager(directory, base=frozen2) as mngr:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            fresh)
    got = mngr.restore(opt_state=template, trainable=abstract)
  for r, f in zip(jax.tree.leaves(got.trainable), jax.tree.leaves(fresh)):
    assert r.sharding == f.sharding, (r.sharding, f.sharding)
  # jlora.orbax.load places factors from the base's shardings as lora_transform does.
  loaded, _ = jlora.orbax.load(mngr.step_path(3), base=frozen2)
  for r, f in zip(jax.tree.leaves(loaded), jax.tree.leaves(fresh2)):
    assert r.sharding == f.sharding, (r.sharding, f.sharding)
  assert all(np.array_equal(np.asarray(r), np.asarray(w))
             for r, w in zip(jax.tree.leaves(loaded), want_leaves))
  print("MESH8 OK", flush=True)


def _stop_before_finalize():
  """Makes orbax stop (and report) once a checkpoint is fully written under its
  temporary name, just before the rename that finalizes it."""
  from orbax.checkpoint._src.path import atomicity
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def hang(self, *args, **kwargs):
    if atomicity.TMP_DIR_SUFFIX in str(self.get_final()):
      return await finalize(self, *args, **kwargs)   # an item inside the checkpoint
    print(f"FINALIZE {self.get_final()}", flush=True)
    time.sleep(3600)

  atomicity.AtomicRenameTemporaryPath.finalize = hang


def _hang_both(dirs):
  directory, adapter_dir = dirs.split(",")
  _, frozen, trainable, tx, opt_state = problem()
  mngr = jlora.orbax.CheckpointManager(directory, base=frozen, spec=SPEC)
  mngr.save(1, shifted(trainable, 1.0), opt_state)
  mngr.wait_until_finished()
  jlora.orbax.save(adapter_dir, shifted(trainable, 1.0), SPEC, base=frozen)
  _stop_before_finalize()
  mngr.save(2, shifted(trainable, 2.0), opt_state)   # stops in its background thread
  jlora.orbax.save(adapter_dir, shifted(trainable, 2.0), SPEC, base=frozen, overwrite=True)
  print("NOT REACHED", flush=True)


def _big_save(directory):
  params, frozen, trainable, tx, opt_state = problem()
  with jlora.orbax.CheckpointManager(directory, base=frozen, spec=SPEC) as mngr:
    mngr.save(1, shifted(trainable, 1.0), opt_state)
    mngr.wait_until_finished()
    print("SAVED 1", flush=True)
    # A large optimizer state (any pytree of arrays is accepted): ~64 MiB to write.
    big = (opt_state, jax.random.normal(jax.random.key(9), (4096, 4096)))
    mngr.save(2, shifted(trainable, 2.0), big)
    mngr.wait_until_finished()
  print("SAVED 2", flush=True)


def _no_close(directory):
  _, frozen, trainable, tx, opt_state = problem()
  mngr = jlora.orbax.CheckpointManager(directory, base=frozen, spec=SPEC)
  big = (opt_state, np.random.default_rng(0).standard_normal((1024, 1024), np.float32))
  mngr.save(1, shifted(trainable, 1.0), big)
  print("STARTED", flush=True)   # and the interpreter exits


if __name__ == "__main__":
  args = sys.argv[1:]
  modes = {"resume": _resume, "mesh8": _mesh8, "hang_both": _hang_both, "big_save": _big_save,
           "no_close": _no_close}
  for mode, directory in zip(args[::2], args[1::2]):
    modes[mode](directory)
