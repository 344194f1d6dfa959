"""``jlora.plan`` against XLA: bytes per device of a Llama-shaped model on an FSDP mesh.

A Llama-3-shaped decoder (RMSNorm, grouped-query attention, SwiGLU MLP,
untied head, bf16 weights, ``nn.scan`` over ``nn.remat`` blocks) exists only
as abstract shapes. Every weight is sharded FSDP-style over all devices of a
1-D mesh ``("data",)`` (its largest non-layer axis that the device count
divides); the batch is split over the same axis. For full fine-tuning, LoRA
(r=16 on q, k, v, o, gate, up, down) and QLoRA (those projections in NF4),
the train step (loss, gradients, Adam) is lowered and compiled from the
abstract shapes with the plan's shardings as ``in_shardings`` and the train
state donated; nothing is allocated. The plan's weights + adapters +
optimizer state + batch must equal XLA's argument bytes per device.

    python benchmarks/plan_scale.py [--quick] [--devices 8] [--setups full,lora,qlora]
                                    [--json out.json]

The default is Llama-3-70B (80 layers, d 8192, MLP 28672, 64 heads, 8 KV
heads, vocab 128256), batch 8 x 4096 tokens; ``--quick`` is a small model
of the same kind for tests. It simulates the devices on the CPU
(``--xla_force_host_platform_device_count``) unless JAX already has enough.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time


def _set_devices(n: int) -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


@dataclasses.dataclass(frozen=True)
class LlamaShape:
  d: int = 8192
  f: int = 28672
  heads: int = 64
  kv_heads: int = 8
  layers: int = 80
  vocab: int = 128256
  batch: int = 8
  seq: int = 4096
  remat: bool = True

  @classmethod
  def quick(cls) -> "LlamaShape":
    return cls(d=256, f=704, heads=8, kv_heads=2, layers=2, vocab=512, batch=8, seq=32,
               remat=False)


PROJ = r".*/(q|k|v|o|gate|up|down)/kernel"


def llama_like(c: LlamaShape):
  import jax.numpy as jnp
  from flax import linen as nn

  bf16 = jnp.bfloat16
  hd = c.d // c.heads

  def dense(n, name):
    return nn.Dense(n, use_bias=False, dtype=bf16, param_dtype=bf16, name=name)

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      h = nn.RMSNorm(dtype=bf16, param_dtype=bf16, name="attn_norm")(x)
      b, s, _ = h.shape
      q = dense(c.d, "q")(h).reshape(b, s, c.heads, hd)
      k = dense(c.kv_heads * hd, "k")(h).reshape(b, s, c.kv_heads, hd)
      v = dense(c.kv_heads * hd, "v")(h).reshape(b, s, c.kv_heads, hd)
      rep = c.heads // c.kv_heads
      k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
      mask = nn.make_causal_mask(jnp.ones((b, s), jnp.int32))
      a = nn.dot_product_attention(q, k, v, mask=mask).reshape(b, s, c.d)
      x = x + dense(c.d, "o")(a)
      h = nn.RMSNorm(dtype=bf16, param_dtype=bf16, name="mlp_norm")(x)
      return x + dense(c.d, "down")(nn.silu(dense(c.f, "gate")(h)) * dense(c.f, "up")(h)), None

  class LlamaLike(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(c.vocab, c.d, dtype=bf16, param_dtype=bf16, name="embed")(tokens)
      stack = nn.scan(nn.remat(Block) if c.remat else Block, variable_axes={"params": 0},
                      split_rngs={"params": True}, length=c.layers)
      x, _ = stack(name="layers")(x, None)
      x = nn.RMSNorm(dtype=bf16, param_dtype=bf16, name="final_norm")(x)
      return dense(c.vocab, "lm_head")(x)

  return LlamaLike()


def fsdp(abstract, mesh, n):
  """Each weight sharded over ('data',) on its largest non-layer axis that n divides."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  def place(path, x):
    stacked = "layers" in jax.tree_util.keystr(path)
    axes = [i for i in range(int(stacked), x.ndim) if x.shape[i] % n == 0]
    spec = [None] * x.ndim
    if axes:
      spec[max(axes, key=lambda i: x.shape[i])] = "data"
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P(*spec)))

  return jax.tree_util.tree_map_with_path(place, abstract)


def _peak(compiled) -> dict:
  m = compiled.memory_analysis()
  return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
          "temp": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes,
          "peak": (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)}


def run(c: LlamaShape, n_devices: int, rank: int = 16,
        setups: tuple[str, ...] = ("full", "lora", "qlora")) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import jlora
  from jlora.plan import shard_bytes

  assert jax.device_count() >= n_devices, (jax.device_count(), n_devices)
  mesh = Mesh(np.asarray(jax.devices()[:n_devices]), ("data",))
  model = llama_like(c)
  tokens = jax.ShapeDtypeStruct((c.batch, c.seq), jnp.int32,
                                sharding=NamedSharding(mesh, P("data", None)))
  t0 = time.perf_counter()
  params = fsdp(jax.eval_shape(model.init, jax.random.key(0),
                               jax.ShapeDtypeStruct(tokens.shape, tokens.dtype)), mesh, n_devices)
  layouts = jlora.infer_layouts(model.apply, params, tokens)
  spec = jlora.LoraSpec(rank=rank, alpha=2.0 * rank, targets=PROJ)
  tx = optax.adam(1e-4)
  plan = jlora.plan(params, spec, tx=tx, layouts=layouts, quantize_targets=PROJ,
                    batch=c.batch, seq_len=c.seq)
  plan_s = time.perf_counter() - t0

  def xent(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets).mean()

  repl = NamedSharding(mesh, P())
  batch_bytes = 2 * shard_bytes(tokens)   # tokens and targets

  def full_step(params, opt_state, tokens, targets):
    loss, g = jax.value_and_grad(lambda p: xent(model.apply(p, tokens), targets))(params)
    u, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state, loss

  apply = jlora.lora(model.apply)

  def lora_step_for(ltx):
    def step(trainable, opt_state, frozen, tokens, targets):
      loss, g = jax.value_and_grad(lambda t: xent(apply(frozen, t, tokens), targets))(trainable)
      u, opt_state = ltx.update(g, opt_state, trainable)
      return optax.apply_updates(trainable, u), opt_state, loss
    return step

  out = {"shape": dataclasses.asdict(c), "devices": n_devices, "rank": rank,
         "params": jlora.summary(params, spec, layouts=layouts).base_params,
         "plan_s": plan_s, "plan": plan.per_device.rows, "xla": {}, "compile_s": {},
         "batch_bytes_per_device": batch_bytes}
  for setup in setups:
    sh, ab = plan.shardings[setup], plan.abstract[setup]
    t0 = time.perf_counter()
    if setup == "full":
      c_step = jax.jit(
          full_step, donate_argnums=(0, 1),
          in_shardings=(sh["weights"], sh["optimizer state"], tokens.sharding, tokens.sharding),
          out_shardings=(sh["weights"], sh["optimizer state"], repl),
      ).lower(ab["weights"], ab["optimizer state"], tokens, tokens).compile()
    else:
      ltx = jlora.optimizer(tx, ab["adapters"])
      c_step = jax.jit(
          lora_step_for(ltx), donate_argnums=(0, 1),
          in_shardings=(sh["adapters"], sh["optimizer state"], sh["weights"], tokens.sharding,
                        tokens.sharding),
          out_shardings=(sh["adapters"], sh["optimizer state"], repl),
      ).lower(ab["adapters"], ab["optimizer state"], ab["weights"], tokens, tokens).compile()
    out["compile_s"][setup] = time.perf_counter() - t0
    out["xla"][setup] = _peak(c_step)
    rows = plan.per_device.rows[setup]
    out.setdefault("plan_arguments", {})[setup] = (
        rows["weights"] + rows["adapters"] + rows["optimizer state"] + batch_bytes)
  return out


def report(res: dict) -> None:
  gib = 2 ** 30
  c = res["shape"]
  print(f"Llama-shaped model, {res['params']:,} params, bf16, FSDP over {res['devices']} devices, "
        f"batch {c['batch']} x {c['seq']}, r={res['rank']}; GiB per device")
  print(f"{'setup':<7}{'plan: weights':>14}{'adapters':>10}{'opt':>8}{'grads':>8}{'acts*':>8}"
        f"{'args':>8}   {'XLA: args':>10}{'temp':>8}{'peak':>8}")
  for s in res["xla"]:
    p, x = res["plan"][s], res["xla"][s]
    print(f"{s:<7}{p['weights'] / gib:>14.3f}{p['adapters'] / gib:>10.4f}"
          f"{p['optimizer state'] / gib:>8.3f}{p['gradients'] / gib:>8.3f}"
          f"{p['activations'] / gib:>8.2f}{res['plan_arguments'][s] / gib:>8.3f}   "
          f"{x['arguments'] / gib:>10.3f}{x['temp'] / gib:>8.2f}{x['peak'] / gib:>8.2f}")
  print("* plan's activation estimate: every matmul's input and output per token, no "
        "rematerialization (the model rematerializes each layer).")


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="a small model, for tests")
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--setups", default="full,lora,qlora",
                  help="which steps to compile against the plan")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  _set_devices(args.devices)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  res = run(LlamaShape.quick() if args.quick else LlamaShape(), args.devices,
            rank=4 if args.quick else 16, setups=tuple(args.setups.split(",")))
  report(res)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2)
  return res


if __name__ == "__main__":
  main()
