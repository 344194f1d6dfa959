"""PEFT rules for google-tunix's Llama 3, Qwen 3 and Gemma 3 (``Rules.tunix``).

The module names come from Tunix itself: each family's parameter loader maps
Hugging Face keys to the model's NNX paths
(``tunix.models.<family>.params._get_key_and_transform_mapping``), read here
at run time, so that the rules follow the Tunix that is installed and there
is no second table to drift from it. Each row that renames a weight
(``model\\.layers\\.([0-9]+)\\.self_attn\\.q_proj\\.weight`` ->
``layers.\\1.attn.q_proj.w``) becomes a ``Rules`` pattern
(``layers/{g1}/attn/q_proj`` <-> ``model.layers.{g1}.self_attn.q_proj``).

What that table does not hold is stated here:

* the layout of each multi-axis attention kernel, from the einsums of the
  family's ``model.py`` (``tests/test_peft_tunix.py`` holds them to
  ``jlora.infer_layouts`` of the models): Llama 3 and Qwen 3 store
  ``q_proj``/``k_proj``/``v_proj`` as ``(D, heads, H)`` and ``o_proj`` as
  ``(N, H, D)``; Gemma 3 stores ``q_einsum`` ``(N, D, H)`` and
  ``attn_vec_einsum`` ``(N, H, D)``;
* Gemma 3's fused kernels, which its safetensors loader stacks from the
  rows it sends to ``tmp.``: ``kv_einsum`` ``(2, K, D, H)`` is ``k_proj``
  and ``v_proj``, and ``qkv_einsum`` ``(3, N, D, H)`` (when ``N == K``) is
  ``q_proj``, ``k_proj`` and ``v_proj``, named ``...self_attn.k_proj+v_proj``
  (``jlora.peft.names.fused_parts``).
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from jlora.errors import LoraSpecError
from jlora.layout import Layout

FAMILIES = ("gemma3", "llama3", "qwen3")

# Where each family keeps its Hugging Face key table, and a preset config for
# a family named by string (the names do not depend on the sizes).
_TABLES = {"llama3": "tunix.models.llama3.params", "qwen3": "tunix.models.qwen3.params",
           "gemma3": "tunix.models.gemma3.params_safetensors"}
_PRESETS = {"llama3": "llama3p2_1b", "qwen3": "qwen3_0p6b", "gemma3": "gemma3_1b_pt"}

_IN_D = Layout((0,), (1, 2))          # (D, heads, H): x @ W over D
_OUT_D = Layout((0, 1), (2,))         # (N, H, D): heads and H contracted
_LAYOUTS = {
    "llama3": {"q_proj": _IN_D, "k_proj": _IN_D, "v_proj": _IN_D, "o_proj": _OUT_D},
    "qwen3": {"q_proj": _IN_D, "k_proj": _IN_D, "v_proj": _IN_D, "o_proj": _OUT_D},
    "gemma3": {"q_einsum": Layout((1,), (0, 2)),            # 'BTD,NDH->BTNH'
               "kv_einsum": Layout((2,), (0, 1, 3)),        # 'BSD,CKDH->CBSKH'
               "qkv_einsum": Layout((2,), (0, 1, 3)),       # 'BTD,SNDH->SBTNH'
               "attn_vec_einsum": _OUT_D},                  # 'BTNH,NHD->BTD'
}
# Gemma 3's loader: the Tunix kernel <- the rows sent to tmp.layers.N.attn.<slot>.
_GEMMA3_FUSED = {"q_einsum": ("q",), "kv_einsum": ("k", "v"), "qkv_einsum": ("q", "k", "v")}

_LEAF_NAMES = {"w": "weight", "kernel": "weight", "scale": "weight",
               "input_embedding": "weight"}
_INDEX = re.escape("([0-9]+)")


def family_of(model: Any) -> tuple[str, Any]:
  """``(family, ModelConfig or None)`` of a Tunix model, its config, a
  ``jlora.nnx.LoraModule`` around one, or a family name."""
  if isinstance(model, str):
    family, config = model, None
    what = repr(model)
  else:
    obj = getattr(model, "base_model", model)    # a jlora.nnx.LoraModule
    config = obj if type(obj).__name__ == "ModelConfig" else getattr(obj, "config", None)
    found = re.fullmatch(r"tunix\.models\.(\w+)\.model", type(config).__module__ or "")
    family = found.group(1) if found else None
    what = (f"Tunix family '{family}' ({type(obj).__name__})" if family
            else f"{type(obj).__module__}.{type(obj).__name__}, not a Tunix model")
  if family not in FAMILIES:
    raise LoraSpecError(f"jlora.peft.Rules.tunix: no PEFT rules for {what}; supported: "
                        f"{', '.join(FAMILIES)} (a tunix.models.<family> model, its "
                        f"ModelConfig, or the family's name)")
  return family, config


def _table(family: str, config: Any) -> dict[str, Any]:
  try:
    params = importlib.import_module(_TABLES[family])
    model = importlib.import_module(f"tunix.models.{family}.model")
  except ImportError as e:
    raise LoraSpecError(f"jlora.peft.Rules.tunix('{family}') reads Tunix's own key table "
                        f"({_TABLES[family]}): {e}; install google-tunix") from None
  table = getattr(params, "_get_key_and_transform_mapping", None)
  if table is None:
    raise LoraSpecError(f"jlora.peft.Rules.tunix('{family}'): {_TABLES[family]} has no "
                        f"_get_key_and_transform_mapping; this Tunix version is not supported "
                        f"(google-tunix 0.1.7 is)")
  if config is None:
    config = getattr(model.ModelConfig, _PRESETS[family])()
  return table(config)


def _row(torch_key: str, nnx_key: str) -> tuple[str, str, str] | None:
  """One row of Tunix's table as ``(flax module template, torch module
  template, leaf)``, or None when it renames no weight of a module."""
  t = torch_key.replace(r"(?:language_model\.)?", "")
  if not t.endswith(r"\.weight"):
    return None
  t = t[:-len(r"\.weight")]
  count = iter(range(1, 100))
  t = re.sub(_INDEX, lambda _: "{g%d}" % next(count), t)
  if re.search(r"[()|*+?\[\]^$]", t.replace("\\.", "")):   # alternatives, wildcards
    return None
  flax = re.sub(r"\\(\d+)", r"{g\1}", nnx_key).replace(".", "/")
  module, _, leaf = flax.rpartition("/")
  if not module or module.split("/")[0] == "unused":
    return None
  return module, t.replace("\\.", "."), leaf


def rules(model: Any, tie_word_embeddings: bool | None = None):
  """The ``jlora.peft.Rules`` of a Tunix model (see ``Rules.tunix``)."""
  from jlora.peft.rules import Rules
  family, config = family_of(model)
  patterns: list[tuple[str, str]] = []
  slots: dict[str, tuple[str, str]] = {}    # Gemma's tmp slot -> (flax parent, torch name)
  for torch_key, (nnx_key, _) in _table(family, config).items():
    row = _row(torch_key, nnx_key)
    if row is None:
      continue
    module, torch, leaf = row
    if module.split("/")[0] == "tmp":
      slots[leaf] = (module.removeprefix("tmp/"), torch)
    elif (module, torch) not in patterns:
      patterns.append((module, torch))
  if family == "gemma3":
    for kernel, parts in _GEMMA3_FUSED.items():
      if not all(p in slots for p in parts):
        raise LoraSpecError(f"jlora.peft.Rules.tunix('gemma3'): Tunix's key table has no "
                            f"rows for {[p for p in parts if p not in slots]} of '{kernel}'; "
                            f"this Tunix version is not supported")
      parent = slots[parts[0]][0]
      prefix = slots[parts[0]][1].rpartition(".")[0]
      last = "+".join(slots[p][1].rpartition(".")[2] for p in parts)
      patterns.append((f"{parent}/{kernel}", f"{prefix}.{last}"))
  if tie_word_embeddings is None:
    tie_word_embeddings = family == "gemma3" or bool(
        getattr(config, "weight_tying", False) or getattr(config, "use_tied_embedding", False))
  tied = {"model.embed_tokens": ("lm_head",)} if tie_word_embeddings else {}
  layouts = {rf"(?:.*/)?attn/{re.escape(name)}/w": layout
             for name, layout in _LAYOUTS[family].items()}
  return Rules(patterns=patterns, leaf_names=dict(_LEAF_NAMES), kernel_leaves=("w", "kernel"),
               embedding_leaves=("input_embedding",), kernel_order="in_out", tied=tied,
               layouts=layouts)
