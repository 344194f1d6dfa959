"""What a PEFT adapter folder holds, as a dict (``jlora.peft.describe``).

Reads the config and the tensors' shapes and dtypes (not their values), with
no policy check: a folder jlora would refuse to load (DoRA, another PEFT
type) is still described, with the option shown.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any


from jlora.errors import LoraPeftError
from jlora.peft import config as peft_config
from jlora.peft import mark, names

# safetensors dtype names -> NumPy's.
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}


def _nbytes(shape, dtype: str) -> int:
  import jax.numpy as jnp
  try:
    return int(math.prod(shape)) * jnp.dtype(dtype).itemsize
  except TypeError:
    return 0


def describe(path: str | os.PathLike) -> dict[str, Any]:
  """Describes a PEFT LoRA adapter folder without loading its tensors.

  Args:
    path: the folder (``adapter_config.json`` + ``adapter_model.safetensors``).

  Returns:
    A JSON-able dict: ``format`` ("peft"), ``spec`` (rank, alpha, rsLoRA,
    targets, patterns, modules_to_save, use_dora, target_parameters, ...),
    ``targets`` (per module: kind (linear, conv, embedding or parameter),
    rank, alpha, scale, in and out widths, factor dtype, a DoRA magnitude's
    shape; a parameter's rank is PEFT's r times its experts),
    ``modules_to_save`` (the tensors trained in full), ``trainable_params``,
    ``bytes`` and ``checksums`` ("ok" once jlora's checksums are verified, for
    a folder jlora wrote).

  Raises:
    LoraPeftError: not a folder, no config or weights, unreadable files, or a
      folder jlora wrote that was changed or damaged since.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile
    >>> params = {"fc": {"kernel": jnp.ones((8, 4))}}
    >>> spec = jlora.LoraSpec(rank=2, alpha=4, targets=["fc/kernel"])
    >>> _, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
    >>> folder = tempfile.mkdtemp()
    >>> _ = jlora.peft.save(folder, trainable, jlora.peft.Rules(), spec=spec)
    >>> info = jlora.peft.describe(folder)
    >>> [(t["module"], t["rank"], t["in"], t["out"], t["scale"]) for t in info["targets"]]
    [('fc', 2, 8, 4, 2.0)]
  """
  from safetensors import safe_open
  folder = pathlib.Path(path).absolute()
  if not folder.is_dir():
    raise LoraPeftError(f"'{folder}' is not a folder (expected a PEFT adapter folder with "
                        f"{names.CONFIG_NAME} and {names.WEIGHTS_NAME})")
  cfg_file, weights = folder / names.CONFIG_NAME, folder / names.WEIGHTS_NAME
  if not cfg_file.is_file():
    raise LoraPeftError(f"'{folder}' has no {names.CONFIG_NAME}")
  config = peft_config.read(cfg_file)
  if not weights.is_file():
    extra = f" (only {names.PICKLE_NAME}, a pickle, which jlora never reads)" if (
        folder / names.PICKLE_NAME).is_file() else ""
    raise LoraPeftError(f"'{folder}' has no {names.WEIGHTS_NAME}{extra}")
  shapes: dict[str, tuple[list[int], str]] = {}
  try:
    with safe_open(os.fspath(weights), "numpy") as f:
      meta = f.metadata()
      for key in f.keys():
        s = f.get_slice(key)
        shapes[key] = ([int(d) for d in s.get_shape()], s.get_dtype())
      # A folder jlora wrote: its checksums are verified (reading the tensors).
      marked = (meta or {}).get(mark.KEY) is not None
      tensors = {key: f.get_tensor(key) for key in f.keys()} if marked else None
  except Exception as e:  # safetensors raises its own (non-OSError) types
    raise LoraPeftError(f"'{weights}' is not a readable safetensors file "
                        f"({' '.join(str(e).split())})") from None
  if marked:
    mark.check(config, tensors, meta, folder)
  r, alpha = config.get("r"), config.get("lora_alpha")
  rslora = bool(config.get("use_rslora", False))
  modules: dict[str, dict[str, Any]] = {}
  full = []
  count = nbytes = 0
  for key, (shape, dt) in sorted(shapes.items()):
    dtype = _ST_DTYPES.get(dt, dt.lower())
    count += int(math.prod(shape))
    nbytes += _nbytes(shape, dtype)
    rest = names.strip_prefix(key)
    parsed = names.parse_adapter_key(rest if rest is not None else key)
    if parsed:
      modules.setdefault(parsed[0], {})[parsed[1]] = (shape, dtype)
    else:
      base_copy = key.endswith(names.BASE_LAYER + ".weight")
      full.append({"key": key, "shape": shape, "dtype": dtype,
                   **({"base_copy": True} if base_copy else {})})
  targets = []
  experts = set(config.get("target_parameters") or ())
  for module, parts in modules.items():
    emb = "embA" in parts or "embB" in parts
    a, b = (parts.get("embA"), parts.get("embB")) if emb else (parts.get("A"), parts.get("B"))
    kind = ("embedding" if emb else "conv" if a and len(a[0]) > 2
            else "parameter" if experts and not _is_module_target(config, module)
            else "linear")
    rank = a[0][0] if a else (b[0][1] if b else None)
    mod_alpha = peft_config.pattern_value(config.get("alpha_pattern"), module, alpha)
    mod_r = peft_config.pattern_value(config.get("rank_pattern"), module, r)
    scale = None
    if isinstance(mod_alpha, (int, float)) and rank:
      scale = float(mod_alpha) / (math.sqrt(rank) if rslora else rank)
    m = parts.get("m")
    targets.append({"module": module, "kind": kind, "rank": rank, "config_rank": mod_r,
                    "alpha": mod_alpha, "scale": scale,
                    "in": a[0][1] if a else None,
                    "out": b[0][0] if b else None, "a_shape": a[0] if a else None,
                    "b_shape": b[0] if b else None,
                    "factor_dtype": (a or b or m)[1],
                    **({"magnitude_shape": m[0]} if m else {})})
  spec = {"rank": r, "alpha": alpha, "use_rslora": rslora,
          "targets": config.get("target_modules"),
          "exclude": config.get("exclude_modules"),
          "rank_pattern": config.get("rank_pattern") or {},
          "alpha_pattern": config.get("alpha_pattern") or {},
          "dropout": config.get("lora_dropout"),
          "modules_to_save": config.get("modules_to_save"),
          "fan_in_fan_out": config.get("fan_in_fan_out"),
          "use_dora": bool(config.get("use_dora", False)),
          "target_parameters": config.get("target_parameters"),
          "ensure_weight_tying": bool(config.get("ensure_weight_tying", False)),
          "peft_type": config.get("peft_type"),
          "base_model_name_or_path": config.get("base_model_name_or_path")}
  return {"path": str(folder), "format": "peft",
          "format_detail": f"PEFT LoRA adapter folder ({names.CONFIG_NAME} + "
                           f"{names.WEIGHTS_NAME})",
          "spec": spec, "targets": targets, "modules_to_save": full,
          "trainable_params": count, "bytes": nbytes,
          "checksums": "ok" if marked else "none (not written by jlora)", "base": None}


def _is_module_target(config: dict[str, Any], module: str) -> bool:
  return bool(peft_config.targets(config, names.unnest(module)[0]))


def is_adapter(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a folder with a PEFT ``adapter_config.json``.

  Example:
    >>> import tempfile
    >>> is_adapter(tempfile.mkdtemp())
    False
  """
  return (pathlib.Path(path) / names.CONFIG_NAME).is_file()
