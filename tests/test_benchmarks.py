"""The benchmark scripts still run (tiny sizes; no timing is asserted here)."""

import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def test_bench_lora_quick(tmp_path):
  sys.path.insert(0, BENCH)
  try:
    import bench_lora
    res = bench_lora.main(["--quick", "--json", str(tmp_path / "out.json")])
  finally:
    sys.path.remove(BENCH)
  assert (tmp_path / "out.json").exists()
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
