"""QLoRA against LoRA: step time, frozen-base bytes, compiled memory of a 7B step.

Three measurements, one process:

* train step: the QLoRA step (NF4 base, dequantized inside the step) against
  the LoRA step on the same base in float32, on the benchmark LM of
  models.py (d_model 512, 4 layers, batch 8 x 256 tokens, r=16 on q, k, v, o,
  up, down; those six kernels quantized). Rounds alternate between the two
  steps; the medians are reported. Floor on the 2-core CPU: <= 1.25.
* frozen-base bytes per parameter, measured from the arrays: the quantized
  kernels (floor <= 0.52), and the whole frozen tree.
* compiled memory of a Llama-7B-shaped train step (32 layers, d 4096, MLP
  11008, vocab 32000, bf16 weights, nn.scan over nn.remat blocks, batch 1 x
  512 tokens, r=16 on the seven projections, Adam): full fine-tuning, LoRA
  and QLoRA, from abstract shapes (XLA's memory analysis; nothing is
  allocated), beside ``jlora.summary``'s estimate.

    python benchmarks/bench_qlora.py [--quick] [--rounds N] [--no-7b] [--json out.json]

Timings are printed and written as JSON, not recorded by the script.
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

PROJ = r".*/(q|k|v|o|up|down)/kernel"
GIB = 2 ** 30


# -- step time ---------------------------------------------------------------------------


def _xent(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def speed(cfg: models.ModelConfig, rank: int, rounds: int) -> dict:
  model = models.LinenLM(cfg)
  params = jax.tree.map(jnp.asarray, {"params": models.to_linen(models.init_params(cfg))})
  spec = jlora.LoraSpec(rank=rank, alpha=2.0 * rank, targets=PROJ)
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  trainable = jax.tree.map(lambda x: x + 1e-3, trainable)   # B != 0, as after training
  q_params = jlora.quantize(params, PROJ)
  q_frozen, _ = jlora.lora_transform(q_params, spec, key=jax.random.key(0))
  apply = jlora.lora(model.apply)
  tx = jlora.optimizer(optax.adamw(1e-4), trainable)

  def step(trainable, opt_state, frozen, tokens, targets):
    loss, grads = jax.value_and_grad(
        lambda t: _xent(apply(frozen, t, tokens), targets))(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  tokens, targets = (jnp.asarray(a[0]) for a in models.make_batches(cfg, 1))
  state = tx.init(trainable)
  t0 = time.perf_counter()
  lora_c = jax.jit(step).lower(trainable, state, frozen, tokens, targets).compile()
  lora_compile = time.perf_counter() - t0
  t0 = time.perf_counter()
  qlora_c = jax.jit(step).lower(trainable, state, q_frozen, tokens, targets).compile()
  qlora_compile = time.perf_counter() - t0

  # Correctness first: the QLoRA loss is the LoRA loss of the dequantized base.
  deq_frozen = jlora.dequantize(q_frozen)
  q_loss = float(qlora_c(trainable, state, q_frozen, tokens, targets)[2])
  d_loss = float(lora_c(trainable, state, deq_frozen, tokens, targets)[2])
  assert abs(q_loss - d_loss) < 1e-4 * max(1.0, abs(d_loss)), (q_loss, d_loss)

  def timed(c, frozen):
    t0 = time.perf_counter()
    jax.block_until_ready(c(trainable, state, frozen, tokens, targets))
    return time.perf_counter() - t0

  for _ in range(min(rounds, 2)):   # warm-up
    timed(lora_c, frozen), timed(qlora_c, q_frozen)
  times = {"lora_step": [], "qlora_step": []}
  for _ in range(rounds):
    times["lora_step"].append(timed(lora_c, frozen))
    times["qlora_step"].append(timed(qlora_c, q_frozen))
  med = {k: statistics.median(v) for k, v in times.items()}

  nf4 = [x for x in jax.tree_util.tree_leaves(q_frozen, is_leaf=_is_nf4) if _is_nf4(x)]
  leaves = jax.tree_util.tree_leaves(q_frozen, is_leaf=_is_nf4)
  nf4_bytes, nf4_params = sum(x.nbytes for x in nf4), sum(x.size for x in nf4)
  all_bytes = sum(x.nbytes for x in leaves)
  all_params = sum(x.size for x in leaves)
  dense_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(frozen))
  return {
      "config": {"d_model": cfg.d_model, "layers": cfg.n_layers, "heads": cfg.n_heads,
                 "batch": cfg.batch, "seq": cfg.seq_len, "rank": rank},
      "median_s": med,
      "qlora_over_lora": med["qlora_step"] / med["lora_step"],
      "compile_s": {"lora_step": lora_compile, "qlora_step": qlora_compile},
      "loss_qlora": q_loss, "loss_lora_on_dequantized_base": d_loss,
      "quantized_bytes_per_param": nf4_bytes / nf4_params,
      "frozen_bytes_per_param": all_bytes / all_params,
      "frozen_bytes": {"lora_f32": dense_bytes, "qlora": all_bytes},
      "rounds": rounds,
  }


def _is_nf4(x):
  return isinstance(x, jlora.NF4Array)


# -- compiled memory of a Llama-7B-shaped step -----------------------------------------------


def _llama_like(d, f, heads, layers, vocab):
  from flax import linen as nn

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=jnp.bfloat16,  # noqa: E731
                                       param_dtype=jnp.bfloat16, name=name)
      h = nn.RMSNorm(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(x)
      b, s, _ = h.shape
      q, k, v = (dense(d, n)(h).reshape(b, s, heads, d // heads) for n in ("q", "k", "v"))
      mask = nn.make_causal_mask(jnp.ones((b, s), jnp.int32))
      a = nn.dot_product_attention(q, k, v, mask=mask).reshape(b, s, d)
      x = x + dense(d, "o")(a)
      h = nn.RMSNorm(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(x)
      return x + dense(d, "down")(nn.silu(dense(f, "gate")(h)) * dense(f, "up")(h)), None

  class LlamaLike(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(vocab, d, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(tokens)
      stack = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                      split_rngs={"params": True}, length=layers)
      x, _ = stack(name="layers")(x, None)
      x = nn.RMSNorm(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(x)
      return nn.Dense(vocab, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                      name="lm_head")(x)

  return LlamaLike()


def _peak(compiled) -> dict:
  m = compiled.memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)
  return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
          "temp": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes, "peak": peak}


def memory_7b(shape: dict, batch: int, seq: int, rank: int) -> dict:
  model = _llama_like(**shape)
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)
  layouts = jlora.infer_layouts(model.apply, params, tokens)
  spec = jlora.LoraSpec(rank=rank, alpha=2.0 * rank, targets=r".*/(q|k|v|o|gate|up|down)/kernel")
  targets = tokens

  def lora_peak(frozen, trainable):
    apply = jlora.lora(model.apply)
    tx = jlora.optimizer(optax.adam(1e-4), trainable)

    def step(trainable, opt_state, frozen, tokens, targets):
      loss, g = jax.value_and_grad(lambda t: _xent(apply(frozen, t, tokens), targets))(trainable)
      u, opt_state = tx.update(g, opt_state, trainable)
      return optax.apply_updates(trainable, u), opt_state, loss

    state = jax.eval_shape(tx.init, trainable)
    c = jax.jit(step, donate_argnums=(0, 1)).lower(trainable, state, frozen, tokens,
                                                   targets).compile()
    return _peak(c)

  def full_peak():
    tx = optax.adam(1e-4)

    def step(params, opt_state, tokens, targets):
      loss, g = jax.value_and_grad(lambda p: _xent(model.apply(p, tokens), targets))(params)
      u, opt_state = tx.update(g, opt_state, params)
      return optax.apply_updates(params, u), opt_state, loss

    state = jax.eval_shape(tx.init, params)
    c = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, tokens, targets).compile()
    return _peak(c)

  frozen, trainable = jlora.lora_transform(params, spec, layouts=layouts)
  q_frozen, _ = jlora.lora_transform(jlora.quantize(params, layouts=layouts), spec,
                                     layouts=layouts)
  out = {"xla": {}, "compile_s": {}}
  for name, fn in (("full", full_peak), ("lora", lambda: lora_peak(frozen, trainable)),
                   ("qlora", lambda: lora_peak(q_frozen, trainable))):
    t0 = time.perf_counter()
    out["xla"][name] = fn()
    out["compile_s"][name] = time.perf_counter() - t0
  s = jlora.summary(params, spec, layouts=layouts, batch=batch, seq_len=seq)
  out["summary"] = {k: dict(v, total=s.memory.total(k)) for k, v in s.memory.rows.items()}
  out["params"] = s.base_params
  out["shape"] = dict(shape, batch=batch, seq=seq, rank=rank)
  return out


# -- report ------------------------------------------------------------------------------------


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
  ap.add_argument("--rounds", type=int, default=20)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--no-7b", action="store_true", help="skip the 7B memory analysis")
  ap.add_argument("--json", default=None, help="write the results here")
  args = ap.parse_args(argv)
  cfg = models.ModelConfig.quick() if args.quick else models.ModelConfig()
  rank = 4 if args.quick else args.rank
  res = {"machine": f"{platform.machine()} {platform.processor() or ''} "
                    f"{os.cpu_count()} cores".strip(),
         "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
         "jax": jax.__version__}
  res["speed"] = speed(cfg, rank, 1 if args.quick else args.rounds)
  if not args.no_7b:
    shape = (dict(d=64, f=176, heads=4, layers=2, vocab=256) if args.quick else
             dict(d=4096, f=11008, heads=32, layers=32, vocab=32000))
    res["memory_7b"] = memory_7b(shape, 1, 16 if args.quick else 512, rank)

  sp = res["speed"]
  m = sp["median_s"]
  print(f"jlora QLoRA benchmark on {res['device']} ({res['machine']}), jax {res['jax']}")
  print(f"{'what':<36}{'value':>12}{'floor':>10}")
  print(f"{'train step QLoRA / LoRA':<36}{sp['qlora_over_lora']:>12.3f}{'<= 1.25':>10}"
        f"   ({m['qlora_step'] * 1e3:.1f} ms / {m['lora_step'] * 1e3:.1f} ms)")
  print(f"{'quantized kernels, bytes/param':<36}{sp['quantized_bytes_per_param']:>12.4f}"
        f"{'<= 0.52':>10}")
  print(f"{'whole frozen tree, bytes/param':<36}{sp['frozen_bytes_per_param']:>12.4f}")
  if "memory_7b" in res:
    mem = res["memory_7b"]
    print(f"\nLlama-7B-shaped train step ({mem['params']:,} params, bf16, batch "
          f"{mem['shape']['batch']} x {mem['shape']['seq']}, r={mem['shape']['rank']}), GiB:")
    print(f"{'setup':<8}{'XLA peak':>10}{'args':>8}{'temp':>8}   summary: {'weights':>8}"
          f"{'adapters':>9}{'grads':>8}{'opt':>8}{'acts*':>8}")
    for name in ("full", "lora", "qlora"):
      x, s = mem["xla"][name], mem["summary"][name]
      print(f"{name:<8}{x['peak'] / GIB:>10.2f}{x['arguments'] / GIB:>8.2f}"
            f"{x['temp'] / GIB:>8.2f}   {'':9}{s['weights'] / GIB:>8.2f}{s['adapters'] / GIB:>9.2f}"
            f"{s['gradients'] / GIB:>8.2f}{s['optimizer state'] / GIB:>8.2f}"
            f"{s['activations'] / GIB:>8.2f}")
    print("* summary's activation estimate keeps every matmul's input and output (no "
          "rematerialization); the model rematerializes each layer.")
  harness.write_json(args.json, res)
  return res


if __name__ == "__main__":
  main()
