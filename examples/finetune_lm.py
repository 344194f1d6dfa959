"""Pretrain a small byte-level transformer LM, then LoRA-adapt it with jlora.

Phase 1 trains every weight of a Flax Linen decoder on Python's own
documentation (``pydoc_data/topics.py``, the help text of the language
reference). Phase 2 freezes that model and trains only LoRA factors on a
second, different text: the ``LICENSE.txt`` shipped with CPython. Both texts
come with every CPython install, so nothing is downloaded.

The model is not edited for LoRA: ``jlora.lora(model.apply)`` transforms the
plain forward function, and ``jlora.infer_layouts`` reads from its jaxpr how
each (multi-axis, layer-stacked) kernel is contracted.

Run:
  python examples/finetune_lm.py                 # about 40 seconds on 2 CPU cores
  python examples/finetune_lm.py --pretrain-steps 300 --lora-steps 200 --seed 1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import sysconfig
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jlora

# -- data --------------------------------------------------------------------------


def load_base_text() -> str:
  """The help topics of the language reference (English technical prose)."""
  try:
    from pydoc_data import topics
  except ImportError:
    sys.exit("error: pydoc_data.topics is missing from this Python install; it ships "
             "with CPython (Lib/pydoc_data/topics.py). Use a full CPython build.")
  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def load_adapt_text() -> str:
  """CPython's LICENSE.txt (history and license agreements: legal English)."""
  stdlib = sysconfig.get_path("stdlib") or os.path.dirname(os.__file__)
  candidates = [
      os.path.join(stdlib, "LICENSE.txt"),                         # POSIX installs
      os.path.join(os.path.dirname(os.__file__), "LICENSE.txt"),
      os.path.join(sys.base_prefix, "LICENSE.txt"),                # Windows installs
      os.path.join(sys.base_prefix, "LICENSE"),
  ]
  for path in candidates:
    if os.path.isfile(path):
      with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()
  sys.exit("error: could not find CPython's LICENSE.txt; looked in:\n  "
           + "\n  ".join(dict.fromkeys(candidates)))


def split_bytes(text: str, chunk: int, every: int) -> tuple[np.ndarray, np.ndarray]:
  """Bytes of ``text``, split into (train, held-out): every ``every``-th chunk
  of ``chunk`` bytes is held out, so the held-out part samples the whole text."""
  data = np.frombuffer(text.encode("utf-8"), np.uint8)
  chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
  held = [c for i, c in enumerate(chunks) if i % every == every - 1]
  train = [c for i, c in enumerate(chunks) if i % every != every - 1]
  return np.concatenate(train), np.concatenate(held)


def sample_batch(rng: np.random.Generator, data: np.ndarray, batch: int, seq: int) -> np.ndarray:
  starts = rng.integers(0, len(data) - seq - 1, size=batch)
  return np.stack([data[s:s + seq + 1] for s in starts]).astype(np.int32)


def eval_windows(data: np.ndarray, seq: int) -> np.ndarray:
  """Non-overlapping windows of seq+1 bytes covering ``data``."""
  n = (len(data) - 1) // seq
  return np.stack([data[i * seq:i * seq + seq + 1] for i in range(n)]).astype(np.int32)


# -- model -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 256          # bytes
  d_model: int = 96
  heads: int = 4
  layers: int = 2
  mlp: int = 288
  seq: int = 64


class Block(nn.Module):
  """Pre-norm decoder block; attention projections are (d, heads, head_dim)."""
  cfg: Config

  @nn.compact
  def __call__(self, x, _):
    cfg = self.cfg
    hd = cfg.d_model // cfg.heads
    h = nn.LayerNorm(name="ln1")(x)
    q, k, v = (nn.DenseGeneral((cfg.heads, hd), name=n)(h) for n in ("query", "key", "value"))
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    attn = nn.dot_product_attention(q, k, v, mask=mask)
    x = x + nn.DenseGeneral(cfg.d_model, axis=(-2, -1), name="out")(attn)
    h = nn.LayerNorm(name="ln2")(x)
    x = x + nn.Dense(cfg.d_model, name="down")(nn.gelu(nn.Dense(cfg.mlp, name="up")(h)))
    return x, None


class ByteLM(nn.Module):
  """Decoder-only LM over bytes; the layers are stacked with ``nn.scan``, so
  every block kernel has a leading layer axis."""
  cfg: Config

  @nn.compact
  def __call__(self, tokens):
    cfg = self.cfg
    x = nn.Embed(cfg.vocab, cfg.d_model, name="embed")(tokens)
    pos = self.param("pos", nn.initializers.normal(0.02), (cfg.seq, cfg.d_model))
    x = x + pos[: tokens.shape[1]]
    blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=cfg.layers)
    x, _ = blocks(cfg, name="layers")(x, None)
    return nn.Dense(cfg.vocab, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


def next_byte_loss(logits: jax.Array, batch: jax.Array) -> jax.Array:
  """Mean cross-entropy (nats per byte) of predicting batch[:, 1:]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


# -- the two phases ------------------------------------------------------------------


def pretrain(model, params, data, args, rng):
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, args.pretrain_steps),
                   weight_decay=0.01)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(
        lambda p: next_byte_loss(model.apply(p, batch[:, :-1]), batch))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  bar = tqdm(range(args.pretrain_steps), desc="pretrain (full)", unit="step", ncols=88)
  for i in bar:
    params, opt_state, loss = step(params, opt_state,
                                   sample_batch(rng, data, args.batch, model.cfg.seq))
    if i % 20 == 0 or i == args.pretrain_steps - 1:
      bar.set_postfix(loss=f"{float(loss):.3f}")
  return params


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pretrain-steps", type=int, default=200)
  parser.add_argument("--lora-steps", type=int, default=100)
  parser.add_argument("--batch", type=int, default=24)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--lora-lr", type=float, default=5e-3)
  parser.add_argument("--lora-dropout", type=float, default=0.0,
                      help="dropout on the LoRA path's input (e.g. 0.05; costs RNG time)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  start = time.perf_counter()

  cfg = Config()
  base_train, base_held = split_bytes(load_base_text(), chunk=512, every=20)
  adapt_train, adapt_held = split_bytes(load_adapt_text(), chunk=512, every=5)
  print(f"pretraining text: pydoc_data topics, {len(base_train):,} bytes "
        f"(+{len(base_held):,} held out)")
  print(f"adaptation text:  CPython LICENSE.txt, {len(adapt_train):,} bytes "
        f"(+{len(adapt_held):,} held out)")

  rng = np.random.default_rng(args.seed)
  key_init, key_lora, key_drop = jax.random.split(jax.random.key(args.seed), 3)
  model = ByteLM(cfg)
  example = jnp.zeros((1, cfg.seq), jnp.int32)
  params = jax.jit(model.init)(key_init, example)

  # -- phase 1: full training on the first text.
  params = pretrain(model, params, base_train, args, rng)

  base_logits = jax.jit(model.apply)
  base_windows = jnp.asarray(eval_windows(base_held, cfg.seq))
  adapt_windows = jnp.asarray(eval_windows(adapt_held, cfg.seq))
  inputs = adapt_windows[:, :-1]
  loss_base = float(next_byte_loss(base_logits(params, base_windows[:, :-1]), base_windows))
  print(f"held-out loss on the pretraining text: {loss_base:.3f} nats/byte")
  loss_before = float(next_byte_loss(base_logits(params, inputs), adapt_windows))

  # -- phase 2: LoRA on the second text. The model code is untouched.
  spec = jlora.LoraSpec(rank=args.rank, alpha=2 * args.rank,
                        targets=r"params/layers/(query|key|value|out|up|down)/kernel",
                        dropout=args.lora_dropout)
  # query (layers, d, heads, hd) and out (layers, heads, hd, d) are not plain
  # (in, out) matrices; the abstract trace tells which axes are in/out/stack.
  layouts = jlora.infer_layouts(model.apply, params, example)
  print(jlora.summary(params, spec, layouts=layouts))
  frozen, trainable = jlora.lora_transform(params, spec, key=key_lora, layouts=layouts)
  apply = jlora.lora(model.apply)
  tx = jlora.optimizer(optax.adamw(args.lora_lr, weight_decay=0.0), trainable)
  opt_state = tx.init(trainable)

  @jax.jit
  def lora_step(trainable, opt_state, frozen, batch, key):
    def loss_fn(t):
      return next_byte_loss(apply(frozen, t, batch[:, :-1], lora_dropout_key=key), batch)
    loss, grads = jax.value_and_grad(loss_fn)(trainable)     # gradients for A and B only
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  bar = tqdm(range(args.lora_steps), desc="LoRA (r=%d)" % args.rank, unit="step", ncols=88)
  for i in bar:
    batch = sample_batch(rng, adapt_train, args.batch, cfg.seq)
    trainable, opt_state, loss = lora_step(trainable, opt_state, frozen, batch,
                                           jax.random.fold_in(key_drop, i))
    if i % 20 == 0 or i == args.lora_steps - 1:
      bar.set_postfix(loss=f"{float(loss):.3f}")

  lora_logits = jax.jit(apply)     # no dropout key: deterministic
  y_lora = lora_logits(frozen, trainable, inputs)
  loss_after = float(next_byte_loss(y_lora, adapt_windows))
  print(f"held-out loss on the adaptation text: before LoRA {loss_before:.3f}, "
        f"after LoRA {loss_after:.3f} nats/byte")

  # -- merge: fold s*B@A into the kernels; a plain Flax params tree again.
  merged = jlora.merge(frozen, trainable)
  y_merged = base_logits(merged, inputs)
  diff = float(jnp.max(jnp.abs(y_lora - y_merged)))
  print(f"merged vs unmerged logits: max |diff| = {diff:.2e}")
  assert diff < 1e-3, f"merged and unmerged outputs differ by {diff}"
  assert loss_after < loss_before - 0.2, (
      f"LoRA did not lower the held-out loss enough: {loss_before:.3f} -> {loss_after:.3f}")

  print(f"OK: LoRA lowered the held-out loss {loss_before:.3f} -> {loss_after:.3f} nats/byte "
        f"({100 * (loss_after / loss_before - 1):+.0f}%) and the merged model matches; "
        f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
