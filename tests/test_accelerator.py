"""The accelerator protocol (benchmarks/accelerator.py) runs end to end.

No accelerator here: the parts this repository's own file runs (the bf16
model at tiny sizes, the dW0 HLO check) run on the CPU with ``--cpu-smoke``;
the parts that call other benchmark scripts are checked by a dry run (the
script exists and declares every flag the protocol passes; those scripts
have their own smoke tests in test_benchmarks.py). Off a GPU, the protocol
proper refuses to run and says why.
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
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
  proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], env=env,
                        capture_output=True, text=True, timeout=timeout)
  return proc, json.loads(out.read_text())


def test_dry_run_finds_every_script_and_flag(tmp_path):
  proc, rep = _run(tmp_path, "--dry-run")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert list(rep["parts"]) == ["core", "hlo", "bf16_d2048", "bf16_d4096", "qlora", "bank"]
  assert all(p["status"] == "dry run" for p in rep["parts"].values()), rep["parts"]
  assert rep["parts"]["core"]["command"][0].endswith("bench_lora.py")


def test_cpu_smoke_of_the_own_parts(tmp_path):
  proc, rep = _run(tmp_path, "--cpu-smoke", "--parts", "bf16_d2048,hlo")
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  assert rep["smoke"] and rep["device"]["backend"] == "cpu" and rep["all_ok"]
  bf16 = rep["parts"]["bf16_d2048"]["result"]
  assert bf16["config"]["dtype"] == "bfloat16"
  assert bf16["train_step_ratio"] > 0 and bf16["forward_ratio"] > 0
  assert bf16["merged_vs_unmerged_rel_diff"] < 0.05     # bf16 rounding
  hlo = rep["parts"]["hlo"]["result"]
  assert hlo["ok"] and hlo["lora_weight_shaped_dots"] == [] and hlo["lora_dots"] > 6
  assert hlo["full_weights_with_dw_dots"] >= hlo["adapted_weights"] == 12
  # Floors are recorded, and judged only on a GPU.
  floors = rep["floors"]
  assert set(floors) == {"bf16_d2048.train_step_ratio", "bf16_d2048.forward_ratio"}
  assert all(f["holds"] is None for f in floors.values())


def test_without_a_gpu_the_protocol_says_so(tmp_path):
  proc, rep = _run(tmp_path, "--parts", "hlo")
  assert proc.returncode == 1
  assert "no GPU" in rep["error"]
  assert rep["parts"]["hlo"]["status"] == "skipped: no GPU"
