"""jlora across JAX processes: two processes on this machine, CPU collectives.

Each phase of ``mp_worker.py`` runs in fresh interpreters (4 simulated CPU
devices per process, ``jax.distributed`` on a free loopback port, gloo
collectives): ``train`` (2 processes: FSDP and tensor-parallel LoRA steps,
an orbax adapter, training checkpoints and a PEFT folder saved by both),
``resume`` (2 processes: restore, then one process is killed in the middle
of the next checkpoint's save) and ``verify`` (1 process, 2 devices: the
single-process reference, and every file restored onto other devices).
Every wait has a deadline and every process is killed in a ``finally``.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "mp_worker.py"
PHASE_TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  # LLVM's lowest optimisation level halves the compiles; nothing here is timed.
  flags = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
           " --xla_backend_optimization_level=0")
  return {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu",
          "JLORA_MULTIHOST_TIMEOUT_S": "60"}


def _start(args: list[str], devices: int, log: pathlib.Path) -> subprocess.Popen:
  with open(log, "wb") as f:
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=_env(devices),
                            cwd=HERE, stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
  proc.wait(timeout=30)


def _tail(log: pathlib.Path) -> str:
  return log.read_text(errors="replace")[-6000:] if log.exists() else "(no log)"


def _run_pair(phase: str, d: pathlib.Path, until=None) -> list[subprocess.Popen]:
  """Starts the two processes of ``phase``; waits for both to exit, or for
  ``until()`` to be true. Returns them (killed in the caller's finally)."""
  port = _free_port()
  procs = [_start([phase, str(d), str(i), str(port)], 4, d / f"{phase}.{i}.log")
           for i in range(2)]
  deadline = time.monotonic() + PHASE_TIMEOUT_S
  while time.monotonic() < deadline:
    if until is not None and until():
      return procs
    if all(p.poll() == 0 for p in procs):
      return procs
    if any(p.poll() not in (None, 0) for p in procs):
      time.sleep(2)   # let the other one report, then fail
      break
    time.sleep(0.2)
  logs = "\n".join(f"--- process {i}:\n{_tail(d / f'{phase}.{i}.log')}" for i in range(2))
  codes = [p.poll() for p in procs]
  for p in procs:
    _kill(p)
  pytest.fail(f"phase {phase}: exit codes {codes} (None: still running at the deadline)\n{logs}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  d = tmp_path_factory.mktemp("multiprocess")
  procs: list[subprocess.Popen] = []
  out = {}
  try:
    # 1. Two processes train, save, and stop by themselves.
    t0 = time.monotonic()
    pair = _run_pair("train", d)
    procs += pair
    out["seconds"] = {"train": time.monotonic() - t0}
    t0 = time.monotonic()
    assert [p.returncode for p in pair] == [0, 0]
    out["train"] = [json.loads((d / f"train.{i}.json").read_text()) for i in range(2)]

    # 2. Two processes resume; process 0 is killed inside the next checkpoint's
    # save (every shard written, the step not yet complete), then process 1.
    marker = d / "resume.in_save"
    pair = _run_pair("resume", d, until=marker.exists)
    procs += pair
    assert marker.exists(), "the resume phase ended before its save"
    assert all(p.poll() is None for p in pair), "a process of the resume phase exited"
    os.killpg(pair[0].pid, signal.SIGKILL)
    pair[0].wait(timeout=30)
    time.sleep(0.5)
    _kill(pair[1])
    out["resume"] = [json.loads((d / f"resume.{i}.json").read_text()) for i in range(2)]
    out["killed_codes"] = [p.returncode for p in pair]
    out["seconds"]["resume"] = time.monotonic() - t0
    t0 = time.monotonic()

    # 3. One process with 2 devices checks everything.
    log = d / "verify.log"
    proc = _start(["verify", str(d)], 2, log)
    procs.append(proc)
    try:
      proc.wait(timeout=PHASE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      pytest.fail(f"verify did not finish in {PHASE_TIMEOUT_S} s\n{_tail(log)}")
    assert proc.returncode == 0, _tail(log)
    out["verify"] = json.loads((d / "verify.0.json").read_text())
    out["seconds"]["verify"] = time.monotonic() - t0
    print("phase seconds:", {k: round(v, 1) for k, v in out["seconds"].items()})
  finally:
    for p in procs:
      _kill(p)
  return out


def test_two_processes_of_four_devices(runs):
  for i, r in enumerate(runs["train"]):
    assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 8, 4), i


@pytest.mark.parametrize("mesh", ["fsdp", "tp"])
def test_training_equals_the_single_process_run(runs, mesh):
  v = runs["verify"]
  for r in runs["train"]:
    np.testing.assert_allclose(r[f"losses_{mesh}"], v["losses_ref"], rtol=1e-5)
  assert v["losses_ref"][-1] < v["losses_ref"][0]
  assert v["max_update"] > 1e-3            # every adapter moved...
  assert v[f"max_diff_{mesh}"] < 1e-5      # ...as on one device


def test_orbax_adapter_saved_by_both_restores_on_one_process(runs):
  v = runs["verify"]
  assert (v["process_count"], v["device_count"]) == (1, 2)
  assert v["adapter_equal"] and v["adapter_spec_equal"] and v["adapter_tp_equal"]
  # Placed on this process's mesh, A following W0's sharding.
  assert v["adapter_a_sharding"] == "P('data', None)" and v["adapter_a_devices"] == 2


def test_refusals_are_the_same_on_every_process(runs):
  errors = [r["not_ours_error"] for r in runs["train"]]
  assert errors[0] and "is not a jlora adapter written by jlora" in errors[0]
  assert errors[1] == f"{errors[0]} (raised on process 0)"


def test_peft_folder_written_once_by_process_zero(runs):
  for r in runs["train"]:
    assert r["peft_files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert r["peft_config_r"] == 4
    assert r["staging_left"] == []
  assert runs["verify"]["peft_equal"]


def test_base_files_written_by_both_restore_on_one_process(runs):
  assert runs["verify"]["base_equal"] and runs["verify"]["base.safetensors_equal"]
  # jlora.bnb.save gathers the sharded weights and process 0 writes the file.
  assert runs["verify"]["bnb_equal"]


def test_checkpoints_restore_onto_another_process_count(runs):
  v = runs["verify"]
  assert runs["train"][0]["ckpt_steps"] == [2, 3]    # max_to_keep=2
  assert v["restored_step"] == 3
  assert v["restored_trainable_equal"] and v["restored_opt_equal"]
  assert v["restored_mu_sharding"] == "P('data', None)"


def test_a_process_killed_mid_save_leaves_the_last_complete_checkpoint(runs):
  assert [r["restored_step"] for r in runs["resume"]] == [3, 3]
  assert runs["killed_codes"][0] == -signal.SIGKILL
  v = runs["verify"]
  # Step 4 was being written when process 0 died: on disk, but never listed.
  assert any(e.startswith("4") for e in v["ckpt_entries_before"]), v["ckpt_entries_before"]
  assert v["ckpt_steps"] == [2, 3] and v["restored_step"] == 3
  # The next manager cleaned it up, and saving step 4 works again.
  assert v["ckpt_steps_after"] == [3, 4]
  assert sorted(v["ckpt_entries_after"]) == ["3", "4"], v["ckpt_entries_after"]
