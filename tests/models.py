"""Small models the tests adapt: each stands for a family of real ones."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx


class LinenMLP(nn.Module):
  hidden: int = 32
  out: int = 8

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
    x = nn.relu(nn.Dense(self.hidden, name="fc2")(x))
    return nn.Dense(self.out, name="head")(x)


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab: int = 64
  d_model: int = 32
  heads: int = 4
  layers: int = 2
  mlp: int = 64
  seq: int = 16
  dtype: jnp.dtype = jnp.float32


class LinenBlock(nn.Module):
  """Pre-norm decoder block with DenseGeneral attention projections."""
  cfg: LMConfig

  @nn.compact
  def __call__(self, x, _):
    cfg = self.cfg
    hd = cfg.d_model // cfg.heads
    h = nn.LayerNorm(dtype=cfg.dtype)(x)
    proj = lambda name: nn.DenseGeneral((cfg.heads, hd), dtype=cfg.dtype, name=name)(h)
    q, k, v = proj("query"), proj("key"), proj("value")
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    attn = nn.dot_product_attention(q, k, v, mask=mask, dtype=cfg.dtype)
    x = x + nn.DenseGeneral(cfg.d_model, axis=(-2, -1), dtype=cfg.dtype, name="out")(attn)
    h = nn.LayerNorm(dtype=cfg.dtype)(x)
    h = nn.gelu(nn.Dense(cfg.mlp, dtype=cfg.dtype, name="up")(h))
    x = x + nn.Dense(cfg.d_model, dtype=cfg.dtype, name="down")(h)
    return x, None


class LinenLM(nn.Module):
  """Decoder-only LM: layers stacked with nn.scan and rematerialised."""
  cfg: LMConfig

  @nn.compact
  def __call__(self, tokens):
    cfg = self.cfg
    x = nn.Embed(cfg.vocab, cfg.d_model, dtype=cfg.dtype, name="embed")(tokens)
    x = x + self.param("pos", nn.initializers.normal(0.02), (cfg.seq, cfg.d_model))[: tokens.shape[1]].astype(cfg.dtype)
    block = nn.scan(nn.remat(LinenBlock), variable_axes={"params": 0}, split_rngs={"params": True},
                    length=cfg.layers)
    x, _ = block(cfg, name="layers")(x, None)
    x = nn.LayerNorm(dtype=cfg.dtype)(x)
    return nn.Dense(cfg.vocab, dtype=cfg.dtype, name="lm_head")(x).astype(jnp.float32)


class NNXBlock(nnx.Module):
  def __init__(self, cfg: LMConfig, rngs: nnx.Rngs):
    hd = cfg.d_model // cfg.heads
    self.cfg = cfg
    self.norm1 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.query = nnx.LinearGeneral(cfg.d_model, (cfg.heads, hd), rngs=rngs)
    self.key = nnx.LinearGeneral(cfg.d_model, (cfg.heads, hd), rngs=rngs)
    self.value = nnx.Einsum("bsd,dhk->bshk", (cfg.d_model, cfg.heads, hd), (cfg.heads, hd), rngs=rngs)
    self.out = nnx.LinearGeneral((cfg.heads, hd), cfg.d_model, axis=(-2, -1), rngs=rngs)
    self.norm2 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.up = nnx.Linear(cfg.d_model, cfg.mlp, rngs=rngs)
    self.down = nnx.Linear(cfg.mlp, cfg.d_model, rngs=rngs)

  def __call__(self, x):
    h = self.norm1(x)
    q, k, v = self.query(h), self.key(h), self.value(h)
    mask = nnx.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    x = x + self.out(nnx.dot_product_attention(q, k, v, mask=mask))
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class NNXLM(nnx.Module):
  def __init__(self, cfg: LMConfig, rngs: nnx.Rngs):
    self.embed = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs)
    self.blocks = nnx.List([NNXBlock(cfg, rngs) for _ in range(cfg.layers)])
    self.head = nnx.Linear(cfg.d_model, cfg.vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for blk in self.blocks:
      x = blk(x)
    return self.head(x)


def batched_einsum(params, x):
  """Plain jnp: per-expert weights contracted with a batch dimension."""
  h = jnp.einsum("ebd,edf->ebf", x, params["experts"])
  return jnp.tanh(h) @ params["proj"]


# -- a plain-JAX model small enough to run eagerly (the bank tests) -------------------


def tanh_mlp_fn(p, x):
  h = jnp.tanh(x @ p["query"]["kernel"])
  h = jnp.tanh(h @ p["up"]["kernel"])
  return h @ p["head"]["kernel"]


def tanh_mlp_params():
  """``tanh_mlp_fn``'s weights, and an input of 5 examples of 3 tokens."""
  from reference import normal   # here, so that importing the models needs neither jlora nor pytest
  params = {"query": {"kernel": normal((12, 16), 0.3, seed=1)},
            "up": {"kernel": normal((16, 16), 0.3, seed=2)},
            "head": {"kernel": normal((16, 6), 0.3, seed=3)}}
  return params, normal((5, 3, 12), seed=4)
