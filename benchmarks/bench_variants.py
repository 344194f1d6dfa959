"""LoRA variants against plain LoRA, side by side: DoRA, and an adapted embedding.

One process, one model (the decoder LM of models.py: d_model 512, 4 layers,
batch 8 x 256 tokens), AdamW on the trainable part. Rounds alternate between
the variants of one ratio, so drift in machine load hits both alike; medians
are reported.

* DoRA step / LoRA step, r=16 on q, k, v, o, up, down (PEFT measured 1.26 on
  its own benchmark);
* a step with the token embedding adapted too / the same step with it frozen.

    python benchmarks/bench_variants.py [--quick] [--rounds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
import models  # noqa: E402
import harness  # noqa: E402

PROJ = r".*/(q|k|v|o|up|down)/kernel"


def _step(model, tokens, targets):
  apply = jlora.lora(model.apply)

  def make(frozen, trainable):
    tx = jlora.optimizer(optax.adamw(1e-4), trainable)

    def step(t, state):
      def loss(t):
        logits = apply(frozen, t, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
      value, g = jax.value_and_grad(loss)(t)
      updates, state = tx.update(g, state, t)
      return optax.apply_updates(t, updates), state, value

    return jax.jit(step), (trainable, tx.init(trainable))

  return make


def run(cfg: models.ModelConfig, rank: int, rounds: int) -> dict:
  model = models.LinenLM(cfg)
  params = jax.tree.map(jnp.asarray, {"params": models.to_linen(models.init_params(cfg))})
  tokens, targets = (jnp.asarray(a[0]) for a in models.make_batches(cfg, 1))
  make = _step(model, tokens, targets)
  specs = {
      "lora": jlora.LoraSpec(rank=rank, alpha=2 * rank, targets=PROJ),
      "dora": jlora.LoraSpec(rank=rank, alpha=2 * rank, targets=PROJ, use_dora=True),
      "lora+embedding": jlora.LoraSpec(rank=rank, alpha=2 * rank,
                                       targets=PROJ + r"|params/tok_emb/embedding"),
  }
  steps = {}
  for name, spec in specs.items():
    frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
    trainable = jax.tree_util.tree_map(lambda x: x + 1e-3, trainable)
    steps[name] = make(frozen, trainable)
  med = harness.interleaved({k: functools.partial(f, *args) for k, (f, args) in steps.items()},
                            rounds, block=jax.block_until_ready)
  return {"machine": harness.machine(), "machine_info": harness.machine_info(), "jax": jax.__version__, "backend": jax.default_backend(),
          "rounds": rounds, "median_ms": {k: v * 1e3 for k, v in med.items()},
          "dora_over_lora": med["dora"] / med["lora"],
          "embedding_adapted_over_frozen": med["lora+embedding"] / med["lora"]}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
  ap.add_argument("--rounds", type=int, default=10)
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  cfg = models.ModelConfig.quick() if args.quick else models.ModelConfig()
  res = run(cfg, 4 if args.quick else 16, 2 if args.quick else args.rounds)
  m = res["median_ms"]
  print(f"LoRA variants on {res['machine']}, jax {res['jax']} ({res['backend']}), medians of "
        f"{res['rounds']} interleaved rounds")
  print(f"  train step: LoRA {m['lora']:.1f} ms, DoRA {m['dora']:.1f} ms, "
        f"LoRA + adapted embedding {m['lora+embedding']:.1f} ms")
  print(f"  DoRA / LoRA {res['dora_over_lora']:.3f}; embedding adapted / frozen "
        f"{res['embedding_adapted_over_frozen']:.3f}")
  harness.write_json(args.json, res)
  return res


if __name__ == "__main__":
  main()
