"""The accelerator protocol: every measurement that needs a GPU, in one run, one JSON file.

Run on a machine with one GPU and a CUDA build of JAX matching the CPU one
(``pip install "jax[cuda12]==<jax version>"``), from the repository root:

    bash benchmarks/accelerator.sh [OUT.json]          # the protocol, < 8 minutes
    python benchmarks/accelerator.py --cpu-smoke       # tiny sizes on the CPU

Each part runs in its own interpreter with its own deadline (the whole run
stays under ``--budget-s``, 450 s by default; a part that would not fit is
recorded as skipped, one that fails as failed, and the others still run):

* ``core``: ``bench_lora.py``: LoRA train step / full fine-tune step and
  unmerged / merged forward on the benchmark LM (d_model 512, float32 at
  full matmul precision), plus any other ratio that script reports (e.g. a
  decode step);
* ``hlo``: the dW0 check on the device's own compiled program: no dot (nor
  cuBLAS gemm custom-call) of the LoRA step produces a frozen weight's
  shape, while the full fine-tune step's do (the readers of tests/hlo.py);
* ``bf16_d2048`` and ``bf16_d4096``: the same two ratios on the same LM at
  realistic sizes, bf16 weights (d_model 2048, 4 layers, batch 8 x 512;
  d_model 4096, 2 layers, batch 4 x 512), r=16 adapters in float32;
* ``qlora``: ``bench_qlora.py --no-7b``: QLoRA step / LoRA step (skipped if
  the script is absent);
* ``bank``: ``bench_bank.py``: the mixed-adapter ratios of the three bank
  strategies (skipped if absent).

The JSON holds the device, the versions, each part's status, wall time and
results, and the floors of issue 12 on a GPU (LoRA / full step <= 0.75,
unmerged / merged forward <= 1.08) with whether each holds. Nothing is
asserted about timings on the CPU (``--cpu-smoke`` only proves the protocol
runs end to end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FLOORS = {"train_step_ratio": 0.75, "forward_ratio": 1.08}

# name: (script, protocol args, smoke args, seconds allowed, seconds in the smoke run)
SCRIPT_PARTS = {
    "core": ("bench_lora.py", ["--rounds", "10"], ["--quick"], 90, 120),
    "qlora": ("bench_qlora.py", ["--no-7b", "--rounds", "10"], ["--quick", "--no-7b"], 70, 180),
    "bank": ("bench_bank.py", ["--rounds", "3"], ["--quick", "--rounds", "1"], 90, 240),
}
# The scripts' float32 models check merged against unmerged outputs to 1e-3
# or closer, which TF32 matmuls (a GPU's default for float32) would not meet:
# they run at full float32 precision, both sides of every ratio alike. The
# bf16 parts run at the default precision, as training in bf16 does.
SCRIPT_ENV = {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}
# name: (d_model, layers, heads, batch, seq, rounds) at protocol and smoke sizes
BF16_PARTS = {
    "bf16_d2048": ((2048, 4, 16, 8, 512, 10), (64, 2, 4, 2, 32, 1), 70, 120),
    "bf16_d4096": ((4096, 2, 32, 4, 512, 10), (96, 2, 4, 2, 32, 1), 90, 120),
}
OWN_PARTS = {"hlo": (45, 120)}
# In order of importance: a part that would overrun the budget is skipped.
PARTS = ("core", "hlo", "bf16_d2048", "bf16_d4096", "qlora", "bank")


def part_command(name: str, smoke: bool, out: str) -> list[str] | None:
  """The command line of a part; None when its script does not exist."""
  if name in SCRIPT_PARTS:
    script, args, smoke_args, _, _ = SCRIPT_PARTS[name]
    path = os.path.join(HERE, script)
    if not os.path.exists(path):
      return None
    return [sys.executable, path, *(smoke_args if smoke else args), "--json", out]
  extra = ["--cpu-smoke"] if smoke else []
  return [sys.executable, os.path.abspath(__file__), "--part", name, "--part-json", out, *extra]


def part_budget(name: str, smoke: bool) -> int:
  for table in (SCRIPT_PARTS, BF16_PARTS, OWN_PARTS):
    if name in table:
      row = table[name]
      return row[-1] if smoke else row[-2]
  raise KeyError(name)


def script_flags(script: str) -> set[str]:
  """The ``--flags`` a benchmark script's argparse declares (read from its source)."""
  with open(os.path.join(HERE, script)) as f:
    return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", f.read()))


# -- the parts this file runs itself ----------------------------------------------------------


def run_bf16(name: str, smoke: bool) -> dict:
  """LoRA / full step and unmerged / merged forward of the benchmark LM, bf16 weights."""
  import statistics

  sys.path.insert(0, HERE)
  import jax
  import jax.numpy as jnp

  import bench_lora
  import jlora
  import models

  d, layers, heads, batch, seq, rounds = BF16_PARTS[name][1 if smoke else 0]
  cfg = models.ModelConfig(d_model=d, n_layers=layers, n_heads=heads, seq_len=seq, batch=batch)
  rank = 4 if smoke else 16
  model = models.LinenLM(cfg)
  tokens, targets = (jnp.asarray(a[0]) for a in models.make_batches(cfg, 1))
  # Flax's initialisers, on the device (models.init_params is a slow NumPy
  # init at these sizes), then every weight in bf16.
  params = jax.jit(model.init)(jax.random.key(0), tokens)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  spec = jlora.LoraSpec(rank=rank, alpha=2.0 * rank, targets=r".*/(q|k|v|o|up|down)/kernel")
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(1))
  trainable = jax.tree.map(lambda x: x + 1e-3, trainable)
  steps = bench_lora.make_steps(model, params, frozen, trainable)
  merged = jlora.merge(frozen, trainable)
  full_state = steps["tx_full"].init(params)
  lora_state = steps["tx_lora"].init(trainable)
  full_c, full_compile = bench_lora._compile(steps["full_step"], params, full_state, tokens,
                                             targets)
  lora_c, lora_compile = bench_lora._compile(steps["lora_step"], trainable, lora_state, frozen,
                                             tokens, targets)
  merged_c, _ = bench_lora._compile(steps["merged_forward"], merged, tokens)
  unmerged_c, _ = bench_lora._compile(steps["lora_forward"], frozen, trainable, tokens)
  a = merged_c(merged, tokens).astype(jnp.float32)
  b = unmerged_c(frozen, trainable, tokens).astype(jnp.float32)
  diff = float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-6))
  times = {k: [] for k in ("full_step", "lora_step", "merged_forward", "lora_forward")}
  for _ in range(2):
    bench_lora._time(full_c, params, full_state, tokens, targets)
    bench_lora._time(lora_c, trainable, lora_state, frozen, tokens, targets)
  for _ in range(rounds):
    times["full_step"].append(bench_lora._time(full_c, params, full_state, tokens, targets))
    times["lora_step"].append(bench_lora._time(lora_c, trainable, lora_state, frozen, tokens,
                                               targets))
    times["merged_forward"].append(bench_lora._time(merged_c, merged, tokens))
    times["lora_forward"].append(bench_lora._time(unmerged_c, frozen, trainable, tokens))
  med = {k: statistics.median(v) for k, v in times.items()}
  return {"config": {"d_model": d, "layers": layers, "heads": heads, "batch": batch, "seq": seq,
                     "rank": rank, "dtype": "bfloat16"},
          "params": sum(x.size for x in jax.tree.leaves(params)),
          "median_s": med, "train_step_ratio": med["lora_step"] / med["full_step"],
          "forward_ratio": med["lora_forward"] / med["merged_forward"],
          "compile_s": {"full_step": full_compile, "lora_step": lora_compile},
          "merged_vs_unmerged_rel_diff": diff, "rounds": rounds}


def run_hlo(smoke: bool) -> dict:
  """No frozen-weight-shaped dot in the device's compiled LoRA step; the full
  step has them (the control)."""
  # One size: the check is about shapes, not speed.
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  sys.path.insert(0, HERE)
  import jax
  import jax.numpy as jnp

  import hlo
  import jlora
  import models

  # 48, 192, 256, 32: no activation has a weight's shape; two blocks, 12 adapted weights.
  cfg = models.ModelConfig.quick(n_layers=2)
  model = models.LinenLM(cfg)
  tokens = jnp.asarray(models.make_batches(cfg, 1)[0][0][:3])
  if smoke:
    # The canonical NumPy weights: instant at this size, where compiling Flax's
    # initialiser on the CPU took as long as a step (the check reads shapes only).
    params = jax.tree.map(jnp.asarray, {"params": models.to_linen(models.init_params(cfg))})
  else:
    params = jax.jit(model.init)(jax.random.key(0), tokens)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=r".*/(q|k|v|o|up|down)/kernel")
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(1))
  lora_text = hlo.lora_step_hlo(model.apply, frozen, trainable, (tokens,))
  full_text = hlo.full_step_hlo(model.apply, params, (tokens,))
  adapted = sum(1 for x in jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(
      x, jlora.LoraParam)) if isinstance(x, jlora.LoraParam))
  found_full = {n for _, names in hlo.weight_shaped_dots(full_text, frozen, trainable)
                for n in names}
  lora_hits = hlo.weight_shaped_dots(lora_text, frozen, trainable)
  return {"backend": jax.default_backend(),
          "lora_dots": len(hlo.dot_result_shapes(lora_text)),
          "lora_gemm_custom_calls": len(hlo._GEMM_CALL.findall(lora_text)),
          "lora_weight_shaped_dots": [[list(s), n] for s, n in lora_hits],
          "full_weights_with_dw_dots": len(found_full), "adapted_weights": adapted,
          "ok": not lora_hits and len(found_full) >= adapted}


def check_own_parts() -> list[str]:
  """What the bf16 and hlo parts use of the other benchmark files and of
  tests/hlo.py, checked without compiling anything: the problems found."""
  import dataclasses
  import inspect
  sys.path.insert(0, HERE)
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import bench_lora
  import hlo
  import models
  problems = []
  want = {bench_lora: {"make_steps": ["model", "params", "frozen", "trainable"],
                       "_compile": None, "_time": None},
          models: {"LinenLM": None, "make_batches": None},
          hlo: {"lora_step_hlo": None, "full_step_hlo": None, "weight_shaped_dots": None,
                "dot_result_shapes": None, "_GEMM_CALL": None}}
  for module, names in want.items():
    for name, params in names.items():
      obj = getattr(module, name, None)
      if obj is None:
        problems.append(f"{module.__name__}.{name} is gone")
      elif params is not None and list(inspect.signature(obj).parameters) != params:
        problems.append(f"{module.__name__}.{name} takes {list(inspect.signature(obj).parameters)}")
  fields = {f.name for f in dataclasses.fields(models.ModelConfig)}
  missing = {"d_model", "n_layers", "n_heads", "seq_len", "batch"} - fields
  if missing:
    problems.append(f"models.ModelConfig has no {sorted(missing)}")
  return problems


# -- the driver --------------------------------------------------------------------------------


def _device_info() -> dict:
  code = ("import jax, json; d = jax.devices()[0]; print(json.dumps({'backend': "
          "jax.default_backend(), 'device': d.device_kind, 'count': jax.device_count(), "
          "'jax': jax.__version__}))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, env=os.environ.copy())
  if proc.returncode != 0:
    return {"error": proc.stderr[-2000:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _floors(parts: dict, gpu: bool) -> dict:
  out = {}
  for name in ("core", "bf16_d2048", "bf16_d4096"):
    res = parts.get(name, {}).get("result") or {}
    for key, floor in FLOORS.items():
      if key in res:
        value = float(res[key])
        out[f"{name}.{key}"] = {"value": value, "floor": floor,
                                "holds": (value <= floor) if gpu else None}
  return out


def drive(out_path: str, smoke: bool, budget_s: float, parts: list[str], dry_run: bool) -> dict:
  t_start = time.monotonic()
  env = os.environ.copy()
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  if smoke:
    env["JAX_PLATFORMS"] = "cpu"
  # The smoke run is on the CPU by construction (each part records its backend too).
  info = {} if dry_run else {"backend": "cpu", "smoke": True} if smoke else _device_info()
  gpu = info.get("backend") == "gpu"
  report = {"protocol": "jlora accelerator protocol (issue 12)", "smoke": smoke,
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "python":
            platform.python_version(), "device": info, "budget_s": budget_s, "parts": {}}
  if not smoke and not dry_run and not gpu:
    report["error"] = (f"no GPU: JAX's backend is {info.get('backend')!r} "
                       f"({info.get('error', '')[:300]}); install a CUDA build of JAX, or "
                       f"pass --cpu-smoke")
  out_dir = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(out_dir, exist_ok=True)
  for name in parts:
    part_json = os.path.join(out_dir, f".accelerator.{name}.json")
    cmd = part_command(name, smoke, part_json)
    entry: dict = {"command": None if cmd is None else cmd[1:]}
    report["parts"][name] = entry
    if cmd is None:
      entry["status"] = "skipped: script absent"
      continue
    if name in SCRIPT_PARTS:
      missing = {a for a in cmd[2:] if a.startswith("--")} - script_flags(SCRIPT_PARTS[name][0])
      if missing:
        entry["status"] = f"failed: {SCRIPT_PARTS[name][0]} has no flag {sorted(missing)}"
        continue
    if dry_run:
      entry["status"] = "dry run"
      continue
    if "error" in report:
      entry["status"] = "skipped: no GPU"
      continue
    left = budget_s - (time.monotonic() - t_start)
    allowed = min(part_budget(name, smoke), left)
    if allowed < 15:
      entry["status"] = f"skipped: {left:.0f} s left of the budget"
      continue
    if os.path.exists(part_json):
      os.remove(part_json)
    part_env = {**env, **SCRIPT_ENV} if name in SCRIPT_PARTS and not smoke else env
    if name in SCRIPT_PARTS and not smoke:
      entry["env"] = SCRIPT_ENV
    t0 = time.monotonic()
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=allowed, env=part_env,
                            cwd=ROOT)
      entry["returncode"] = proc.returncode
      entry["stdout_tail"] = proc.stdout[-1500:]
      if proc.returncode == 0 and os.path.exists(part_json):
        with open(part_json) as f:
          entry["result"] = json.load(f)
        entry["status"] = "ok"
      else:
        entry["status"] = "failed"
        entry["stderr_tail"] = proc.stderr[-3000:]
    except subprocess.TimeoutExpired:
      entry["status"] = f"failed: over its {allowed:.0f} s"
    entry["wall_s"] = time.monotonic() - t0
    if os.path.exists(part_json):
      os.remove(part_json)
  if dry_run:
    report["own_parts_problems"] = check_own_parts()
  report["floors"] = _floors(report["parts"], gpu)
  report["wall_s"] = time.monotonic() - t_start
  report["all_ok"] = (all(p.get("status") in ("ok", "skipped: script absent", "dry run")
                          for p in report["parts"].values())
                      and "error" not in report and not report.get("own_parts_problems"))
  with open(out_path, "w") as f:
    json.dump(report, f, indent=2, default=str)
  return report


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=os.path.join(HERE, "out", "accelerator.json"))
  ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
  ap.add_argument("--budget-s", type=float, default=450.0)
  ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
  ap.add_argument("--dry-run", action="store_true",
                  help="check every part's command (scripts and flags), run nothing")
  ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--part-json", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.part is not None:   # one part, in its own interpreter
    res = run_hlo(args.cpu_smoke) if args.part == "hlo" else run_bf16(args.part, args.cpu_smoke)
    with open(args.part_json, "w") as f:
      json.dump(res, f, indent=2, default=str)
    return 0 if res.get("ok", True) else 1
  parts = [p for p in args.parts.split(",") if p]
  unknown = set(parts) - set(PARTS)
  if unknown:
    ap.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
  report = drive(args.out, args.cpu_smoke, args.budget_s, parts, args.dry_run)
  for name, entry in report["parts"].items():
    print(f"{name:<12}{entry['status']:<40}{entry.get('wall_s', 0):>8.1f} s")
  for key, f in report["floors"].items():
    holds = {True: "holds", False: "FAILS", None: "(no floor off a GPU)"}[f["holds"]]
    print(f"{key:<32}{f['value']:>8.3f}  floor {f['floor']}  {holds}")
  print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
  return 0 if report["all_ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
