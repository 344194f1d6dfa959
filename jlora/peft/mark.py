"""jlora's mark on the PEFT folders it writes: checksums in the safetensors metadata.

PEFT's format has no checksums. A folder jlora writes carries, in
``adapter_model.safetensors``' metadata (which PEFT and vLLM ignore), a
SHA-256 of every tensor and of the config's options that change what the
adapter computes. ``jlora.peft.load`` verifies them when they are there, so a
damaged or half-replaced folder is refused instead of loaded; folders other
tools wrote have no mark and are read as they are. ``save(...,
overwrite=True)`` replaces only a folder that carries the mark.

Example:
  >>> import numpy as np
  >>> config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": "x"}
  >>> tensors = {"base_model.model.fc.lora_A.weight": np.ones((2, 8), np.float32)}
  >>> meta = metadata(config, tensors)
  >>> check(dict(config, base_model_name_or_path="y"), tensors, meta, "folder")  # harmless edit
  True
  >>> check(dict(config, lora_alpha=8), tensors, meta, "folder")
  Traceback (most recent call last):
  ...
  jlora.errors.LoraPeftError: 'folder/adapter_config.json' was changed after jlora wrote this folder: its options (r, lora_alpha, patterns, targets, ...) differ from those the tensors were written with; refusing to load a mix
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

import numpy as np

from jlora.errors import LoraPeftError
from jlora.peft import names

KEY = "jlora"                # the safetensors metadata entry
FORMAT = "jlora.peft"
VERSION = 1
# Config keys that do not change what the adapter computes: editing them
# after the fact is fine.
HARMLESS = ("base_model_name_or_path", "revision", "inference_mode", "peft_version",
            "auto_mapping", "task_type")


def tensor_sha256(x: np.ndarray) -> str:
  host = np.ascontiguousarray(x).reshape(-1)
  return hashlib.sha256(host.view(np.uint8).data).hexdigest()


def config_sha256(config: Mapping[str, Any]) -> str:
  """SHA-256 of the config's options that change the adapter."""
  kept = {k: v for k, v in config.items() if k not in HARMLESS}
  return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def metadata(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> dict[str, str]:
  """The safetensors metadata of a folder jlora writes: PEFT's, plus the mark."""
  mark = {"format": FORMAT, "version": VERSION, "config_sha256": config_sha256(config),
          "tensors_sha256": {k: tensor_sha256(v) for k, v in sorted(tensors.items())}}
  return {**names.SAFETENSORS_METADATA, KEY: json.dumps(mark, sort_keys=True)}


def check(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
          meta: Mapping[str, str] | None, folder: str | os.PathLike) -> bool:
  """Verifies the mark if there is one; returns whether there was.

  Raises:
    LoraPeftError: the mark is damaged, or a tensor or the config's options
      differ from what jlora wrote.
  """
  raw = (meta or {}).get(KEY)
  if raw is None:
    return False
  weights = os.path.join(os.fspath(folder), names.WEIGHTS_NAME)
  try:
    mark = json.loads(raw)
    sums = mark["tensors_sha256"]
    ok = (mark["format"] == FORMAT and isinstance(sums, dict)
          and isinstance(mark["config_sha256"], str))
  except (ValueError, KeyError, TypeError, RecursionError):
    ok = False
  if not ok:
    raise LoraPeftError(f"'{weights}': jlora's metadata in it is damaged")
  if mark.get("version") != VERSION:
    raise LoraPeftError(f"'{weights}': written by a jlora with mark version "
                        f"{mark.get('version')!r}; this jlora reads version {VERSION}")
  if sorted(sums) != sorted(tensors):
    missing = sorted(set(sums) - set(tensors))
    extra = sorted(set(tensors) - set(sums))
    raise LoraPeftError(f"'{weights}' does not hold the tensors jlora wrote (missing: "
                        f"{missing[:3]}, unexpected: {extra[:3]}); it was changed or damaged")
  for key in sorted(tensors):
    if tensor_sha256(tensors[key]) != sums[key]:
      raise LoraPeftError(f"'{weights}': tensor '{key}' fails its checksum (it was changed or "
                          f"damaged after jlora wrote it)")
  if config_sha256(config) != mark["config_sha256"]:
    cfg = os.path.join(os.fspath(folder), names.CONFIG_NAME)
    raise LoraPeftError(f"'{cfg}' was changed after jlora wrote this folder: its options (r, "
                        f"lora_alpha, patterns, targets, ...) differ from those the tensors "
                        f"were written with; refusing to load a mix")
  return True


def is_owned(folder: str | os.PathLike) -> bool:
  """Whether ``folder`` is a PEFT folder jlora wrote (its weights carry the mark).

  Example:
    >>> import tempfile
    >>> is_owned(tempfile.mkdtemp())
    False
  """
  weights = os.path.join(os.fspath(folder), names.WEIGHTS_NAME)
  if not os.path.isfile(os.path.join(os.fspath(folder), names.CONFIG_NAME)):
    return False
  try:
    from safetensors import safe_open
    with safe_open(weights, "numpy") as f:
      return KEY in (f.metadata() or {})
  except Exception:  # missing or unreadable: not a folder jlora can vouch for
    return False
