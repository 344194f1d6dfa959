"""One small decoder-only byte-level transformer LM, written three times.

The same architecture in Flax Linen (``LinenLM``), Flax NNX (``NNXLM``) and
PyTorch (``TorchLM``), so LoRA libraries for each framework can be compared on
identical work:

    tok_emb + pos_emb (learned)
    n_layers x pre-LN block:
        x = x + o(causal_attention(q(ln1(x)), k(ln1(x)), v(ln1(x))))
        x = x + down(gelu_tanh(up(ln2(x))))
    ln_f -> head (untied, with bias)

Projection modules are named ``q, k, v, o, up, down`` in every framework
(Linen path ``block_{i}/q``, NNX ``blocks[i].q``, torch ``blocks.{i}.q``).

Weights: ``init_params(cfg, seed)`` makes one canonical set of numpy arrays
(Flax layout: kernels are (in, out)); ``to_linen`` / ``load_nnx`` /
``load_torch`` put the *same* numbers into each framework, so every peer starts
from the same base model and loss at step 0 agrees across libraries.
``init_lora(cfg, lcfg, seed)`` does the same for the LoRA A/B factors.

Framework imports are lazy (PEP 562 ``__getattr__``): importing this module
pulls in only numpy, and ``models.TorchLM`` never imports JAX (and vice
versa), so peak RSS measured per library is not inflated by the others.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib

import numpy as np

PROJ_NAMES = ("q", "k", "v", "o", "up", "down")
LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    d_model: int = 512
    n_layers: int = 4
    n_heads: int = 8
    mlp_ratio: int = 4
    vocab: int = 256  # byte level
    seq_len: int = 256
    batch: int = 8

    @property
    def d_mlp(self) -> int:
        return self.mlp_ratio * self.d_model

    @property
    def head_dim(self) -> int:
        assert self.d_model % self.n_heads == 0
        return self.d_model // self.n_heads

    @classmethod
    def quick(cls, n_layers: int = 1) -> "ModelConfig":
        # Tiny, for smoke tests. Dims chosen pairwise distinct (48, 192, 256,
        # 32) so a weight's shape identifies it in HLO. One block by default:
        # the scripts' --quick runs are mostly XLA compiling, and each block
        # adds the same ops again (a second one made them ~1.4x as long).
        return cls(d_model=48, n_layers=n_layers, n_heads=4, seq_len=32, batch=4)

    def proj_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection kernel."""
        d, m = self.d_model, self.d_mlp
        return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d),
                "up": (d, m), "down": (m, d)}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = PROJ_NAMES

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# --------------------------------------------------------------------------
# Canonical numpy weights (Flax layout) and data
# --------------------------------------------------------------------------

def init_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Flat dict of float32 arrays: 'tok_emb', 'pos_emb', 'block_{i}/q/kernel',
    'block_{i}/q/bias', 'block_{i}/ln1/scale', ..., 'ln_f/scale', 'head/kernel'."""
    rng = np.random.default_rng(seed)
    f32 = np.float32

    def normal(*shape, std=0.02):
        return (rng.standard_normal(shape) * std).astype(f32)

    p = {"tok_emb": normal(cfg.vocab, cfg.d_model),
         "pos_emb": normal(cfg.seq_len, cfg.d_model)}
    # GPT-2 style: residual-output projections scaled down by depth.
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    for i in range(cfg.n_layers):
        b = f"block_{i}"
        for ln in ("ln1", "ln2"):
            p[f"{b}/{ln}/scale"] = np.ones(cfg.d_model, f32)
            p[f"{b}/{ln}/bias"] = np.zeros(cfg.d_model, f32)
        for name, (din, dout) in cfg.proj_shapes().items():
            std = resid_std if name in ("o", "down") else 0.02
            p[f"{b}/{name}/kernel"] = normal(din, dout, std=std)
            p[f"{b}/{name}/bias"] = np.zeros(dout, f32)
    p["ln_f/scale"] = np.ones(cfg.d_model, f32)
    p["ln_f/bias"] = np.zeros(cfg.d_model, f32)
    p["head/kernel"] = normal(cfg.d_model, cfg.vocab)
    p["head/bias"] = np.zeros(cfg.vocab, f32)
    return p


def init_lora(cfg: ModelConfig, lcfg: LoraConfig, seed: int = 1
              ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'block_{i}/{name}': (A (in, r), B (r, out))} in Flax layout.

    A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(cfg.n_layers):
        for name, (din, dout) in cfg.proj_shapes().items():
            if name not in lcfg.targets:
                continue
            bound = 1.0 / math.sqrt(din)
            a = rng.uniform(-bound, bound, (din, lcfg.rank)).astype(np.float32)
            b = np.zeros((lcfg.rank, dout), np.float32)
            out[f"block_{i}/{name}"] = (a, b)
    return out


@functools.lru_cache(maxsize=1)
def corpus_bytes(max_bytes: int = 4 << 20) -> np.ndarray:
    """Deterministic byte corpus: the standard library's top-level .py sources
    (shipped with every Python), sorted by name, concatenated."""
    stdlib = pathlib.Path(os.__file__).parent
    chunks, n = [], 0
    for f in sorted(stdlib.glob("*.py")):
        data = f.read_bytes()
        chunks.append(data)
        n += len(data)
        if n >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)


def make_batches(cfg: ModelConfig, n_batches: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each int32 [n_batches, batch, seq_len]: random
    windows of the corpus (next-byte prediction)."""
    text = corpus_bytes()
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(text) - cfg.seq_len - 1,
                          size=(n_batches, cfg.batch))
    win = text[starts[..., None] + np.arange(cfg.seq_len + 1)].astype(np.int32)
    return win[..., :-1], win[..., 1:]


def _causal_attention(q, k, v, n_heads):
    """Causal multi-head attention on (B, S, D) projections (Linen and NNX)."""
    import jax
    import jax.numpy as jnp

    B, S, D = q.shape
    hd = D // n_heads
    q, k, v = (t.reshape(B, S, n_heads, hd) for t in (q, k, v))
    s = jnp.einsum("bshd,bthd->bhst", q, k) / math.sqrt(hd)
    mask = jnp.tril(jnp.ones((S, S), bool))
    s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
    w = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhst,bthd->bshd", w, v).reshape(B, S, D)


# --------------------------------------------------------------------------
# Flax Linen
# --------------------------------------------------------------------------

@functools.cache
def _linen():
    from flax import linen as nn

    attention = _causal_attention

    def ln(name):
        return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name=name)

    class LinenBlock(nn.Module):
        cfg: ModelConfig

        @nn.compact
        def __call__(self, x):
            c = self.cfg
            h = ln("ln1")(x)
            q = nn.Dense(c.d_model, name="q")(h)
            k = nn.Dense(c.d_model, name="k")(h)
            v = nn.Dense(c.d_model, name="v")(h)
            x = x + nn.Dense(c.d_model, name="o")(attention(q, k, v, c.n_heads))
            h = ln("ln2")(x)
            h = nn.gelu(nn.Dense(c.d_mlp, name="up")(h), approximate=True)
            return x + nn.Dense(c.d_model, name="down")(h)

    class LinenLM(nn.Module):
        cfg: ModelConfig

        @nn.compact
        def __call__(self, tokens):
            c = self.cfg
            S = tokens.shape[-1]
            x = nn.Embed(c.vocab, c.d_model, name="tok_emb")(tokens)
            pos = self.param("pos_emb", nn.initializers.normal(0.02),
                             (c.seq_len, c.d_model))
            x = x + pos[:S]
            for i in range(c.n_layers):
                x = LinenBlock(c, name=f"block_{i}")(x)
            x = ln("ln_f")(x)
            return nn.Dense(c.vocab, name="head")(x)

    return {"LinenLM": LinenLM, "LinenBlock": LinenBlock}


def to_linen(flat: dict[str, np.ndarray]) -> dict:
    """Canonical flat params -> Linen nested 'params' dict (numpy leaves)."""
    tree: dict = {}
    for key, val in flat.items():
        parts = key.split("/")
        if parts[0] == "tok_emb":
            parts = ["tok_emb", "embedding"]
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = val
    return tree


# --------------------------------------------------------------------------
# Flax NNX
# --------------------------------------------------------------------------

@functools.cache
def _nnx():
    from flax import nnx

    attention = _causal_attention

    def ln(d, rngs):
        return nnx.LayerNorm(d, epsilon=LN_EPS, use_fast_variance=False,
                             rngs=rngs)

    class NNXBlock(nnx.Module):
        def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
            self.n_heads = cfg.n_heads
            d = cfg.d_model
            self.ln1 = ln(d, rngs)
            self.ln2 = ln(d, rngs)
            for name, (din, dout) in cfg.proj_shapes().items():
                setattr(self, name, nnx.Linear(din, dout, rngs=rngs))

        def __call__(self, x):
            h = self.ln1(x)
            a = attention(self.q(h), self.k(h), self.v(h), self.n_heads)
            x = x + self.o(a)
            h = nnx.gelu(self.up(self.ln2(x)), approximate=True)
            return x + self.down(h)

    class NNXLM(nnx.Module):
        def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
            self.tok_emb = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs)
            self.pos_emb = nnx.Param(
                nnx.initializers.normal(0.02)(rngs.params(),
                                              (cfg.seq_len, cfg.d_model)))
            self.blocks = nnx.List(
                [NNXBlock(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
            self.ln_f = ln(cfg.d_model, rngs)
            self.head = nnx.Linear(cfg.d_model, cfg.vocab, rngs=rngs)

        def __call__(self, tokens):
            S = tokens.shape[-1]
            x = self.tok_emb(tokens) + self.pos_emb[...][:S]
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.ln_f(x))

    return {"NNXLM": NNXLM, "NNXBlock": NNXBlock}


def load_nnx(model, flat: dict[str, np.ndarray]) -> None:
    """Copy canonical params into an NNXLM in place."""
    import jax.numpy as jnp

    def put(var, val):
        assert var[...].shape == val.shape, (var[...].shape, val.shape)
        var[...] = jnp.asarray(val)

    put(model.tok_emb.embedding, flat["tok_emb"])
    put(model.pos_emb, flat["pos_emb"])
    for i, blk in enumerate(model.blocks):
        b = f"block_{i}"
        for ln in ("ln1", "ln2"):
            put(getattr(blk, ln).scale, flat[f"{b}/{ln}/scale"])
            put(getattr(blk, ln).bias, flat[f"{b}/{ln}/bias"])
        for name in PROJ_NAMES:
            put(getattr(blk, name).kernel, flat[f"{b}/{name}/kernel"])
            put(getattr(blk, name).bias, flat[f"{b}/{name}/bias"])
    put(model.ln_f.scale, flat["ln_f/scale"])
    put(model.ln_f.bias, flat["ln_f/bias"])
    put(model.head.kernel, flat["head/kernel"])
    put(model.head.bias, flat["head/bias"])


# --------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------

@functools.cache
def _torch():
    import torch
    from torch import nn
    import torch.nn.functional as F

    class TorchBlock(nn.Module):
        def __init__(self, cfg: ModelConfig):
            super().__init__()
            self.n_heads = cfg.n_heads
            self.ln1 = nn.LayerNorm(cfg.d_model, eps=LN_EPS)
            self.ln2 = nn.LayerNorm(cfg.d_model, eps=LN_EPS)
            for name, (din, dout) in cfg.proj_shapes().items():
                setattr(self, name, nn.Linear(din, dout))
            mask = torch.tril(torch.ones(cfg.seq_len, cfg.seq_len, dtype=torch.bool))
            self.register_buffer("mask", mask, persistent=False)

        def attention(self, q, k, v):
            B, S, D = q.shape
            hd = D // self.n_heads
            q, k, v = (t.view(B, S, self.n_heads, hd).transpose(1, 2)
                       for t in (q, k, v))
            s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            s = s.masked_fill(~self.mask[:S, :S], torch.finfo(s.dtype).min)
            w = torch.softmax(s, dim=-1)
            return (w @ v).transpose(1, 2).reshape(B, S, D)

        def forward(self, x):
            h = self.ln1(x)
            x = x + self.o(self.attention(self.q(h), self.k(h), self.v(h)))
            h = F.gelu(self.up(self.ln2(x)), approximate="tanh")
            return x + self.down(h)

    class TorchLM(nn.Module):
        def __init__(self, cfg: ModelConfig):
            super().__init__()
            self.tok_emb = nn.Embedding(cfg.vocab, cfg.d_model)
            self.pos_emb = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
            self.blocks = nn.ModuleList(TorchBlock(cfg) for _ in range(cfg.n_layers))
            self.ln_f = nn.LayerNorm(cfg.d_model, eps=LN_EPS)
            self.head = nn.Linear(cfg.d_model, cfg.vocab)

        def forward(self, tokens):
            S = tokens.shape[-1]
            x = self.tok_emb(tokens) + self.pos_emb[:S]
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.ln_f(x))

    return {"TorchLM": TorchLM, "TorchBlock": TorchBlock}


def torch_state_dict(flat: dict[str, np.ndarray]) -> dict:
    """Canonical params -> TorchLM state_dict (Linear weights transposed)."""
    import torch
    sd = {}
    for key, val in flat.items():
        parts = key.split("/")
        if key == "tok_emb":
            name = "tok_emb.weight"
        elif key == "pos_emb":
            name = "pos_emb"
        else:
            if parts[0].startswith("block_"):
                parts = ["blocks", parts[0][len("block_"):]] + parts[1:]
            leaf = parts[-1]
            if leaf == "kernel":
                val = val.T
            name = ".".join(parts[:-1] + [{"kernel": "weight", "scale": "weight"}
                                          .get(leaf, leaf)])
        sd[name] = torch.from_numpy(np.ascontiguousarray(val))
    return sd


def load_torch(model, flat: dict[str, np.ndarray]) -> None:
    missing, unexpected = model.load_state_dict(torch_state_dict(flat),
                                                strict=False)
    assert not unexpected, unexpected
    assert not missing, missing


_LAZY = {"LinenLM": _linen, "LinenBlock": _linen, "NNXLM": _nnx,
         "NNXBlock": _nnx, "TorchLM": _torch, "TorchBlock": _torch}


def __getattr__(name):  # PEP 562: framework classes built on first access
    if name in _LAZY:
        return _LAZY[name]()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------
# Decoding with a KV cache (plain JAX over the Linen parameter tree)
# --------------------------------------------------------------------------

def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None):
    """Empty keys and values for every layer: (layers, batch, length, heads, hd)."""
    import jax.numpy as jnp

    shape = (cfg.n_layers, batch, length, cfg.n_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype or jnp.float32), "v": jnp.zeros(shape, dtype or jnp.float32)}


def decode_step(cfg: ModelConfig, params, cache, tokens, pos):
    """One token per sequence through the LinenLM of this module's weights.

    ``tokens`` (batch,) at position ``pos`` (a traced scalar); returns the
    logits (batch, vocab) and the cache with this position's keys and values.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    p = params["params"]

    def dense(x, name, block=None):
        w = p[name] if block is None else p[block][name]
        return x @ w["kernel"] + w["bias"]

    B = tokens.shape[0]
    H, hd, L = cfg.n_heads, cfg.head_dim, cache["k"].shape[2]
    x = jnp.take(p["tok_emb"]["embedding"], tokens, axis=0)
    x = x + lax.dynamic_index_in_dim(p["pos_emb"], pos, keepdims=False)
    keys, values = [], []
    for i in range(cfg.n_layers):
        b = f"block_{i}"
        h = _ln(p[b]["ln1"], x)
        q = dense(h, "q", b).reshape(B, H, hd)
        k_all = lax.dynamic_update_slice_in_dim(cache["k"][i], dense(h, "k", b).reshape(
            B, 1, H, hd), pos, axis=1)
        v_all = lax.dynamic_update_slice_in_dim(cache["v"][i], dense(h, "v", b).reshape(
            B, 1, H, hd), pos, axis=1)
        keys.append(k_all)
        values.append(v_all)
        s = jnp.einsum("bhd,bthd->bht", q, k_all) / math.sqrt(hd)
        s = jnp.where(jnp.arange(L) <= pos, s, jnp.finfo(s.dtype).min)
        att = jnp.einsum("bht,bthd->bhd", jax.nn.softmax(s, axis=-1), v_all).reshape(B, -1)
        x = x + dense(att, "o", b)
        h = jax.nn.gelu(dense(_ln(p[b]["ln2"], x), "up", b), approximate=True)
        x = x + dense(h, "down", b)
    logits = dense(_ln(p["ln_f"], x), "head")
    return logits, {"k": jnp.stack(keys), "v": jnp.stack(values)}


def _ln(w, x):
    import jax.numpy as jnp

    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + LN_EPS) * w["scale"] + w["bias"]
