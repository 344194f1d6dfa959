"""One process of tests/test_multiprocess.py: jlora across JAX processes.

Run as ``python mp_worker.py PHASE DIR [PROCESS_ID PORT]`` with simulated CPU
devices (XLA_FLAGS); the test starts it. Phases:

  train    2 processes x 4 devices: LoRA steps on an FSDP and a tensor-parallel
           mesh, an orbax adapter, training checkpoints and a PEFT folder saved
           by both processes; process 0 writes what the test compares.
  resume   2 processes: restore the latest checkpoint, then save the next step;
           process 0 stops inside that save (after every shard is written,
           before the step is complete) and waits to be killed.
  verify   1 process, 2 devices: the single-process reference run, and every
           file of the other phases restored onto this process's devices.

Every process writes ``DIR/<phase>.<process>.json`` once it is done; the test
reads them. Nothing here waits without a timeout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time

import numpy as np

D_IN, HID, D_OUT, BATCH, STEPS = 16, 32, 8, 16, 3
SPEC_KW = dict(rank=4, alpha=8, targets=r"l\d/kernel", extra_trainable=["l1/bias"])
# mesh name: (mesh shape, axis names, PartitionSpec per parameter, of the batch)
MESHES = {
    "fsdp": ((8,), ("data",), {"l1/kernel": ("data", None), "l1/bias": (),
                               "l2/kernel": ("data", None)}, ("data", None)),
    "tp": ((2, 4), ("data", "model"), {"l1/kernel": (None, "model"), "l1/bias": ("model",),
                                       "l2/kernel": ("model", None)}, ("data", None)),
}
TIMEOUT_S = 60


def host_params() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {"l1/kernel": (0.3 * rng.standard_normal((D_IN, HID))).astype(np.float32),
          "l1/bias": (0.1 * rng.standard_normal(HID)).astype(np.float32),
          "l2/kernel": (0.3 * rng.standard_normal((HID, D_OUT))).astype(np.float32)}


def host_batch() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(1)
  return (rng.standard_normal((BATCH, D_IN)).astype(np.float32),
          rng.standard_normal((BATCH, D_OUT)).astype(np.float32))


def nest(flat: dict) -> dict:
  out: dict = {}
  for path, leaf in flat.items():
    first, last = path.split("/")
    out.setdefault(first, {})[last] = leaf
  return out


def fn(p, x):
  import jax.numpy as jnp
  h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
  return h @ p["l2"]["kernel"]


def spec():
  import jlora
  return jlora.LoraSpec(**SPEC_KW)


def place(mesh_name: str | None):
  """(params, frozen, trainable, x, y) on a mesh of MESHES, or on one device."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import jlora
  x, y = host_batch()
  host = host_params()
  if mesh_name is None:
    params = nest({k: jax.device_put(v, jax.local_devices()[0]) for k, v in host.items()})
  else:
    shape, axes, pspecs, data_spec = MESHES[mesh_name]
    n = int(np.prod(shape))
    mesh = Mesh(np.asarray(jax.devices()[:n]).reshape(shape), axes)

    def put(v, s):
      sharding = NamedSharding(mesh, P(*s))
      return jax.make_array_from_callback(v.shape, sharding, lambda idx: v[idx])

    params = nest({k: put(v, pspecs[k]) for k, v in host.items()})
    x, y = put(x, data_spec), put(y, data_spec)
  frozen, trainable = jlora.lora_transform(params, spec(), key=jax.random.key(0))
  return params, frozen, trainable, x, y


def make_step(trainable, params, tx):
  import jax
  import jax.numpy as jnp
  import optax

  import jlora
  apply = jlora.lora(fn)

  def step(t, s, f, x, y):
    loss, g = jax.value_and_grad(lambda t: jnp.mean((apply(f, t, x) - y) ** 2))(t)
    u, s = tx.update(g, s, t)
    return optax.apply_updates(t, u), s, loss

  if not isinstance(jax.tree_util.tree_leaves(params)[0].sharding,
                    jax.sharding.NamedSharding):
    return jax.jit(step)
  sh = jlora.shardings(trainable, tx, base=params)
  mesh = jax.tree_util.tree_leaves(sh.trainable)[0].mesh
  return jax.jit(step, out_shardings=(sh.trainable, sh.opt_state,
                                      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))


def train(mesh_name, steps=STEPS, on_step=None, placed=None):
  import optax

  import jlora
  params, frozen, trainable, x, y = placed or place(mesh_name)
  tx = jlora.optimizer(optax.adam(1e-2), trainable)
  opt_state = tx.init(trainable)
  step = make_step(trainable, params, tx)
  losses = []
  for i in range(steps):
    trainable, opt_state, loss = step(trainable, opt_state, frozen, x, y)
    losses.append(float(loss))
    if on_step is not None:
      on_step(i + 1, trainable, opt_state)
  return dict(params=params, frozen=frozen, trainable=trainable, opt_state=opt_state,
              losses=losses, tx=tx)


def flat_arrays(tree) -> dict[str, np.ndarray]:
  """Every array of a tree as host NumPy, by key path (gathered from all processes)."""
  import jax
  from jax.experimental import multihost_utils
  pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
  values = multihost_utils.process_allgather([v for _, v in pairs], tiled=True)
  return {jax.tree_util.keystr(k): np.asarray(v) for (k, _), v in zip(pairs, values)}


def lora_only(trainable):
  import jax

  import jlora
  return jax.tree_util.tree_map(lambda x: x if isinstance(x, jlora.LoraParam) else None,
                                trainable, is_leaf=lambda x: isinstance(x, jlora.LoraParam))


def rules():
  import jlora
  return jlora.peft.Rules.generic()


def bnb_params(params):
  """The base with l1's kernel in NF4, as a bitsandbytes checkpoint holds it."""
  import jlora
  return jlora.quantize(params, targets=["l1/kernel"])


# -- phases -------------------------------------------------------------------------------


def phase_train(d: pathlib.Path, pid: int) -> dict:
  import jax

  import jlora
  out: dict = {"process_count": jax.process_count(), "device_count": jax.device_count(),
               "local_device_count": jax.local_device_count()}
  run = {}
  for name in MESHES:
    if name == "fsdp":   # training checkpoints at every step, saved by both processes
      placed = place(name)
      with jlora.orbax.CheckpointManager(d / "ckpt", base=placed[1], spec=spec(),
                                         max_to_keep=2) as mngr:
        run[name] = train(name, placed=placed,
                          on_step=lambda s, t, o: mngr.save(s, t, o, extra={"step": s}))
        mngr.wait_until_finished()
        out["ckpt_steps"] = mngr.all_steps()
    else:
      run[name] = train(name)
    out[f"losses_{name}"] = run[name]["losses"]
    arrays = flat_arrays(run[name]["trainable"])
    if pid == 0:
      np.savez(d / f"trained_{name}.npz", **arrays)
  fsdp = run["fsdp"]
  if pid == 0:
    np.savez(d / "opt_fsdp.npz", **flat_arrays(fsdp["opt_state"]))
  else:
    flat_arrays(fsdp["opt_state"])   # a collective: every process takes part

  # An orbax adapter, saved by both processes; then replaced by the TP-trained one.
  first = jlora.orbax.save(d / "adapter", fsdp["trainable"], spec(), base=fsdp["frozen"])
  out["adapter_path"] = str(first)
  jlora.orbax.save(d / "adapter_tp", run["tp"]["trainable"], spec(), base=run["tp"]["frozen"])
  jlora.orbax.save(d / "adapter_tp", run["tp"]["trainable"], spec(), base=run["tp"]["frozen"],
                   overwrite=True)
  # A folder jlora did not write is refused on every process, with one message.
  if pid == 0:
    (d / "not_ours").mkdir()
    (d / "not_ours" / "keep.txt").write_text("mine")
  jax.experimental.multihost_utils.sync_global_devices("not_ours made")
  try:
    jlora.orbax.save(d / "not_ours", fsdp["trainable"], spec(), base=fsdp["frozen"],
                     overwrite=True)
    out["not_ours_error"] = None
  except jlora.LoraCheckpointError as e:
    out["not_ours_error"] = str(e)

  # PEFT: every process calls save, process 0 writes; all get the same config.
  # (The LoRA factors only: PEFT cannot train a bias beside an adapted kernel.)
  config = jlora.peft.save(d / "peft", lora_only(fsdp["trainable"]), rules(),
                           spec=dataclasses.replace(spec(), extra_trainable=None))
  out["peft_config_r"] = config["r"]
  out["peft_files"] = sorted(p.name for p in (d / "peft").iterdir())
  # Base files for the command line: an orbax directory and a safetensors file.
  jlora.base.save(d / "base", fsdp["params"])
  jlora.base.save(d / "base.safetensors", fsdp["params"])
  # A bitsandbytes checkpoint of the base, dense and NF4 leaves, PyTorch names.
  (d / "bnb").mkdir(exist_ok=True)
  jlora.bnb.save(d / "bnb" / "model.safetensors", bnb_params(fsdp["params"]), rules())
  out["staging_left"] = sorted(p.name for p in d.iterdir() if ".jlora-" in p.name)
  return out


def phase_resume(d: pathlib.Path, pid: int) -> dict:
  import jax

  import jlora
  from jlora.orbax import manager as manager_lib
  params, frozen, trainable, x, y = place("fsdp")
  import optax
  tx = jlora.optimizer(optax.adam(1e-2), trainable)
  sh = jlora.shardings(trainable, tx, base=params)
  template = jax.tree_util.tree_map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      jax.eval_shape(tx.init, trainable), sh.opt_state)
  mngr = jlora.orbax.CheckpointManager(d / "ckpt", base=frozen, spec=spec(), max_to_keep=2)
  restored = mngr.restore(opt_state=template)
  out = {"restored_step": restored.step, "extra": restored.extra}
  if pid == 0:
    real = manager_lib._write_pending_manifests

    def stop_here(directory):
      # Every shard of the step is on disk, the manifest is not: the process
      # that completes the step dies here.
      (d / "resume.in_save").write_text(str(os.getpid()))
      time.sleep(TIMEOUT_S)
      real(directory)

    manager_lib._write_pending_manifests = stop_here
  (d / f"resume.{pid}.json").write_text(json.dumps(out))   # before the save that is killed
  mngr.save(restored.step + 1, restored.trainable, restored.opt_state, force=True)
  mngr.wait_until_finished()
  return {**out, "finished": True}


def phase_verify(d: pathlib.Path) -> dict:
  import jax
  import optax

  import jlora
  out: dict = {"process_count": jax.process_count(), "device_count": jax.device_count()}
  ref = train(None)   # the single-process, single-device run
  out["losses_ref"] = ref["losses"]
  ref_arrays = flat_arrays(ref["trainable"])
  for name in MESHES:
    got = np.load(d / f"trained_{name}.npz")
    out[f"max_diff_{name}"] = max(float(np.max(np.abs(got[k] - v))) for k, v in ref_arrays.items())
  out["max_update"] = min(float(np.max(np.abs(v - w))) for v, w in zip(
      ref_arrays.values(), flat_arrays(place(None)[2]).values()))

  # Restored onto another process and device count: 1 process, an FSDP mesh of 2.
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.asarray(jax.devices()[:2]), ("data",))
  host = host_params()
  params = nest({k: jax.device_put(v, NamedSharding(mesh, P(*(("data",) if "kernel" in k
                                                             else ()))))
                 for k, v in host.items()})
  frozen, trainable = jlora.lora_transform(params, spec(), key=jax.random.key(0))
  trained = np.load(d / "trained_fsdp.npz")

  def same(tree, want, keys=None):
    arrays = flat_arrays(tree)
    keys = sorted(want.files) if keys is None else keys
    return sorted(arrays) == keys and all(np.array_equal(arrays[k], want[k]) for k in keys)

  adapter, loaded_spec = jlora.orbax.load(d / "adapter", base=frozen)
  out["adapter_equal"] = same(adapter, trained)
  out["adapter_spec_equal"] = loaded_spec == spec()
  out["adapter_a_sharding"] = str(adapter["l1"]["kernel"].a.sharding.spec)
  out["adapter_a_devices"] = len(adapter["l1"]["kernel"].a.sharding.device_set)
  tp, _ = jlora.orbax.load(d / "adapter_tp", base=frozen)
  out["adapter_tp_equal"] = same(tp, np.load(d / "trained_tp.npz"))

  tx = jlora.optimizer(optax.adam(1e-2), trainable)
  sh = jlora.shardings(trainable, tx, base=params)
  template = jax.tree_util.tree_map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      jax.eval_shape(tx.init, trainable), sh.opt_state)
  ckpt = d / "ckpt"
  out["ckpt_entries_before"] = sorted(p.name for p in ckpt.iterdir())
  with jlora.orbax.CheckpointManager(ckpt, base=frozen, spec=spec(), max_to_keep=2) as mngr:
    out["ckpt_steps"] = mngr.all_steps()
    restored = mngr.restore(opt_state=template)
    out["restored_step"] = restored.step
    out["restored_trainable_equal"] = same(restored.trainable, trained)
    out["restored_opt_equal"] = same(restored.opt_state, np.load(d / "opt_fsdp.npz"))
    out["restored_mu_sharding"] = str(restored.opt_state[0].mu["l1"]["kernel"].a.sharding.spec)
    # The directory takes new steps again (where the killed save stopped).
    mngr.save(restored.step + 1, restored.trainable, restored.opt_state)
    mngr.wait_until_finished()
    out["ckpt_steps_after"] = mngr.all_steps()
  out["ckpt_entries_after"] = sorted(p.name for p in ckpt.iterdir())

  for name in ("base", "base.safetensors"):
    loaded = jlora.base.load(d / name, like=params)
    out[f"{name}_equal"] = all(np.array_equal(np.asarray(loaded[a][b]), host[f"{a}/{b}"])
                               for a, b in (k.split("/") for k in host))
  expected = bnb_params(nest({k: jax.numpy.asarray(v) for k, v in host.items()}))
  loaded = jlora.bnb.load(d / "bnb", like=params, rules=rules())
  out["bnb_equal"] = all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
      zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(expected)))
  peft = jlora.peft.load(d / "peft", params, rules())
  out["peft_equal"] = same(lora_only(peft.trainable), trained,
                           keys=sorted(k for k in trained.files if "bias" not in k))
  return out


def main() -> None:
  phase, d = sys.argv[1], pathlib.Path(sys.argv[2])
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  pid = 0
  if phase != "verify":
    pid, port = int(sys.argv[3]), int(sys.argv[4])
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=TIMEOUT_S,
                               heartbeat_timeout_seconds=10, shutdown_timeout_seconds=10)
  if phase == "train":
    out = phase_train(d, pid)
  elif phase == "resume":
    out = phase_resume(d, pid)
  else:
    out = phase_verify(d)
  (d / f"{phase}.{pid}.json").write_text(json.dumps(out))
  if phase != "verify":
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
