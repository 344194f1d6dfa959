"""Decoding with a KV cache: the unmerged (jlora) step against the merged one.

One token per sequence through the decoder LM of models.py (d_model 512, 4
layers, a 256-position cache, 8 sequences), LoRA r=16 on q, k, v, o, up and
down. At one token per sequence the low-rank path's share of the work is
largest: the base matmuls are 8 rows each. Rounds alternate between the two
steps; medians are reported.

    python benchmarks/bench_decode.py [--quick] [--rounds 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jlora  # noqa: E402
import models  # noqa: E402
import harness  # noqa: E402

TARGETS = r".*/(q|k|v|o|up|down)/kernel"


def run(cfg: models.ModelConfig, batch: int, rank: int, rounds: int) -> dict:
  params = jax.tree.map(jnp.asarray, {"params": models.to_linen(models.init_params(cfg))})
  spec = jlora.LoraSpec(rank=rank, alpha=2.0 * rank, targets=TARGETS)
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  trainable = jax.tree_util.tree_map(lambda x: x + 1e-3, trainable)
  merged = jlora.merge(frozen, trainable)
  step = functools.partial(models.decode_step, cfg)
  merged_step = jax.jit(step)
  lora_step = jax.jit(jlora.lora(step))
  cache = models.init_cache(cfg, batch, cfg.seq_len)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab, batch), jnp.int32)
  pos = jnp.asarray(cfg.seq_len // 2)
  # Correctness first: the two steps agree.
  want, _ = merged_step(merged, cache, tokens, pos)
  got, _ = lora_step(frozen, trainable, cache, tokens, pos)
  diff = float(jnp.max(jnp.abs(got - want)))
  assert diff < 1e-3, f"merged and unmerged decode steps differ by {diff}"
  med = harness.interleaved({"merged": lambda: merged_step(merged, cache, tokens, pos),
                             "unmerged": lambda: lora_step(frozen, trainable, cache, tokens, pos)},
                            rounds, block=jax.block_until_ready)
  return {"machine": harness.machine(), "machine_info": harness.machine_info(), "jax": jax.__version__, "backend": jax.default_backend(),
          "config": {"d_model": cfg.d_model, "layers": cfg.n_layers, "batch": batch,
                     "cache": cfg.seq_len, "rank": rank},
          "median_ms": {k: v * 1e3 for k, v in med.items()},
          "ratio": med["unmerged"] / med["merged"], "max_abs_diff": diff, "rounds": rounds}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
  ap.add_argument("--rounds", type=int, default=50)
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  cfg = models.ModelConfig.quick() if args.quick else models.ModelConfig()
  res = run(cfg, 2 if args.quick else 8, 4 if args.quick else 16, 3 if args.quick else args.rounds)
  m = res["median_ms"]
  print(f"decode step on {res['machine']}, jax {res['jax']} ({res['backend']}): unmerged "
        f"{m['unmerged']:.3f} ms, merged {m['merged']:.3f} ms, ratio {res['ratio']:.3f}")
  harness.write_json(args.json, res)
  return res


if __name__ == "__main__":
  main()
