"""The benchmark scripts still run (tiny sizes; no timing is asserted here)."""

import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def test_bench_lora_quick(tmp_path):
  # A subprocess: benchmarks/models.py would clash with tests/models.py here.
  out = tmp_path / "out.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(BENCH, "bench_lora.py"), "--quick", "--json", str(out)],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  res = json.loads(out.read_text())
  # The script itself asserts merged == unmerged; the ratios must be real numbers.
  assert res["max_abs_diff_merged_vs_unmerged"] < 1e-3
  assert res["train_step_ratio"] > 0 and res["forward_ratio"] > 0


def test_peers_quick_jlora(tmp_path):
  out = tmp_path / "peers.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(BENCH, "peers.py"), "--quick", "--libs", "jlora",
       "--json", str(out)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (row,) = json.loads(out.read_text())["results"]
  assert row["lib"] == "jlora" and row["status"] == "ok", row
  assert row["dense_w0_grad"] is False
  assert row["loss_final"] < row["loss_step0"]


def test_bench_bank_quick(tmp_path):
  out = tmp_path / "bank.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(BENCH, "bench_bank.py"), "--quick", "--rounds", "1",
       "--json", str(out)], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = json.loads(out.read_text())["rows"]
  # The script asserts each strategy's rows equal their adapters' merged models.
  assert {r["adapters"] for r in rows} == {4}
  assert all(r[f"{h}_ratio"] > 0 for r in rows for h in ("gather", "segment", "masked"))


def test_bench_qlora_quick(tmp_path):
  # The 7B memory analysis (--no-7b here) compiles three more steps; the
  # memory claim itself is tested in test_nf4.py on a scanned model.
  out = tmp_path / "qlora.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(BENCH, "bench_qlora.py"), "--quick", "--no-7b", "--json",
       str(out)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  res = json.loads(out.read_text())
  # The script asserts that the QLoRA loss is the LoRA loss on the dequantized base.
  assert res["speed"]["qlora_over_lora"] > 0
  assert res["speed"]["quantized_bytes_per_param"] <= 0.52


def test_bench_decode_quick(tmp_path):
  out = tmp_path / "decode.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(BENCH, "bench_decode.py"), "--quick", "--json", str(out)],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  res = json.loads(out.read_text())
  # The script asserts the unmerged step equals the merged one.
  assert res["max_abs_diff"] < 1e-3 and res["ratio"] > 0


def test_bench_variants_quick(tmp_path):
  out = tmp_path / "variants.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(BENCH, "bench_variants.py"), "--quick", "--json", str(out)],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  res = json.loads(out.read_text())
  assert res["dora_over_lora"] > 0 and res["embedding_adapted_over_frozen"] > 0
