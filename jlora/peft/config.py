r"""The policy for ``adapter_config.json``: what jlora refuses, and PEFT's matching.

jlora loads a PEFT adapter only if it can compute exactly what PEFT would:
options that change the adapted function and that jlora lacks (DoRA, trained
biases, PiSSA-style initialisations, other PEFT types, unknown keys) are
refused, naming the option. The functions below reproduce how PEFT 0.21
decides which modules a config targets, trains in full, and which rank and
alpha each module gets, so a file is read as PEFT reads it.

Example:
  >>> config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
  ...           "target_modules": ["q_proj", "v_proj"], "rank_pattern": {r"^layers\.0\.q_proj": 2}}
  >>> check(config, "adapter_config.json")
  >>> pattern_value(config["rank_pattern"], "layers.0.q_proj", 4), targets(config, "layers.1.q_proj")
  (2, True)
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

from jlora.errors import LoraPeftError

# Options that change what an adapter computes and that jlora does not
# implement: loading them would silently give a different model.
MUST_BE_OFF = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a trained bias on lora_B",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets",
    "trainable_token_indices": "trainable tokens",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "the KaSA variant",
    "monteclora_config": "the MonteCLoRA variant",
    "velora_config": "the VeLoRA variant",
}
# Keys that do not change the adapted function (metadata, initialisation of
# a fresh adapter, distribution) or that load_peft interprets itself.
KNOWN = {
    "peft_type", "r", "lora_alpha", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "use_rslora", "modules_to_save", "lora_dropout", "bias", "fan_in_fan_out",
    "init_lora_weights", "auto_mapping", "base_model_name_or_path", "revision",
    "task_type", "inference_mode", "peft_version", "megatron_config",
    "megatron_core", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "qalora_group_size", "ensure_weight_tying", "runtime_config",
}
# init_lora_weights values whose adapter is relative to the unmodified base.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def check(config: Mapping[str, Any], where: str) -> None:
  if not isinstance(config, Mapping):
    raise LoraPeftError(f"{where}: expected a JSON object, got {type(config).__name__}")
  if "peft_type" not in config:
    raise LoraPeftError(f"{where}: no 'peft_type' (PEFT itself cannot load this config)")
  if config["peft_type"] != "LORA":
    raise LoraPeftError(f"{where}: peft_type {config['peft_type']!r} is not supported; "
                        f"jlora reads LoRA adapters only (peft_type 'LORA')")
  if config.get("bias", "none") != "none":
    raise LoraPeftError(
        f"{where}: bias={config['bias']!r} is not supported (the adapter carries trained "
        f"biases of the base model); only bias='none' is")
  for key, what in MUST_BE_OFF.items():
    value = config.get(key)
    if value not in (None, False, {}, [], ""):
      raise LoraPeftError(f"{where}: {key}={value!r} ({what}) is not supported by jlora")
  init = config.get("init_lora_weights", True)
  if init not in PLAIN_INITS:
    raise LoraPeftError(
        f"{where}: init_lora_weights={init!r} is not supported: such an adapter is "
        f"relative to a base model PEFT modified at initialisation (PiSSA, OLoRA, "
        f"CorDA, LoftQ, LoRA-GA) or is a LoRA variant (MiCA). Convert it in PEFT with "
        f"save_pretrained(..., path_initial_model_for_weight_conversion=...) first")
  for key, value in config.items():
    if key not in KNOWN and key not in MUST_BE_OFF and value not in (None, False, {}, [], ""):
      raise LoraPeftError(f"{where}: unknown option {key}={value!r}; jlora cannot tell "
                          f"whether it changes the adapter, so it refuses to guess")
  r = config.get("r")
  if isinstance(r, bool) or not isinstance(r, int) or r < 1:
    raise LoraPeftError(f"{where}: r must be an integer >= 1, got {r!r}")
  alpha = config.get("lora_alpha")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise LoraPeftError(f"{where}: lora_alpha must be a number > 0, got {alpha!r}")
  for key in ("rank_pattern", "alpha_pattern"):
    if not isinstance(config.get(key) or {}, Mapping):
      raise LoraPeftError(f"{where}: {key} must be an object, got {config[key]!r}")


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
  # PEFT's get_pattern_key: the first key matching a '.'-aligned suffix.
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def is_saved_module(config: Mapping[str, Any], module: str) -> bool:
  # PEFT's _set_trainable: a plain suffix test, no '.' boundary.
  return any(module.endswith(m) for m in config.get("modules_to_save") or ())


def targets(config: Mapping[str, Any], module: str) -> bool | None:
  """Whether PEFT's check_target_module_exists selects ``module``; None: unknown."""
  exclude = config.get("exclude_modules")
  if exclude:
    if isinstance(exclude, str):
      if re.fullmatch(exclude, module):
        return False
    elif module in exclude or any(module.endswith(f".{e}") for e in exclude):
      return False
  for m in config.get("modules_to_save") or ():
    if re.match(rf"(^|.*\.){m}($|\..*)", module):
      return False
  targets = config.get("target_modules")
  if targets is None or targets == "all-linear":
    return None  # resolved by PEFT from the PyTorch module types
  if isinstance(targets, str):
    return re.fullmatch(targets, module) is not None
  if module in targets:
    return True
  found = any(module.endswith(f".{t}") for t in targets)
  layers = config.get("layers_to_transform")
  if found and layers not in (None, []):
    pattern = config.get("layers_pattern")
    match = None
    if not pattern:
      match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
      for p in [pattern] if isinstance(pattern, str) else pattern:
        match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
        if match is not None:
          break
    if match is None:
      return False
    idx = int(match.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers
  return found


def read(cfg_file: str | os.PathLike) -> dict[str, Any]:
  """The JSON object in ``adapter_config.json``; LoraPeftError if it is not one."""
  try:
    with open(cfg_file) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise LoraPeftError(f"'{cfg_file}' is not valid JSON: {e}") from None
  if not isinstance(config, dict):
    raise LoraPeftError(f"'{cfg_file}': expected a JSON object, got {type(config).__name__}")
  return config
