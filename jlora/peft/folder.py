"""Reading a PEFT adapter folder: its config and its tensors, sorted by role.

Only JSON and safetensors are read (``safetensors.numpy``): no torch, no
pickle, no code from the folder runs. ``read`` checks the config
(``jlora.peft.config``) and a jlora folder's checksums (``jlora.peft.mark``);
``parse_keys`` refuses every key that is not a tensor PEFT writes, and
factors that are not floating point.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jlora import _atomic
from jlora.errors import LoraPeftError
from jlora.peft import config as peft_config
from jlora.peft import mark, names


def read(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """The folder's checked ``adapter_config.json`` and its tensors by key."""
  path = os.fspath(_atomic.resolve(path))
  _atomic.check_readable(path, LoraPeftError)
  if not os.path.isdir(path):
    raise LoraPeftError(f"'{path}' is not a folder (expected a PEFT adapter folder with "
                        f"{names.CONFIG_NAME} and {names.WEIGHTS_NAME})")
  cfg_file = os.path.join(path, names.CONFIG_NAME)
  if not os.path.isfile(cfg_file):
    raise LoraPeftError(f"'{path}' has no {names.CONFIG_NAME}")
  config = peft_config.read(cfg_file)
  peft_config.check(config, cfg_file)
  weights = os.path.join(path, names.WEIGHTS_NAME)
  if not os.path.isfile(weights):
    if os.path.isfile(os.path.join(path, names.PICKLE_NAME)):
      raise LoraPeftError(
          f"'{path}' holds {names.PICKLE_NAME}, a pickle, which jlora never reads (it can "
          f"run code). Re-save it in PEFT with safe_serialization=True")
    raise LoraPeftError(f"'{path}' has no {names.WEIGHTS_NAME}")
  from safetensors import safe_open
  try:
    with safe_open(weights, "numpy") as f:
      meta = f.metadata()
      tensors = {key: f.get_tensor(key) for key in f.keys()}
  except Exception as e:  # safetensors raises its own error types
    raise LoraPeftError(f"'{weights}' is not a readable safetensors file: "
                        f"{' '.join(str(e).split())}") from None
  mark.check(config, tensors, meta, path)
  return config, tensors


def parse_keys(tensors: Mapping[str, np.ndarray], config: Mapping[str, Any], weights: str):
  """The file's tensors by role: adapter parts by module name (``A``/``B``,
  ``embA``/``embB``, ``m``), ``modules_to_save`` weights, and the copies of
  base weights PEFT saves with an adapted embedding (``<module>.base_layer.weight``)."""
  lora: dict[str, dict[str, tuple[str, np.ndarray]]] = collections.defaultdict(dict)
  full: dict[tuple[str, str], tuple[str, np.ndarray]] = {}
  copies: dict[str, tuple[str, np.ndarray]] = {}
  for key, value in tensors.items():
    rest = names.strip_prefix(key)
    if rest is None:
      raise LoraPeftError(
          f"'{weights}': key '{key}' lacks the '{names.KEY_PREFIX}' prefix PEFT writes; PEFT "
          f"would load such a file with every factor left at its initial value")
    parsed = names.parse_adapter_key(rest)
    if parsed:
      module, part = parsed
      if part == "m" and not config.get("use_dora"):
        raise LoraPeftError(f"'{weights}': key '{key}' is a DoRA magnitude, but "
                            f"adapter_config.json has use_dora=false; the folder is "
                            f"inconsistent")
      if not jnp.issubdtype(value.dtype, jnp.floating):
        # An integer or bool factor would be cast to float and used as is:
        # no PEFT writer stores one, so the file is damaged or not LoRA.
        raise LoraPeftError(f"'{weights}': key '{key}' has dtype {value.dtype}; LoRA factors "
                            f"must be floating point (float32, float16, bfloat16)")
      lora[module][part] = (key, value)
      continue
    if rest.endswith(names.BASE_LAYER + ".weight"):
      copies[rest[:-len(names.BASE_LAYER + ".weight")]] = (key, value)
      continue
    kind = names.key_kind(rest)
    if kind == "lora_bias":
      raise LoraPeftError(f"'{weights}': key '{key}' is a LoRA bias (lora_bias=True), "
                          f"which jlora does not support")
    if kind != "full":
      raise LoraPeftError(f"'{weights}': key '{key}' is not a LoRA tensor jlora knows")
    module, _, param = rest.rpartition(".")
    if not module or not peft_config.is_saved_module(config, module):
      raise LoraPeftError(
          f"'{weights}': unexpected key '{key}': not a lora_A/lora_B weight and not in "
          f"modules_to_save {config.get('modules_to_save')!r}")
    full[(module, param)] = (key, value)
  return lora, full, copies
