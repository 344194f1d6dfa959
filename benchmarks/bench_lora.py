"""jlora against full fine-tuning and the merged forward, side by side.

One run, one process, one model (the decoder-only LM of models.py: d_model
512, 4 layers, batch 8 x 256 tokens, LoRA r=16 on q, k, v, o, up, down):

* train step: jlora LoRA step (loss, grads of A and B, AdamW on A and B)
  against the full fine-tune step (grads of every weight, AdamW on all);
* forward: the unmerged jlora forward against the forward of the merged
  parameters;
* compile time of the jitted train step with and without the transform.

Timings alternate between the two sides of each ratio, round by round, so
drift in machine load hits both alike; the medians are reported.

    python benchmarks/bench_lora.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
import harness  # noqa: E402
import models  # noqa: E402




def build(cfg: models.ModelConfig, rank: int, alpha: float):
  model = models.LinenLM(cfg)
  params = jax.tree.map(jnp.asarray, {"params": models.to_linen(models.init_params(cfg))})
  spec = jlora.LoraSpec(rank=rank, alpha=alpha, targets=r".*/(q|k|v|o|up|down)/kernel")
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  # Non-zero B, as after some training, so no path is trivially zero.
  trainable = jax.tree.map(lambda x: x + 1e-3, trainable)
  return model, params, frozen, trainable, spec


def make_steps(model, params, frozen, trainable):
  apply_lora = jlora.lora(model.apply)
  tx_full = optax.adamw(1e-4)
  tx_lora = jlora.optimizer(optax.adamw(1e-4), trainable)

  def xent(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  def full_step(params, opt_state, tokens, targets):
    loss, grads = jax.value_and_grad(lambda p: xent(model.apply(p, tokens), targets))(params)
    updates, opt_state = tx_full.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def lora_step(trainable, opt_state, frozen, tokens, targets):
    loss, grads = jax.value_and_grad(
        lambda t: xent(apply_lora(frozen, t, tokens), targets))(trainable)
    updates, opt_state = tx_lora.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  def merged_forward(params, tokens):
    return model.apply(params, tokens)

  def lora_forward(frozen, trainable, tokens):
    return apply_lora(frozen, trainable, tokens)

  return dict(full_step=full_step, lora_step=lora_step, merged_forward=merged_forward,
              lora_forward=lora_forward, tx_full=tx_full, tx_lora=tx_lora)


def _compile(fn, *args, donate=()):
  t0 = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  return compiled, time.perf_counter() - t0


def _time(fn, *args):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def run(cfg: models.ModelConfig, rank: int, alpha: float, rounds: int) -> dict:
  model, params, frozen, trainable, spec = build(cfg, rank, alpha)
  steps = make_steps(model, params, frozen, trainable)
  tokens, targets = (jnp.asarray(a[0]) for a in models.make_batches(cfg, 1))
  merged = jlora.merge(frozen, trainable)

  full_state = steps["tx_full"].init(params)
  lora_state = steps["tx_lora"].init(trainable)
  full_c, full_compile = _compile(steps["full_step"], params, full_state, tokens, targets)
  lora_c, lora_compile = _compile(steps["lora_step"], trainable, lora_state, frozen, tokens,
                                  targets)
  merged_c, _ = _compile(steps["merged_forward"], merged, tokens)
  unmerged_c, _ = _compile(steps["lora_forward"], frozen, trainable, tokens)

  # Correctness first: the two forwards agree and the first losses agree.
  diff = float(jnp.max(jnp.abs(merged_c(merged, tokens) - unmerged_c(frozen, trainable, tokens))))
  assert diff < 1e-3, f"merged and unmerged forwards differ by {diff}"

  times = {k: [] for k in ("full_step", "lora_step", "merged_forward", "lora_forward")}
  for _ in range(2):  # warm-up
    full_c(params, full_state, tokens, targets)
    lora_c(trainable, lora_state, frozen, tokens, targets)
  for _ in range(rounds):
    times["full_step"].append(_time(full_c, params, full_state, tokens, targets))
    times["lora_step"].append(_time(lora_c, trainable, lora_state, frozen, tokens, targets))
    times["merged_forward"].append(_time(merged_c, merged, tokens))
    times["lora_forward"].append(_time(unmerged_c, frozen, trainable, tokens))
  med = {k: statistics.median(v) for k, v in times.items()}
  summary = jlora.summary(params, spec)
  return {
      "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
      "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "config": {"d_model": cfg.d_model, "layers": cfg.n_layers, "heads": cfg.n_heads,
                 "batch": cfg.batch, "seq": cfg.seq_len, "rank": rank, "alpha": alpha},
      "trainable_percent": summary.trainable_percent,
      "median_s": med,
      "train_step_ratio": med["lora_step"] / med["full_step"],
      "forward_ratio": med["lora_forward"] / med["merged_forward"],
      "compile_s": {"full_step": full_compile, "lora_step": lora_compile},
      "compile_ratio": lora_compile / full_compile,
      "max_abs_diff_merged_vs_unmerged": diff,
      "rounds": rounds,
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
  ap.add_argument("--rounds", type=int, default=20)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--json", default=None, help="write the results here")
  args = ap.parse_args(argv)
  cfg = models.ModelConfig.quick() if args.quick else models.ModelConfig()
  res = run(cfg, args.rank if not args.quick else 4, 2.0 * (args.rank if not args.quick else 4),
            3 if args.quick else args.rounds)
  m = res["median_s"]
  print(f"jlora benchmark on {res['device']} ({res['machine']}), jax {res['jax']}")
  print(f"{'what':<28}{'jlora':>12}{'reference':>12}{'ratio':>8}")
  print(f"{'train step (LoRA/full)':<28}{m['lora_step'] * 1e3:>10.1f}ms{m['full_step'] * 1e3:>10.1f}ms"
        f"{res['train_step_ratio']:>8.3f}")
  print(f"{'forward (unmerged/merged)':<28}{m['lora_forward'] * 1e3:>10.1f}ms"
        f"{m['merged_forward'] * 1e3:>10.1f}ms{res['forward_ratio']:>8.3f}")
  c = res["compile_s"]
  print(f"{'compile (LoRA/full step)':<28}{c['lora_step']:>11.2f}s{c['full_step']:>11.2f}s"
        f"{res['compile_ratio']:>8.3f}")
  harness.write_json(args.json, res)
  return res


if __name__ == "__main__":
  main()
