"""The benchmark scripts still run (tiny sizes; no timing is asserted here).

Each runs in a subprocess: benchmarks/models.py would clash with
tests/models.py in this process.
"""

import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def run_script(tmp_path, script: str, *args: str, timeout: int = 300) -> dict:
  """Runs ``benchmarks/<script> *args --json F`` and returns what it wrote."""
  out = tmp_path / f"{script}.json"
  proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args, "--json", str(out)],
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(out.read_text())


def test_bench_lora_quick(tmp_path):
  res = run_script(tmp_path, "bench_lora.py", "--quick")
  # The script itself asserts merged == unmerged; the ratios must be real numbers.
  assert res["max_abs_diff_merged_vs_unmerged"] < 1e-3
  assert res["train_step_ratio"] > 0 and res["forward_ratio"] > 0


def test_peers_quick_jlora(tmp_path):
  (row,) = run_script(tmp_path, "peers.py", "--quick", "--libs", "jlora")["results"]
  assert row["lib"] == "jlora" and row["status"] == "ok", row
  assert row["dense_w0_grad"] is False
  assert row["loss_final"] < row["loss_step0"]


def test_bench_bank_quick(tmp_path):
  rows = run_script(tmp_path, "bench_bank.py", "--quick", "--rounds", "1", timeout=600)["rows"]
  # The script asserts each strategy's rows equal their adapters' merged models.
  assert {r["adapters"] for r in rows} == {4}
  assert all(r[f"{h}_ratio"] > 0 for r in rows for h in ("gather", "segment", "masked"))


def test_bench_qlora_quick(tmp_path):
  # The 7B memory analysis (--no-7b here) compiles three more steps; the
  # memory claim itself is tested in test_nf4.py on a scanned model.
  res = run_script(tmp_path, "bench_qlora.py", "--quick", "--no-7b")
  # The script asserts that the QLoRA loss is the LoRA loss on the dequantized base.
  assert res["speed"]["qlora_over_lora"] > 0
  assert res["speed"]["quantized_bytes_per_param"] <= 0.52


def test_bench_decode_quick(tmp_path):
  res = run_script(tmp_path, "bench_decode.py", "--quick")
  # The script asserts the unmerged step equals the merged one.
  assert res["max_abs_diff"] < 1e-3 and res["ratio"] > 0


def test_bench_variants_quick(tmp_path):
  res = run_script(tmp_path, "bench_variants.py", "--quick")
  assert res["dora_over_lora"] > 0 and res["embedding_adapted_over_frozen"] > 0


def test_profile_step_quick(tmp_path):
  res = run_script(tmp_path, "profile_step.py", "--quick", "--rounds", "1", "--profile-steps", "1",
                   "--no-flags")
  assert all(ms > 0 for ms in res["median_ms"].values())
  low_rank = "matmul: low-rank (a dim of r)"
  tables = res["by_class_ms"]
  # Low-rank matmuls are found in the LoRA steps only (the JAX tables need xprof).
  assert tables["PEFT LoRA"].get(low_rank, 0) > 0 and low_rank not in tables["PyTorch full"]
  if "jlora LoRA" in tables:
    assert tables["jlora LoRA"].get(low_rank, 0) > 0 and low_rank not in tables["XLA full"]
