"""The names of a PEFT adapter folder: files, tensor keys, module templates.

A PEFT LoRA adapter is a folder with ``adapter_config.json`` and
``adapter_model.safetensors``. Its tensors are keyed by PyTorch module name:
``base_model.model.<module>.lora_A.weight`` (``(r, in)``) and
``...lora_B.weight`` (``(out, r)``); a module trained in full
(``modules_to_save``) is stored as ``base_model.model.<module>.<param>``.

jlora names a stacked weight (an ``nn.scan`` layer axis) by a module *template*
with a ``{}`` field per stack axis: ``model.layers.{0}.self_attn.q_proj``.

Everything here is defined once and used by export, import and describe.

Example:
  >>> lora_key("transformer.h.0.attn.c_attn", "A")
  'base_model.model.transformer.h.0.attn.c_attn.lora_A.weight'
  >>> parse_lora_key("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight")
  ('transformer.h.0.attn.c_attn', 'B')
  >>> n_stack("model.layers.{0}.mlp.up_proj"), fill("model.layers.{0}.mlp.up_proj", (3,))
  (1, 'model.layers.3.mlp.up_proj')
"""

from __future__ import annotations

import re
import string
from typing import Sequence

from jlora.errors import LoraSpecError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT's pickle format; jlora never reads it (unpickling can run code).
PICKLE_NAME = "adapter_model.bin"
# PeftModel wraps the base model as ``base_model.model``; keys without this
# prefix load in PEFT with only a warning and every B left at zero.
KEY_PREFIX = "base_model.model."
# Flax leaf name -> PyTorch parameter name, for modules trained in full.
DEFAULT_LEAF_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight",
                      "embedding": "weight", "weight": "weight"}
# The safetensors metadata PEFT writes.
SAFETENSORS_METADATA = {"format": "pt"}

_LORA_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")
_EMBEDDING_KEY = re.compile(r"(.+)\.lora_embedding_([AB])")
_MAGNITUDE_KEY = re.compile(r"(.+)\.lora_magnitude_vector")
_LORA_BIAS = re.compile(r".*\.lora_[AB]\.bias")
# The wrapper PEFT puts around an adapted module; one more per adapted
# parameter of a module (target_parameters nests them).
BASE_LAYER = ".base_layer"


def lora_key(module: str, half: str) -> str:
  """The file key of ``module``'s ``lora_A`` or ``lora_B`` (``half`` "A"/"B")."""
  return f"{KEY_PREFIX}{module}.lora_{half}.weight"


def embedding_key(module: str, half: str) -> str:
  """The file key of an ``nn.Embedding``'s ``lora_embedding_A`` or ``_B``."""
  return f"{KEY_PREFIX}{module}.lora_embedding_{half}"


def magnitude_key(module: str) -> str:
  """The file key of a DoRA magnitude."""
  return f"{KEY_PREFIX}{module}.lora_magnitude_vector"


def nested(module: str, depth: int) -> str:
  """The name under which PEFT saves the ``depth``-th innermost wrapper of a
  module adapted through several of its parameters."""
  return module + BASE_LAYER * depth


def unnest(name: str) -> tuple[str, int]:
  """``("m", 2)`` for ``"m.base_layer.base_layer"``.

  Example:
    >>> unnest("mlp.experts.base_layer"), unnest("mlp.experts")
    (('mlp.experts', 1), ('mlp.experts', 0))
  """
  depth = 0
  while name.endswith(BASE_LAYER):
    name, depth = name[:-len(BASE_LAYER)], depth + 1
  return name, depth


def parse_adapter_key(key: str) -> tuple[str, str] | None:
  """``(module, part)`` of an adapter tensor key without the prefix: part is
  "A"/"B" (lora_A/B), "embA"/"embB" (lora_embedding_A/B) or "m" (a DoRA
  magnitude); None for other keys."""
  for regex, parts in ((_LORA_KEY, None), (_EMBEDDING_KEY, "emb"), (_MAGNITUDE_KEY, "m")):
    m = regex.fullmatch(key)
    if m:
      if parts == "m":
        return m.group(1), "m"
      return m.group(1), (parts or "") + m.group(2)
  return None


def full_key(module: str, param: str) -> str:
  """The file key of a parameter of a module trained in full."""
  return f"{KEY_PREFIX}{module}.{param}"


def strip_prefix(key: str) -> str | None:
  """``key`` without ``base_model.model.``; None if it lacks the prefix."""
  return key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else None


def parse_lora_key(key: str) -> tuple[str, str] | None:
  """``(module, "A" | "B")`` of a lora_A/lora_B key; None for other keys."""
  rest = strip_prefix(key)
  m = _LORA_KEY.fullmatch(rest if rest is not None else key)
  return (m.group(1), m.group(2)) if m else None


def key_kind(rest: str) -> str:
  """What a key (without the prefix) that is not lora_A/lora_B holds:
  "dora", "embedding", "lora_bias", "lora_other" or "full"."""
  if "lora_magnitude_vector" in rest:
    return "dora"
  if "lora_embedding_" in rest:
    return "embedding"
  if _LORA_BIAS.fullmatch(rest):
    return "lora_bias"
  if ".lora_" in rest or rest.startswith("lora_"):
    return "lora_other"
  return "full"


def stack_fields(template: str) -> list[int]:
  """Positions of the stack-index fields of a module-name template."""
  out, auto = [], 0
  for _, field, _, _ in string.Formatter().parse(template):
    if field is None:
      continue
    if field == "":
      out.append(auto)
      auto += 1
    elif field.isdigit():
      out.append(int(field))
    else:
      raise LoraSpecError(f"module name template {template!r}: fields must be '{{}}' or "
                          f"'{{0}}', '{{1}}'... (stack indices), got {{{field}}}")
  return out


def n_stack(template: str) -> int:
  """How many stack indices a module-name template takes."""
  fields = stack_fields(template)
  return max(fields) + 1 if fields else 0


def fill(template: str, index: Sequence[int]) -> str:
  """The module name of one slice of a stacked weight."""
  return template.format(*index)


def first_module(template: str) -> str:
  """The module name of the first slice (all stack indices 0)."""
  return template.format(*([0] * n_stack(template)))


def template_regex(template: str) -> tuple[re.Pattern, list[int]]:
  """A regex matching the template's module names, and which stack index each
  group is."""
  out, positions, auto = [], [], 0
  for lit, field, _, _ in string.Formatter().parse(template):
    out.append(re.escape(lit))
    if field is not None:
      out.append(r"(\d+)")
      positions.append(auto if field == "" else int(field))
      auto += field == ""
  return re.compile("".join(out)), positions


def fused_parts(module: str) -> tuple[str, ...]:
  """The PyTorch modules a fused kernel's module name stands for: a last
  segment that joins names with ``+`` (``attn.k_proj+v_proj``) is several
  modules (``attn.k_proj``, ``attn.v_proj``); any other name is itself.

  Example:
    >>> fused_parts("model.layers.0.self_attn.k_proj+v_proj")
    ('model.layers.0.self_attn.k_proj', 'model.layers.0.self_attn.v_proj')
    >>> fused_parts("model.layers.0.mlp.up_proj")
    ('model.layers.0.mlp.up_proj',)
  """
  prefix, dot, last = module.rpartition(".")
  if "+" not in last:
    return (module,)
  return tuple(f"{prefix}{dot}{part}" for part in last.split("+"))
