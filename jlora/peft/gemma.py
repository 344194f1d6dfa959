"""PEFT rules for the gemma library's Gemma 3 (``Rules.gemma``).

google-deepmind's ``gemma`` package (``gemma.gm.nn.Gemma3_1B``, ... a Flax
Linen ``gm.nn.Transformer``) stores each layer's weights as einsum kernels;
``transformers``' ``Gemma3ForCausalLM`` holds the same function as
``nn.Linear`` modules. The names and the layouts (from the einsums of
``gemma/gm/nn/_modules.py``; ``tests/test_peft_gemma.py`` holds them to
``jlora.infer_layouts`` of the model) are all stated here:

=====================================  ==========================================  ==========
gemma library (under ``layer_<i>/``)    ``model.layers.<i>.``                       layout
=====================================  ==========================================  ==========
``attn/q_einsum/w`` ``(N, D, H)``       ``self_attn.q_proj``                        in 1
``attn/kv_einsum/w`` ``(2, K, D, H)``   ``self_attn.k_proj+v_proj``                 in 2
``attn/qkv_einsum/w`` ``(3, N, D, H)``  ``self_attn.q_proj+k_proj+v_proj``          in 2
``attn/attn_vec_einsum/w`` ``(N,H,D)``  ``self_attn.o_proj``                        in 0, 1
``mlp/gating_einsum`` ``(2, F, D)``     ``mlp.gate_proj+up_proj``                   in 2
``mlp/linear`` ``(F, D)``               ``mlp.down_proj``                           in 0
=====================================  ==========================================  ==========

``qkv_einsum`` is the model's when it has as many kv heads as heads.
``gating_einsum`` is ``(2, D, F)`` (in 1) for a config with
``transpose_gating_einsum=False`` (Gemma 2). A ``+`` joins the PyTorch
modules of a fused kernel, stacked along its first output axis
(``jlora.peft.fused``). ``embedder/input_embedding`` is ``model.embed_tokens``,
tied to ``lm_head`` (the model decodes with the same table), and the norms'
``scale`` leaves are the PyTorch norms' ``weight`` (both compute
``x * (1 + scale)``). The vision encoder and the multimodal projection have
no module in a text-only ``Gemma3ForCausalLM``: the rules name none.
"""

from __future__ import annotations

import re
from typing import Any

from jlora.errors import LoraSpecError
from jlora.layout import Layout

_ATTN = {"q_einsum": "self_attn.q_proj", "kv_einsum": "self_attn.k_proj+v_proj",
         "qkv_einsum": "self_attn.q_proj+k_proj+v_proj", "attn_vec_einsum": "self_attn.o_proj",
         "_query_norm": "self_attn.q_norm", "_key_norm": "self_attn.k_norm"}
_MLP = {"gating_einsum": "mlp.gate_proj+up_proj", "linear": "mlp.down_proj"}
_NORMS = {"pre_attention_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
          "pre_ffw_norm": "pre_feedforward_layernorm",
          "post_ffw_norm": "post_feedforward_layernorm"}
_TOP = {"embedder/input_embedding": "model.embed_tokens", "final_norm/scale": "model.norm"}

_LAYOUTS = {"attn/q_einsum/w": Layout((1,), (0, 2)),           # 'BTD,NDH->BTNH'
            "attn/kv_einsum/w": Layout((2,), (0, 1, 3)),       # 'BSD,CKDH->CBSKH'
            "attn/qkv_einsum/w": Layout((2,), (0, 1, 3)),      # 'BTD,SNDH->SBTNH'
            "attn/attn_vec_einsum/w": Layout((0, 1), (2,)),    # 'BTNH,NHD->BTD'
            "mlp/linear": Layout((0,), (1,))}                  # '...H,HF->...F'
_GATING = {True: Layout((2,), (0, 1)),                         # '...F,NHF->...NH'
           False: Layout((1,), (0, 2))}                        # '...F,NFH->...NH'

_LEAF_NAMES = {"w": "weight", "scale": "weight", "input_embedding": "weight",
               "gating_einsum": "weight", "linear": "weight"}
_PREFIX = r"(?:params/)?"
_LAYER = re.compile(_PREFIX + r"layer_(\d+)/(.+)")


def module_name(path: str) -> str | None:
  """The ``Gemma3ForCausalLM`` module of a gemma-library parameter path
  (``[params/]layer_0/attn/q_einsum/w`` -> ``model.layers.0.self_attn.q_proj``),
  or None for a weight that model has no module for."""
  top = re.sub("^" + _PREFIX, "", path)
  if top in _TOP:
    return _TOP[top]
  found = _LAYER.fullmatch(path)
  if found is None:
    return None
  layer, rest = found.groups()
  parts = rest.split("/")
  name = None
  if len(parts) == 3 and parts[0] == "attn" and parts[2] in ("w", "scale"):
    name = _ATTN.get(parts[1])
  elif len(parts) == 2 and parts[0] == "mlp":
    name = _MLP.get(parts[1])
  elif len(parts) == 2 and parts[1] == "scale":
    name = _NORMS.get(parts[0])
  return None if name is None else f"model.layers.{layer}.{name}"


def _transpose_gating(model: Any) -> bool:
  """``transpose_gating_einsum`` of a ``gm.nn.Transformer`` or its config."""
  config = getattr(model, "config", model)
  kind = f"{type(model).__module__}.{type(model).__name__}"
  if ".gemma3n." in kind or not hasattr(config, "transpose_gating_einsum"):
    raise LoraSpecError(f"jlora.peft.Rules.gemma: no PEFT rules for {kind}; supported: the "
                        f"gemma library's Gemma 3 (a gemma.gm.nn.Transformer such as "
                        f"gm.nn.Gemma3_1B, or its TransformerConfig)")
  return bool(config.transpose_gating_einsum)


def rules(model: Any = None, transpose_gating_einsum: bool | None = None):
  """The ``jlora.peft.Rules`` of the gemma library's Gemma 3 (see ``Rules.gemma``)."""
  from jlora.peft.rules import Rules
  if model is not None:
    transpose_gating_einsum = _transpose_gating(model)
  elif transpose_gating_einsum is None:
    transpose_gating_einsum = True        # every Gemma 3 of the library
  layouts = {rf"(?:.*/)?layer_\d+/{re.escape(k)}": v for k, v in _LAYOUTS.items()}
  layouts[r"(?:.*/)?layer_\d+/mlp/gating_einsum"] = _GATING[transpose_gating_einsum]
  return Rules(function=module_name, leaf_names=dict(_LEAF_NAMES),
               kernel_leaves=("w", "gating_einsum", "linear"),
               embedding_leaves=("input_embedding",), kernel_order="in_out",
               tied={"model.embed_tokens": ("lm_head",)}, layouts=layouts)
