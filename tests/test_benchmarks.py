"""The benchmark scripts still run (tiny sizes; no timing is asserted here).

Each runs in a subprocess: benchmarks/models.py would clash with
tests/models.py in this process. The scripts that need only JAX run one after
the other in one interpreter (``runpy``, each as ``__main__`` with its own
command line), so JAX, Flax and jlora are imported once and the small programs
they share (eager ops, the rank-4 factor initialisation) are compiled once;
each test still reads its own script's JSON and fails on its own error.
``profile_step.py`` sets XLA_FLAGS before importing JAX and imports PyTorch, and
``peers.py`` starts a process per library: those run on their own.
"""

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")

# script: its --quick command line, run together by the `jax_scripts` fixture.
JAX_ONLY = {
    "bench_lora.py": ("--quick",),
    "bench_bank.py": ("--quick", "--rounds", "1"),
    # The 7B memory analysis (--no-7b here) compiles three more steps; the
    # memory claim itself is tested in test_nf4.py on a scanned model.
    "bench_qlora.py": ("--quick", "--no-7b"),
    "bench_decode.py": ("--quick",),
    "bench_variants.py": ("--quick",),
}

# Runs each [script, json, *args] of argv[1] as __main__; a script's exception
# (one of its own asserts included) goes to <json>.err and the next one runs.
_RUNNER = """
import json, runpy, sys, traceback
for script, out, *args in json.loads(sys.argv[1]):
  sys.argv = [script, *args, "--json", out]
  try:
    runpy.run_path(script, run_name="__main__")
  except BaseException as e:
    if not (isinstance(e, SystemExit) and e.code in (0, None)):
      with open(out + ".err", "w") as f:
        f.write(traceback.format_exc())
"""


@pytest.fixture(scope="module")
def jax_scripts(tmp_path_factory):
  """Runs every JAX_ONLY script once, in one interpreter: (folder, process)."""
  d = tmp_path_factory.mktemp("bench")
  plan = [[os.path.join(BENCH, s), str(d / f"{s}.json"), *a] for s, a in JAX_ONLY.items()]
  proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(plan)],
                        capture_output=True, text=True, timeout=1200)
  return d, proc


def script_result(jax_scripts, script: str) -> dict:
  """What ``script`` (of JAX_ONLY) wrote, or its error."""
  d, proc = jax_scripts
  err = d / f"{script}.json.err"
  assert not err.exists(), err.read_text()[-3000:]
  out = d / f"{script}.json"
  assert out.exists(), f"exit {proc.returncode}: {proc.stderr[-2000:]}"
  return json.loads(out.read_text())


def run_script(tmp_path, script: str, *args: str, timeout: int = 300) -> dict:
  """Runs ``benchmarks/<script> *args --json F`` and returns what it wrote."""
  out = tmp_path / f"{script}.json"
  proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args, "--json", str(out)],
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(out.read_text())


def test_bench_lora_quick(jax_scripts):
  res = script_result(jax_scripts, "bench_lora.py")
  # The script itself asserts merged == unmerged; the ratios must be real numbers.
  assert res["max_abs_diff_merged_vs_unmerged"] < 1e-3
  assert res["train_step_ratio"] > 0 and res["forward_ratio"] > 0


def test_peers_quick_jlora(tmp_path):
  (row,) = run_script(tmp_path, "peers.py", "--quick", "--libs", "jlora")["results"]
  assert row["lib"] == "jlora" and row["status"] == "ok", row
  assert row["dense_w0_grad"] is False
  assert row["loss_final"] < row["loss_step0"]


def test_bench_bank_quick(jax_scripts):
  rows = script_result(jax_scripts, "bench_bank.py")["rows"]
  # The script asserts each strategy's rows equal their adapters' merged models.
  assert {r["adapters"] for r in rows} == {4}
  assert all(r[f"{h}_ratio"] > 0 for r in rows for h in ("gather", "segment", "masked"))


def test_bench_qlora_quick(jax_scripts):
  res = script_result(jax_scripts, "bench_qlora.py")
  # The script asserts that the QLoRA loss is the LoRA loss on the dequantized base.
  assert res["speed"]["qlora_over_lora"] > 0
  assert res["speed"]["quantized_bytes_per_param"] <= 0.52


def test_bench_decode_quick(jax_scripts):
  res = script_result(jax_scripts, "bench_decode.py")
  # The script asserts the unmerged step equals the merged one.
  assert res["max_abs_diff"] < 1e-3 and res["ratio"] > 0


def test_bench_variants_quick(jax_scripts):
  res = script_result(jax_scripts, "bench_variants.py")
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


def test_bench_tunix_quick(tmp_path):
  # Runs where google-tunix is installed (docs/development.md), skipped in CI.
  pytest.importorskip("tunix")
  pytest.importorskip("qwix")
  res = run_script(tmp_path, "bench_tunix.py", "--quick", "--rounds", "1", "--no-rss",
                   timeout=600)
  # The script asserts the same first loss and the same loss after the steps.
  assert res["first_loss"]["jlora"] == pytest.approx(res["first_loss"]["qwix"], rel=1e-5)
  assert res["step_jlora_over_qwix"] > 0 and res["xla_peak_jlora_over_qwix"] > 0
