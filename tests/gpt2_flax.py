"""A small Flax Linen GPT-2, weight-compatible with transformers' GPT2LMHeadModel.

Used by the tests to compare jlora against Hugging Face PEFT (PyTorch) on the
same network. The architecture follows ``transformers.GPT2LMHeadModel``:

    transformer.wte, transformer.wpe          token / position embeddings
    transformer.h.{i}.ln_1                    pre-attention LayerNorm
    transformer.h.{i}.attn.c_attn             fused q/k/v projection (d -> 3d)
    transformer.h.{i}.attn.c_proj             attention output projection
    transformer.h.{i}.ln_2                    pre-MLP LayerNorm
    transformer.h.{i}.mlp.c_fc                MLP up projection (d -> n_inner)
    transformer.h.{i}.mlp.c_proj              MLP down projection, gelu_new before it
    transformer.ln_f                          final LayerNorm
    lm_head                                   tied to transformer.wte (no own params)

Parameter naming
----------------
Module names are chosen so that a Flax parameter path, minus its leaf name,
joined with "." is exactly the torch module name (and therefore the PEFT module
name, which PEFT prefixes with ``base_model.model.``)::

    Flax params path                           torch state_dict key
    transformer/wte/embedding      (V, d)      transformer.wte.weight        (V, d)
    transformer/wpe/embedding      (P, d)      transformer.wpe.weight        (P, d)
    transformer/h/0/ln_1/scale     (d,)        transformer.h.0.ln_1.weight   (d,)
    transformer/h/0/ln_1/bias      (d,)        transformer.h.0.ln_1.bias     (d,)
    transformer/h/0/attn/c_attn/kernel (d, 3d) transformer.h.0.attn.c_attn.weight (d, 3d)
    transformer/h/0/attn/c_attn/bias   (3d,)   transformer.h.0.attn.c_attn.bias   (3d,)
    ... likewise attn/c_proj, mlp/c_fc, mlp/c_proj, ln_2, ln_f ...

``peft_module_name(path)`` implements this (``("transformer", "h", "0",
"attn", "c_attn", "kernel")`` -> ``"transformer.h.0.attn.c_attn"``).

Layout: HF GPT-2 uses ``Conv1D`` layers whose ``weight`` is stored (in, out),
the same layout as a Flax ``Dense`` kernel, so linear weights are copied
without transposing. (Embeddings are (num, d) in both frameworks; LayerNorm
``weight`` becomes Flax ``scale``.) The LM head reuses ``wte`` (``x @ wte.T``),
so ``lm_head.weight`` in a torch state_dict is ignored (checked to be tied).

Importing this module does not import torch; only ``make_tiny_torch_gpt2``
and the torch-tensor path of ``params_from_torch`` need it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "GPT2Config",
    "GPT2LMHeadModel",
    "GPT2Model",
    "config_from_hf",
    "make_tiny_torch_gpt2",
    "params_from_torch",
    "peft_module_name",
]


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 128
    n_positions: int = 64
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_inner: int | None = None  # None -> 4 * n_embd, as in transformers
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


def config_from_hf(hf_config: Any) -> GPT2Config:
    """GPT2Config from a ``transformers.GPT2Config`` (or anything with the same fields)."""
    if getattr(hf_config, "activation_function", "gelu_new") != "gelu_new":
        raise NotImplementedError(f"activation {hf_config.activation_function!r}")
    if getattr(hf_config, "reorder_and_upcast_attn", False):
        raise NotImplementedError("reorder_and_upcast_attn")
    return GPT2Config(
        vocab_size=hf_config.vocab_size,
        n_positions=hf_config.n_positions,
        n_embd=hf_config.n_embd,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_inner=hf_config.n_inner,
        layer_norm_epsilon=hf_config.layer_norm_epsilon,
        scale_attn_weights=hf_config.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=hf_config.scale_attn_by_inverse_layer_idx,
    )


def gelu_new(x):
    """transformers' ``gelu_new``: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return jax.nn.gelu(x, approximate=True)


def _layer_norm(config: GPT2Config, name: str) -> nn.LayerNorm:
    # use_fast_variance=False computes E[(x - mean)^2], as torch does.
    return nn.LayerNorm(epsilon=config.layer_norm_epsilon, use_fast_variance=False, name=name)


class GPT2Attention(nn.Module):
    config: GPT2Config
    layer_idx: int

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        b, t, d = x.shape
        hd = d // cfg.n_head
        qkv = nn.Dense(3 * d, name="c_attn")(x)  # Conv1D: kernel (in, out)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        # (b, t, d) -> (b, heads, t, head_dim)
        q, k, v = (a.reshape(b, t, cfg.n_head, hd).transpose(0, 2, 1, 3) for a in (q, k, v))
        scale = 1.0
        if cfg.scale_attn_weights:
            scale = hd**-0.5
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(self.layer_idx + 1)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
        out = out.transpose(0, 2, 1, 3).reshape(b, t, d)
        return nn.Dense(d, name="c_proj")(out)


class GPT2MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.config.inner_dim, name="c_fc")(x)
        h = gelu_new(h)
        return nn.Dense(self.config.n_embd, name="c_proj")(h)


class GPT2Block(nn.Module):
    config: GPT2Config
    layer_idx: int

    @nn.compact
    def __call__(self, x):
        x = x + GPT2Attention(self.config, self.layer_idx, name="attn")(_layer_norm(self.config, "ln_1")(x))
        x = x + GPT2MLP(self.config, name="mlp")(_layer_norm(self.config, "ln_2")(x))
        return x


class GPT2Blocks(nn.Module):
    """The ``h`` ModuleList: children are named "0", "1", ... like torch's."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        for i in range(self.config.n_layer):
            x = GPT2Block(self.config, i, name=str(i))(x)
        return x


class GPT2Model(nn.Module):
    config: GPT2Config

    def setup(self):
        cfg = self.config
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd)
        self.h = GPT2Blocks(cfg)
        self.ln_f = _layer_norm(cfg, "ln_f")

    def __call__(self, input_ids):
        t = input_ids.shape[-1]
        x = self.wte(input_ids) + self.wpe(jnp.arange(t))
        return self.ln_f(self.h(x))

    def logits(self, hidden):
        """Tied LM head: hidden @ wte.T."""
        return self.wte.attend(hidden)


class GPT2LMHeadModel(nn.Module):
    """``apply({"params": p}, input_ids)`` -> logits (batch, seq, vocab)."""

    config: GPT2Config

    def setup(self):
        self.transformer = GPT2Model(self.config)

    def __call__(self, input_ids):
        return self.transformer.logits(self.transformer(input_ids))


def peft_module_name(path) -> str:
    """Flax param path (tuple of keys or "a/b/c" string) -> torch/PEFT module name."""
    if isinstance(path, str):
        path = path.split("/")
    parts = [getattr(p, "key", p) for p in path]  # accept jax tree-path DictKey entries
    parts = [str(p) for p in parts]
    if parts and parts[0] == "params":
        parts = parts[1:]
    return ".".join(parts[:-1])


# Buffers some transformers versions keep in the state_dict; not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # torch.Tensor
        return x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def params_from_torch(state_dict: Mapping[str, Any]) -> dict:
    """Convert a GPT2LMHeadModel ``state_dict`` (numpy arrays or torch tensors) to Flax params.

    Returns the ``params`` collection (use as ``model.apply({"params": p}, ids)``).
    Raises on any key it does not understand.
    """
    sd = {k: _to_numpy(v) for k, v in state_dict.items()}
    params: dict = {}
    for key, value in sd.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if key == "lm_head.weight":
            if "transformer.wte.weight" in sd and not np.array_equal(value, sd["transformer.wte.weight"]):
                raise ValueError("lm_head.weight is not tied to transformer.wte.weight")
            continue
        *mod, leaf = key.split(".")
        if not mod or mod[0] != "transformer":
            raise KeyError(f"unexpected GPT-2 state_dict key {key!r}")
        last = mod[-1]
        if last in ("wte", "wpe"):
            if leaf != "weight":
                raise KeyError(key)
            name = "embedding"
        elif last.startswith("ln_"):
            name = {"weight": "scale", "bias": "bias"}[leaf]
        elif last in ("c_attn", "c_proj", "c_fc"):
            # Conv1D weight is (in, out): same layout as a Flax Dense kernel.
            name = {"weight": "kernel", "bias": "bias"}[leaf]
        else:
            raise KeyError(f"unexpected GPT-2 state_dict key {key!r}")
        node = params
        for m in mod:
            node = node.setdefault(m, {})
        node[name] = jnp.asarray(value)
    return params


def make_tiny_torch_gpt2(seed: int = 0, *, perturb: bool = True, **config_overrides):
    """A tiny randomly initialised ``transformers.GPT2LMHeadModel``.

    float32, eval mode, all dropout probabilities 0, eager attention. Defaults:
    n_embd 64, n_layer 2, n_head 4, vocab 128, n_positions 64 (override with
    keyword arguments). HF initialises biases to 0 and LayerNorm weights to 1;
    with ``perturb=True`` (default) those get small random values too so that a
    wrong mapping of any tensor shows up in a comparison.
    """
    import torch
    import transformers

    kwargs = dict(
        vocab_size=128,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    kwargs.update(config_overrides)
    # GPT-2's default bos/eos id 50256 is outside a tiny vocabulary.
    kwargs.setdefault("bos_token_id", kwargs["vocab_size"] - 1)
    kwargs.setdefault("eos_token_id", kwargs["vocab_size"] - 1)
    config = transformers.GPT2Config(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).to(torch.float32).eval()
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))
                elif ".ln_" in name and name.endswith(".weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return model
