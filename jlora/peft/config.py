r"""The policy for ``adapter_config.json``: what jlora refuses, and PEFT's matching.

jlora loads a PEFT adapter only if it can compute exactly what PEFT would:
options that change the adapted function and that jlora lacks (trained
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
import reprlib
from typing import Any, Mapping

from jlora.errors import LoraPeftError
from jlora.peft import names

# Options that change what an adapter computes and that jlora does not
# implement: loading them would silently give a different model.
MUST_BE_OFF = {
    "lora_bias": "a trained bias on lora_B",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "the KaSA variant",
    "monteclora_config": "the MonteCLoRA variant",
    "velora_config": "the VeLoRA variant",
}
# Keys that do not change the adapted function (metadata, initialisation of
# a fresh adapter, distribution) or that jlora.peft.load interprets itself.
KNOWN = {
    "peft_type", "r", "lora_alpha", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "use_rslora", "modules_to_save", "lora_dropout", "bias", "fan_in_fan_out",
    "init_lora_weights", "auto_mapping", "base_model_name_or_path", "revision",
    "task_type", "inference_mode", "peft_version", "megatron_config",
    "megatron_core", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "qalora_group_size", "ensure_weight_tying", "runtime_config",
    "use_dora", "target_parameters",
}
# init_lora_weights values whose adapter is relative to the unmodified base.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def check(config: Mapping[str, Any], where: str) -> None:
  if not isinstance(config, Mapping):
    raise LoraPeftError(f"{where}: expected a JSON object, got {type(config).__name__}")
  if "peft_type" not in config:
    raise LoraPeftError(f"{where}: no 'peft_type' (PEFT itself cannot load this config)")
  if config["peft_type"] != "LORA":
    raise LoraPeftError(f"{where}: peft_type {_show(config['peft_type'])} is not supported; "
                        f"jlora reads LoRA adapters only (peft_type 'LORA')")
  if config.get("bias", "none") != "none":
    raise LoraPeftError(
        f"{where}: bias={_show(config['bias'])} is not supported (the adapter carries trained "
        f"biases of the base model); only bias='none' is")
  for key, what in MUST_BE_OFF.items():
    value = config.get(key)
    if value not in (None, False, {}, [], ""):
      raise LoraPeftError(f"{where}: {key}={_show(value)} ({what}) is not supported by jlora")
  init = config.get("init_lora_weights", True)
  if not any(init is p or (type(init) is type(p) and init == p) for p in PLAIN_INITS):
    raise LoraPeftError(
        f"{where}: init_lora_weights={_show(init)} is not supported: such an adapter is "
        f"relative to a base model PEFT modified at initialisation (PiSSA, OLoRA, "
        f"CorDA, LoftQ, LoRA-GA) or is a LoRA variant (MiCA). Convert it in PEFT with "
        f"save_pretrained(..., path_initial_model_for_weight_conversion=...) first")
  for key, value in config.items():
    if key not in KNOWN and key not in MUST_BE_OFF and value not in (None, False, {}, [], ""):
      raise LoraPeftError(f"{where}: unknown option {key}={_show(value)}; jlora cannot tell "
                          f"whether it changes the adapter, so it refuses to guess")
  r = config.get("r")
  if isinstance(r, bool) or not isinstance(r, int) or r < 1:
    raise LoraPeftError(f"{where}: r must be an integer >= 1, got {_show(r)}")
  alpha = config.get("lora_alpha")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise LoraPeftError(f"{where}: lora_alpha must be a number > 0, got {_show(alpha)}")
  _check_types(config, where)


def _show(value: Any) -> str:
  return reprlib.repr(value)


def _regex(pattern: str, key: str, where: str, template: str = "{}") -> None:
  try:
    re.compile(template.format(pattern))
  except (re.error, RecursionError, OverflowError) as e:
    raise LoraPeftError(f"{where}: {key} has an invalid regex {_show(pattern)}: {e}") from None


def _str_list(value: Any) -> bool:
  return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_types(config: Mapping[str, Any], where: str) -> None:
  """Every option jlora reads has the type PEFT gives it, and every regex compiles."""
  for key in ("target_modules", "exclude_modules"):
    value = config.get(key)
    if value is None:
      continue
    if isinstance(value, str):
      _regex(value, key, where)
    elif not _str_list(value):
      raise LoraPeftError(f"{where}: {key} must be a string (a regex), a list of module "
                          f"names or null, got {_show(value)}")
  saved = config.get("modules_to_save")
  if saved is not None:
    if not _str_list(saved):
      raise LoraPeftError(f"{where}: modules_to_save must be a list of module names or "
                          f"null, got {_show(saved)}")
    for m in saved:
      _regex(m, "modules_to_save", where, r"(^|.*\.){}($|\..*)")
  layers = config.get("layers_to_transform")
  if layers is not None and not (
      (isinstance(layers, int) and not isinstance(layers, bool))
      or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                           for i in layers))):
    raise LoraPeftError(f"{where}: layers_to_transform must be an integer, a list of "
                        f"integers or null, got {_show(layers)}")
  pattern = config.get("layers_pattern")
  if pattern is not None:
    if isinstance(pattern, str):
      pattern = [pattern]
    if not _str_list(pattern):
      raise LoraPeftError(f"{where}: layers_pattern must be a string, a list of strings or "
                          f"null, got {_show(config.get('layers_pattern'))}")
    for p in pattern:
      _regex(p, "layers_pattern", where)
  for key, what in (("rank_pattern", "an integer >= 1"), ("alpha_pattern", "a number > 0")):
    patterns = config.get(key) or {}
    if not isinstance(patterns, Mapping):
      raise LoraPeftError(f"{where}: {key} must be an object, got {_show(config[key])}")
    for k, v in patterns.items():
      _regex(k, key, where, r"(.*\.)?({})$")
      if key == "rank_pattern":
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
      else:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
      if not ok:
        raise LoraPeftError(f"{where}: {key}[{k!r}] must be {what}, got {_show(v)}")
  dropout = config.get("lora_dropout")
  if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                              or not 0 <= dropout < 1):
    raise LoraPeftError(f"{where}: lora_dropout must be a number in [0, 1), got "
                        f"{_show(dropout)}")
  params = config.get("target_parameters")
  if params is not None and not _str_list(params):
    raise LoraPeftError(f"{where}: target_parameters must be a list of parameter names or "
                        f"null, got {_show(params)}")
  for key in ("use_rslora", "fan_in_fan_out", "use_dora", "ensure_weight_tying"):
    if config.get(key) not in (None, True, False):
      raise LoraPeftError(f"{where}: {key} must be true or false, got {_show(config[key])}")


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
  """PEFT's get_pattern_key: the value of the first key that matches a
  '.'-aligned suffix of ``module`` (or the whole name, for a key anchored with ^)."""
  for key, value in (patterns or {}).items():
    try:
      if re.match(rf"(.*\.)?({key})$", module):
        return value
    except (re.error, TypeError, RecursionError) as e:
      raise LoraPeftError(f"pattern key {_show(key)} is not a valid regex: {e}") from None
  return default


def is_saved_module(config: Mapping[str, Any], module: str) -> bool:
  # PEFT's _set_trainable: a plain suffix test, no '.' boundary.
  return any(module.endswith(m) for m in config.get("modules_to_save") or ())


def targets(config: Mapping[str, Any], module: str) -> bool | None:
  """Whether PEFT's check_target_module_exists selects ``module``; None: unknown.

  A fused kernel's name (``attn.k_proj+v_proj``, ``names.fused_parts``) is
  selected when any of its modules is."""
  parts = names.fused_parts(module)
  if len(parts) > 1:
    got = [targets(config, part) for part in parts]
    return True if True in got else (None if None in got else False)
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
  wanted = config.get("target_modules")
  if wanted is None or wanted == "all-linear":
    return None  # resolved by PEFT from the PyTorch module types
  if isinstance(wanted, str):
    return re.fullmatch(wanted, module) is not None
  if module in wanted:
    return True
  found = any(module.endswith(f".{t}") for t in wanted)
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
    with open(cfg_file, "rb") as f:
      text = f.read().decode("utf-8")
    config = json.loads(text)
  except UnicodeDecodeError as e:
    raise LoraPeftError(f"'{cfg_file}' is not UTF-8 text (byte {e.start}); it is damaged or "
                        f"not a PEFT config") from None
  except json.JSONDecodeError as e:
    raise LoraPeftError(f"'{cfg_file}' is not valid JSON: {e}") from None
  except RecursionError:
    raise LoraPeftError(f"'{cfg_file}' is nested too deeply to be a PEFT config") from None
  except OSError as e:
    raise LoraPeftError(f"cannot read '{cfg_file}': {e.strerror or e}") from None
  if not isinstance(config, dict):
    raise LoraPeftError(f"'{cfg_file}': expected a JSON object, got {type(config).__name__}")
  return config


def targets_parameter(config: Mapping[str, Any], name: str) -> bool:
  """Whether PEFT's ``target_parameters`` selects the parameter ``name``
  (``module.param``): the name itself or a '.'-aligned suffix of it."""
  wanted = config.get("target_parameters") or ()
  return name in wanted or any(name.endswith(f".{t}") for t in wanted)
