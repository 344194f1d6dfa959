"""The accelerator protocol (benchmarks/accelerator.py) runs end to end.

No accelerator here. The dW0 HLO check runs on the CPU with ``--cpu-smoke``.
A dry run checks every other part without compiling: each benchmark script
exists and declares every flag the protocol passes (they have their own
smoke tests in test_benchmarks.py), and what the bf16 part uses of
bench_lora.py and models.py is there. (``accelerator.py --cpu-smoke`` runs
all six parts end to end, 6 minutes on 2 cores: too long for CI.) Off a GPU,
the protocol proper refuses to run and says why.
"""

import json
import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "accelerator.py"


def _run(tmp_path, *args, timeout=600):
  out = tmp_path / "acc.json"
  # No timing is judged here: LLVM's lowest optimisation level halves the compiles.
  # Appended, so the suite's other fast-compile flags (tests/conftest.py) stay.
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.strip()}
  proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], env=env,
                        capture_output=True, text=True, timeout=timeout)
  return proc, json.loads(out.read_text())


def test_dry_run_finds_every_script_and_flag(tmp_path):
  proc, rep = _run(tmp_path, "--dry-run")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert list(rep["parts"]) == ["core", "hlo", "bf16_d2048", "bf16_d4096", "qlora", "bank"]
  assert all(p["status"] == "dry run" for p in rep["parts"].values()), rep["parts"]
  assert rep["parts"]["core"]["command"][0].endswith("bench_lora.py")
  assert rep["own_parts_problems"] == []


def test_cpu_smoke_of_the_hlo_check(tmp_path):
  proc, rep = _run(tmp_path, "--cpu-smoke", "--parts", "hlo")
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  assert rep["smoke"] and rep["device"]["backend"] == "cpu" and rep["all_ok"]
  hlo = rep["parts"]["hlo"]["result"]
  assert hlo["backend"] == "cpu"
  assert hlo["ok"] and hlo["lora_weight_shaped_dots"] == [] and hlo["lora_dots"] > 6
  assert hlo["full_weights_with_dw_dots"] >= hlo["adapted_weights"] == 12
  assert rep["floors"] == {}     # no ratio measured in this run


def test_without_a_gpu_the_protocol_says_so(tmp_path):
  proc, rep = _run(tmp_path, "--parts", "hlo")
  assert proc.returncode == 1
  assert "no GPU" in rep["error"]
  assert rep["parts"]["hlo"]["status"] == "skipped: no GPU"


def test_floors_are_judged_on_a_gpu_only():
  sys.path.insert(0, str(SCRIPT.parent))
  import accelerator
  parts = {"core": {"result": {"train_step_ratio": 0.70, "forward_ratio": 1.10}},
           "bf16_d4096": {"result": {"train_step_ratio": 0.80}}}
  gpu = accelerator._floors(parts, gpu=True)
  assert {k: v["holds"] for k, v in gpu.items()} == {
      "core.train_step_ratio": True, "core.forward_ratio": False,
      "bf16_d4096.train_step_ratio": False}
  assert all(v["holds"] is None for v in accelerator._floors(parts, gpu=False).values())
