"""jlora against qwix inside google-tunix's own ``PeftTrainer``, side by side.

One Tunix Llama 3 (its own model code, unedited; random weights as if
loaded), the same LoRA on both sides: rank 16, alpha 32, on the attention
einsum kernels (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) and the MLP
(``gate_proj``, ``up_proj``, ``down_proj``):

* ``jlora``: ``jlora.nnx.lora(model, spec, example_args=...)``;
* ``qwix``: ``qwix.apply_lora_to_model(model, qwix.LoraProvider(...))``, as
  Tunix's own examples do, with jlora's factors copied into its
  ``lora_a``/``lora_b`` (the same layout and scale), so both compute the same
  function and the script asserts the same first loss.

Each gets a ``PeftTrainer`` with AdamW; the step timed is the trainer's
own jitted step (``trainer.jit_train_and_eval_step()``: ``nnx.jit`` of
``_train_step``, what ``trainer.train`` calls each iteration, without its
progress bar and metrics). Rounds alternate between the two; medians after
warm-up. Memory, two ways:

* XLA's memory analysis of that compiled step (``.lower(...).compile()``
  on the same ``nnx.jit`` function and arguments): arguments + outputs +
  temporaries - donated (aliased) buffers;
* peak RSS (``VmHWM``, Linux) of a fresh process per library (``--no-rss``
  skips it) that builds the model, compiles and runs ``--rss-steps``
  steps; both import the same modules. Importing Tunix peaks higher than a
  small model's training, so the process resets its high-water mark after
  the imports and also reports the peak above the RSS it had then (the
  least of ``--rss-repeats`` alternating runs).

    python benchmarks/bench_tunix.py [--quick] [--rounds 20] [--json out.json]

Needs google-tunix (which brings qwix); see docs/development.md.
"""

from __future__ import annotations

import argparse
import json
import os
from importlib.metadata import version
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import qwix  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.models.llama3 import model as llama  # noqa: E402
from tunix.sft import peft_trainer, utils as sft_utils  # noqa: E402

import jlora  # noqa: E402
import jlora.nnx  # noqa: E402
import harness  # noqa: E402

LIBS = ("jlora", "qwix")
RANK, ALPHA = 16, 32.0
MODULES = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
SIZES = {  # layers, embed, mlp, heads, head_dim, kv heads, vocab, batch, tokens
    "full": dict(num_layers=4, embed_dim=256, hidden_dim=512, num_heads=4, head_dim=64,
                 num_kv_heads=2, vocab_size=512, batch=4, tokens=128),
    "quick": dict(num_layers=2, embed_dim=64, hidden_dim=128, num_heads=4, head_dim=16,
                  num_kv_heads=2, vocab_size=128, batch=2, tokens=16),
}


def _inputs(x):
  mask = x.input_tokens != 0
  return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
          "positions": sft_utils.build_positions_from_mask(mask),
          "attention_mask": sft_utils.make_causal_attn_mask(mask)}


def _batch(size: dict):
  tokens = np.random.default_rng(0).integers(1, size["vocab_size"],
                                             (size["batch"], size["tokens"])).astype(np.int32)
  return peft_trainer.TrainingInput(input_tokens=tokens, input_mask=np.ones_like(tokens, bool))


def _base(size: dict) -> nnx.Module:
  config = llama.ModelConfig(rope_theta=10_000, norm_eps=1e-5,
                             **{k: v for k, v in size.items() if k not in ("batch", "tokens")})
  model = llama.Llama3(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  # Tunix starts some kernels at zero; a loaded model has none.
  nnx.update(model, jax.tree.map(
      lambda w: jnp.asarray(rng.standard_normal(w.shape) / np.sqrt(w.shape[0]), w.dtype)
      if w.ndim > 1 else w, nnx.state(model, nnx.Param)))
  return model


def adapt(lib: str, size: dict, batch, same_factors: bool = True) -> nnx.Module:
  """The base adapted by ``lib``. With ``same_factors``, qwix's factors are
  jlora's (B random, so the adapter matters for the loss check); without,
  each library's own initialisation (and qwix's process builds no jlora)."""
  inputs = _inputs(batch)
  example = (inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"])
  base = _base(size)
  provider = qwix.LoraProvider(module_path=f".*/{MODULES}", rank=RANK, alpha=ALPHA)
  if lib == "qwix" and not same_factors:
    return qwix.apply_lora_to_model(base, provider, *example, rngs=nnx.Rngs(2))
  spec = jlora.LoraSpec(rank=RANK, alpha=ALPHA, targets=fr".*/{MODULES}/(w|kernel)")
  m = jlora.nnx.lora(base, spec, rngs=nnx.Rngs(1), example_args=example)
  rng = np.random.default_rng(1)
  nnx.update(m, jax.tree_util.tree_map_with_path(
      lambda kp, v: jnp.asarray(0.01 * rng.standard_normal(v.shape), v.dtype)
      if jlora.path_str(kp).endswith("/b") else v, nnx.state(m, nnx.LoRAParam)))
  if lib == "jlora":
    return m
  q = qwix.apply_lora_to_model(nnx.clone(base), provider, *example, rngs=nnx.Rngs(2))
  # qwix keeps <w>_lora_a (contracted axes, rank) and <w>_lora_b (rank,
  # other axes) in the weight's axis order, scaled by alpha / rank: jlora's
  # layout for these kernels, which the shape checks below confirm.
  factors = {}
  for path, a in m.adapters().items():
    factors[f"{path}_lora_a"], factors[f"{path}_lora_b"] = a.a, a.b
  state = nnx.state(q, nnx.LoRAParam)
  names = {jlora.path_str(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(state)}
  assert names == set(factors), sorted(names ^ set(factors))

  def copy(kp, v):
    f = factors[jlora.path_str(kp)]
    assert f.shape == v.shape, (jlora.path_str(kp), f.shape, v.shape)
    return f

  nnx.update(q, jax.tree_util.tree_map_with_path(copy, state))
  return q


def trainer_step(model: nnx.Module, batch):
  """The trainer's jitted step on ``batch``, and a function running it."""
  trainer = peft_trainer.PeftTrainer(
      model, optax.adamw(1e-3), peft_trainer.TrainingConfig(eval_every_n_steps=10**9))
  trainer = trainer.with_gen_model_input_fn(_inputs)
  step, _ = trainer.jit_train_and_eval_step()
  example = trainer._prepare_inputs(batch)   # what train() passes the step
  return step, lambda: step(example)[0]


def peak_bytes(step, batch) -> dict:
  """XLA's memory analysis of the step the trainer runs (same function, same
  arguments)."""
  m = step.func.lower(*step.args, batch).compile().memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)
  return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
          "temp": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes, "peak": peak}


def _status_mb(field: str) -> float:
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 1024


def worker(lib: str, size: dict, steps: int) -> None:
  """Builds, compiles and runs ``lib``'s steps; prints its peak RSS (MB),
  whole and above the RSS after the imports."""
  # getrusage's ru_maxrss would carry the parent's peak over fork and exec;
  # VmHWM is this process's own. Importing Tunix (TensorFlow, ...) peaks
  # above what a small model's training adds, so the high-water mark is
  # then reset (Linux >= 4.0) to measure the training's own peak.
  imports = _status_mb("VmHWM")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  start = _status_mb("VmRSS")
  batch = _batch(size)
  _, run = trainer_step(adapt(lib, size, batch, same_factors=False), batch)
  for _ in range(steps):
    jax.block_until_ready(run())
  peak = _status_mb("VmHWM")
  print(json.dumps({"lib": lib, "peak_rss_mb": max(imports, peak),
                    "peak_over_imports_mb": peak - start}))


def rss(size_name: str, steps: int, repeats: int) -> dict[str, dict]:
  """Each library's worker, ``repeats`` times, alternating; the least of
  each figure (XLA's compile makes single peaks vary by tens of MB)."""
  runs: dict[str, list[dict]] = {lib: [] for lib in LIBS}
  for _ in range(repeats):
    for lib in LIBS:
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", lib,
                             "--size", size_name, "--rss-steps", str(steps)],
                            capture_output=True, text=True, timeout=900)
      assert proc.returncode == 0, proc.stderr[-3000:]
      runs[lib].append(json.loads(proc.stdout.strip().splitlines()[-1]))
  return {lib: {k: min(r[k] for r in rs) for k in ("peak_rss_mb", "peak_over_imports_mb")}
          | {"runs": rs} for lib, rs in runs.items()}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--rounds", type=int, default=20)
  parser.add_argument("--rss-steps", type=int, default=5)
  parser.add_argument("--rss-repeats", type=int, default=2)
  parser.add_argument("--no-rss", action="store_true")
  parser.add_argument("--worker", choices=LIBS)
  parser.add_argument("--size", choices=SIZES)
  parser.add_argument("--json")
  opts = parser.parse_args()
  size_name = opts.size or ("quick" if opts.quick else "full")
  size = SIZES[size_name]
  if opts.worker:
    return worker(opts.worker, size, opts.rss_steps)

  batch = _batch(size)
  models = {lib: adapt(lib, size, batch) for lib in LIBS}
  loss = lambda m: float(peft_trainer._default_loss_fn(m, **_inputs(batch)))  # noqa: E731
  first_loss = {lib: loss(m) for lib, m in models.items()}
  np.testing.assert_allclose(first_loss["jlora"], first_loss["qwix"], rtol=1e-5)
  steps = {lib: trainer_step(m, batch) for lib, m in models.items()}
  memory = {lib: peak_bytes(step, batch) for lib, (step, _) in steps.items()}
  times = harness.interleaved({lib: run for lib, (_, run) in steps.items()}, opts.rounds,
                              block=jax.block_until_ready)
  after = {lib: loss(m) for lib, m in models.items()}
  np.testing.assert_allclose(after["jlora"], after["qwix"], rtol=1e-4)   # the same run
  result = {
      "machine": harness.machine(), "backend": jax.default_backend(),
      "versions": {p: version(p) for p in ("google-tunix", "qwix", "jax", "flax")},
      "model": dict(size, rank=RANK, alpha=ALPHA, family="tunix Llama3"),
      "trainable": {lib: sum(v.size for v in jax.tree.leaves(nnx.state(m, nnx.LoRAParam)))
                    for lib, m in models.items()},
      "first_loss": first_loss, "loss_after": after, "rounds": opts.rounds,
      "step_ms": {k: 1e3 * v for k, v in times.items()},
      "step_jlora_over_qwix": times["jlora"] / times["qwix"],
      "xla_bytes": memory,
      "xla_peak_jlora_over_qwix": memory["jlora"]["peak"] / memory["qwix"]["peak"],
      "xla_temp_jlora_over_qwix": memory["jlora"]["temp"] / memory["qwix"]["temp"],
  }
  if not opts.no_rss:
    result["rss"] = rss(size_name, opts.rss_steps, opts.rss_repeats)
  print(f"machine: {result['machine']}; tunix {result['versions']['google-tunix']}, "
        f"qwix {result['versions']['qwix']}")
  print(f"{'':28}{'jlora':>12}{'qwix':>12}{'jlora/qwix':>12}")
  rows = [("train step, median ms", result["step_ms"]),
          ("XLA peak, MiB", {k: v["peak"] / 2**20 for k, v in memory.items()}),
          ("XLA temporaries, MiB", {k: v["temp"] / 2**20 for k, v in memory.items()})]
  if "rss" in result:
    rows.append(("peak RSS, MB", {k: v["peak_rss_mb"] for k, v in result["rss"].items()}))
    rows.append(("  training's, above imports", {k: v["peak_over_imports_mb"]
                                                  for k, v in result["rss"].items()}))
  for name, row in rows:
    print(f"{name:28}{row['jlora']:12.2f}{row['qwix']:12.2f}{row['jlora'] / row['qwix']:12.3f}")
  print(f"first loss: {first_loss}; after {opts.rounds + 2} steps: {after}")
  harness.write_json(opts.json, result)


if __name__ == "__main__":
  main()
