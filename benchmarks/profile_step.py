"""Where a training step's time goes: jlora and XLA against PEFT and PyTorch.

On the benchmark LM of models.py (d_model 512, 4 layers, batch 8 x 256, LoRA
r=16 on q, k, v, o, up, down, AdamW), four steps are profiled op by op:

* jlora's LoRA step and XLA's full fine-tune step (``jax.profiler`` with
  XLA:CPU's per-thunk trace events, each thunk named after its HLO
  instruction and classed from the compiled HLO: projection matmuls,
  attention matmuls, reductions (norms, softmax, loss), copies and
  transposes, elementwise);
* PEFT's LoRA step and PyTorch's full step (``torch.profiler``, classed by
  ATen op).

Then the four steps are timed in interleaved rounds, so the full-step ratio
(XLA / PyTorch) separates what XLA:CPU costs from what the transform costs,
and the jlora step is timed under other XLA:CPU flags (each in its own
process: XLA reads its flags when it starts).

Needs ``xprof`` (``pip install xprof``) to read JAX's trace; without it the
op tables are skipped and only timings are printed.

    python benchmarks/profile_step.py [--quick] [--rounds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_cpu_enable_xprof_traceme" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_cpu_enable_xprof_traceme=true"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_lora  # noqa: E402
import harness  # noqa: E402
import models  # noqa: E402

FLAG_SETS = {
    "default": "",
    "ynn fusions off": "--xla_cpu_experimental_ynn_fusion_type=",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn": "--xla_cpu_use_onednn=true",
}

# -- JAX: classing HLO instructions -------------------------------------------------------

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\((.*)$")


RANK = 16
LOW_RANK = "matmul: low-rank (a dim of r)"


def _has_dim(shapes_text: str, size: int | None) -> bool:
  return size is not None and any(
      size in map(int, dims.split(",")) for dims in re.findall(r"\[([\d, ]+)\]", shapes_text))


def hlo_classes(hlo: str, rank: int | None = None) -> dict[str, str]:
  """Entry instruction name -> class, from the compiled HLO text.

  With ``rank``, a dot with a dimension of that size is a low-rank dot (the
  benchmark LM has no other dimension of 16).
  """
  comps: dict[str, list[str]] = {}
  current = None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(", line)
    if m and line.rstrip().endswith("{"):
      current = "ENTRY" if line.startswith("ENTRY") else m.group(1)
      comps[current] = []
    elif current is not None:
      comps[current].append(line)

  def body(comp: str, seen=()) -> str:
    text = "\n".join(comps.get(comp, []))
    for called in re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", text):
      if called not in seen:
        text += "\n" + body(called, seen + (comp,))
    return text

  out = {}
  for line in comps.get("ENTRY", []):
    m = _INSTR.match(line)
    if not m:
      continue
    name, _, opcode, rest = m.groups()
    called = re.findall(r"calls=%([\w.\-]+)", rest)
    text = line + "".join("\n" + body(c) for c in called)
    # XLA:CPU's YNNPACK fusions ("ynn_fusion.N") hold reductions as well as dots:
    # class them by their bodies like any fusion.
    if re.search(r"\b(dot|convolution)\(", text) or "gemm" in text:
      batched = re.search(r"lhs_batch_dims=\{\d", text)
      dots = "\n".join(ln.split("metadata=")[0] for ln in text.splitlines()
                       if re.search(r"\b(dot|convolution)\(", ln))
      out[name] = (LOW_RANK if _has_dim(dots, rank) else
                   "matmul: attention (batched)" if batched else "matmul: projections")
    elif re.search(r"\breduce(-window)?\(", text):
      out[name] = "reductions (norms, softmax, loss)"
    elif opcode in ("copy", "transpose") or (called and not re.search(
        r"\b(add|multiply|subtract|divide|exponential|tanh|maximum|select|compare|"
        r"rsqrt|sqrt|log|power|negate|convert)\(", text)):
      out[name] = "copies, transposes, slices"
    elif opcode in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast"):
      continue
    else:
      out[name] = "elementwise"
  return out


def jax_profile(fn, args, steps: int, rank: int | None = None
                ) -> tuple[dict[str, float], float]:
  """ms per step by class, and the traced wall ms per step."""
  from xprof.convert import raw_to_tool_data
  compiled = jax.jit(fn).lower(*args).compile()
  classes = hlo_classes(compiled.as_text(), rank)
  jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    for _ in range(steps):
      jax.block_until_ready(compiled(*args))
    jax.profiler.stop_trace()
    paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    data, _ = raw_to_tool_data.xspace_to_tool_data(paths, "trace_viewer", {})
  events = json.loads(data)
  events = events["traceEvents"] if isinstance(events, dict) else events
  per_thread: dict[str, dict] = collections.defaultdict(lambda: collections.Counter())
  wall = 0.0
  for e in events:
    if e.get("ph") != "X":
      continue
    if e.get("name") == "CommonPjRtLoadedExecutable::ExecuteHelperOnSingleDevice":
      wall += e.get("dur", 0.0)
    if e.get("name") in classes:
      per_thread[e["name"]][e.get("tid")] += e.get("dur", 0.0)
  by_class: dict[str, float] = collections.Counter()
  for name, threads in per_thread.items():
    by_class[classes[name]] += max(threads.values()) / 1e3 / steps   # us -> ms per step
  return dict(by_class), wall / 1e3 / steps


# -- PyTorch ------------------------------------------------------------------------------

_TORCH_CLASSES = [
    (r"aten::(bmm|baddbmm)$", "matmul: attention (batched)"),
    (r"aten::(mm|addmm|matmul|linear)$", "matmul: projections"),
    (r"softmax", "reductions (norms, softmax, loss)"),
    (r"layer_norm|nll_loss|cross_entropy|log_softmax|aten::sum|aten::mean", "reductions (norms, softmax, loss)"),
    (r"Optimizer\.step|_foreach|adamw|aten::lerp|aten::addcdiv|aten::addcmul", "optimizer"),
    (r"aten::(copy_|contiguous|clone|cat|t|transpose|permute|_to_copy|to|fill_|zero_)", "copies, transposes, slices"),
]


def torch_steps(cfg, lora: bool):
  import torch
  import peft
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  model = models.TorchLM(cfg)
  models.load_torch(model, models.init_params(cfg))
  if lora:
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules=list(models.PROJ_NAMES), lora_dropout=0.0))
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4)
  xs, ys = (torch.from_numpy(a[0]).long() for a in models.make_batches(cfg, 1))

  def step():
    logits = model(xs)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()

  return step


def torch_profile(step, steps: int, rank: int | None = None) -> dict[str, float]:
  import torch
  from torch.profiler import ProfilerActivity, profile
  step()
  with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    for _ in range(steps):
      step()
  by_class: dict[str, float] = collections.Counter()
  # Self times (each op's own, not its children's), so nothing counts twice; an
  # op nested in another (aten::mm under aten::matmul) holds the time, and an
  # op anywhere under the optimizer's step (its sqrt, mul, ...) is the optimizer's.
  for ev in prof.events():
    parent, under_optimizer = ev.cpu_parent, False
    while parent is not None and not under_optimizer:
      under_optimizer = parent.name.startswith("Optimizer.step")
      parent = parent.cpu_parent
    cls = "optimizer" if under_optimizer else None
    for pattern, name_cls in _TORCH_CLASSES:
      if cls is None and re.search(pattern, ev.name, re.I):
        cls = name_cls
    if cls is None and (ev.name.startswith("aten::") or ev.name.startswith("autograd")):
      cls = "elementwise and other"
    if cls == "matmul: projections" and _has_dim(str(ev.input_shapes), rank):
      cls = LOW_RANK
    if cls is not None:
      by_class[cls] += ev.self_cpu_time_total / 1e3 / steps
  del torch
  return dict(by_class)


# -- runs -----------------------------------------------------------------------------------


def jax_steps(cfg):
  model, params, frozen, trainable, _ = bench_lora.build(cfg, RANK, 2.0 * RANK)
  steps = bench_lora.make_steps(model, params, frozen, trainable)
  tokens, targets = (jnp.asarray(a[0]) for a in models.make_batches(cfg, 1))
  lora = (steps["lora_step"], (trainable, steps["tx_lora"].init(trainable), frozen, tokens,
                               targets))
  full = (steps["full_step"], (params, steps["tx_full"].init(params), tokens, targets))
  return lora, full


def flag_timings(quick: bool, rounds: int) -> dict[str, dict[str, float]]:
  """jlora's LoRA step and XLA's full step under each XLA flag set."""
  out = {}
  for name, flags in FLAG_SETS.items():
    env = dict(os.environ, XLA_FLAGS=flags)
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        "bench_lora.py"), "--rounds", str(rounds), "--json"]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
      proc = subprocess.run(cmd + [f.name] + (["--quick"] if quick else []), env=env,
                            capture_output=True, text=True, timeout=3600)
      if proc.returncode != 0:
        out[name] = {"error": proc.stderr[-500:]}
        continue
      res = json.load(open(f.name))
    out[name] = {"lora_step_ms": res["median_s"]["lora_step"] * 1e3,
                 "full_step_ms": res["median_s"]["full_step"] * 1e3,
                 "ratio": res["train_step_ratio"]}
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--rounds", type=int, default=10)
  ap.add_argument("--profile-steps", type=int, default=5)
  ap.add_argument("--no-flags", action="store_true", help="skip the XLA flag variants")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  cfg = models.ModelConfig.quick() if args.quick else models.ModelConfig()
  (lora_fn, lora_args), (full_fn, full_args) = jax_steps(cfg)
  jlora_step = jax.jit(lora_fn)
  xla_full = jax.jit(full_fn)
  peft_step, torch_full = torch_steps(cfg, True), torch_steps(cfg, False)
  res = {"machine": harness.machine(), "machine_info": harness.machine_info(),
         "jax": jax.__version__}
  med = harness.interleaved({
      "jlora LoRA": lambda: jax.block_until_ready(jlora_step(*lora_args)),
      "XLA full": lambda: jax.block_until_ready(xla_full(*full_args)),
      "PEFT LoRA": peft_step, "PyTorch full": torch_full}, args.rounds)
  res["median_ms"] = {k: v * 1e3 for k, v in med.items()}
  res["ratios"] = {"jlora / PEFT": med["jlora LoRA"] / med["PEFT LoRA"],
                   "XLA full / PyTorch full": med["XLA full"] / med["PyTorch full"],
                   "jlora LoRA / XLA full": med["jlora LoRA"] / med["XLA full"],
                   "PEFT LoRA / PyTorch full": med["PEFT LoRA"] / med["PyTorch full"]}
  tables = {}
  try:
    tables["jlora LoRA"], _ = jax_profile(lora_fn, lora_args, args.profile_steps, RANK)
    tables["XLA full"], _ = jax_profile(full_fn, full_args, args.profile_steps)
  except ImportError:
    print("xprof is not installed: no JAX op tables", file=sys.stderr)
  tables["PEFT LoRA"] = torch_profile(peft_step, args.profile_steps, RANK)
  tables["PyTorch full"] = torch_profile(torch_full, args.profile_steps)
  res["by_class_ms"] = tables
  if not args.no_flags:
    res["xla_flags"] = flag_timings(args.quick, max(3, args.rounds // 2))

  print(f"Training step profile on {res['machine']}, jax {res['jax']}")
  print(f"{'':<36}" + "".join(f"{k:>14}" for k in res["median_ms"]))
  print(f"{'step (median, interleaved)':<36}" + "".join(
      f"{v:>12.1f}ms" for v in res["median_ms"].values()))
  classes = sorted({c for t in tables.values() for c in t})
  for c in classes:
    print(f"{c:<36}" + "".join(f"{tables[k].get(c, 0.0):>12.1f}ms" if k in tables else
                                f"{'-':>14}" for k in res["median_ms"]))
  print(f"{'sum of the classes':<36}" + "".join(
      f"{sum(tables[k].values()):>12.1f}ms" if k in tables else f"{'-':>14}"
      for k in res["median_ms"]))
  for k, v in res["ratios"].items():
    print(f"{k}: {v:.3f}")
  for name, row in res.get("xla_flags", {}).items():
    if "error" in row:
      print(f"XLA flags {name!r}: error {row['error'][:200]}")
    else:
      print(f"XLA flags {name!r}: jlora LoRA {row['lora_step_ms']:.1f} ms, XLA full "
            f"{row['full_step_ms']:.1f} ms, ratio {row['ratio']:.3f}")
  harness.write_json(args.json, res)
  return res


if __name__ == "__main__":
  main()
