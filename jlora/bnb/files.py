"""The safetensors files of a bitsandbytes checkpoint, and jlora's mark on them.

A checkpoint is one ``.safetensors`` file, or a folder holding
``model.safetensors`` or the shards that ``model.safetensors.index.json``
lists (what ``save_pretrained`` writes). ``Files`` opens them (headers only)
and reads entries on demand. A file jlora wrote carries, in its metadata
beside transformers' ``{"format": "pt"}``, the entry ``jlora``: JSON with the
format, a version and a SHA-256 of every tensor, checked as each entry is
read; files others wrote carry none and are read as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from jlora import _atomic
from jlora._shards import INDEX_NAME, WEIGHTS_NAME, shard_files
from jlora.errors import LoraFileError, one_line

PathLike = str | os.PathLike

# jlora's mark in the safetensors metadata, beside transformers' {"format": "pt"}.
MARK = "jlora"
FORMAT = "jlora.bnb-4bit"
VERSION = 1


def sha256(x: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data).hexdigest()


class Files:
  """The safetensors file(s) of a checkpoint: one file, or a folder with
  ``model.safetensors`` or the shards ``model.safetensors.index.json`` lists."""

  def __init__(self, path: PathLike):
    from safetensors import safe_open
    p = _atomic.resolve(path)
    self.where = str(p)
    if not p.exists():
      raise LoraFileError(f"no bitsandbytes checkpoint at '{p}': it does not exist")
    if p.is_dir():
      paths = self._folder(p)
    elif p.name.endswith(".safetensors"):
      paths = [p]
    else:
      raise LoraFileError(f"'{p}' is not a safetensors file (a bitsandbytes checkpoint is a "
                          f".safetensors file or a folder holding {WEIGHTS_NAME})")
    self.file_of: dict[str, pathlib.Path] = {}
    self.handles: dict[pathlib.Path, Any] = {}
    self.marks: dict[pathlib.Path, dict[str, str] | None] = {}
    for f in paths:
      try:
        handle = safe_open(os.fspath(f), "numpy")
        keys, meta = list(handle.keys()), handle.metadata() or {}
      except Exception as e:  # safetensors raises its own (non-OSError) types
        raise LoraFileError(f"'{f}' is not a readable safetensors file ({one_line(e)})"
                            ) from None
      self.handles[f] = handle
      self.marks[f] = read_mark(meta, keys, f)
      for k in keys:
        if k in self.file_of:
          raise LoraFileError(f"'{f}': entry '{k}' is also in '{self.file_of[k]}'")
        self.file_of[k] = f

  @staticmethod
  def _folder(p: pathlib.Path) -> list[pathlib.Path]:
    return shard_files(p)

  def keys(self) -> list[str]:
    return list(self.file_of)

  def checksummed(self, key: str) -> bool:
    """Whether ``key`` is in a file jlora wrote, whose checksums ``get`` verifies."""
    return self.marks[self.file_of[key]] is not None

  def info(self, key: str) -> tuple[tuple[int, ...], str]:
    """(shape, safetensors dtype name such as "U8", "F32") from the header."""
    s = self.handles[self.file_of[key]].get_slice(key)
    return tuple(int(d) for d in s.get_shape()), s.get_dtype()

  def get(self, key: str) -> np.ndarray:
    f = self.file_of[key]
    try:
      x = self.handles[f].get_tensor(key)
    except Exception as e:  # truncated or damaged data
      raise LoraFileError(f"'{f}': cannot read entry '{key}' ({one_line(e)})") from None
    mark = self.marks[f]
    if mark is not None and sha256(x) != mark[key]:
      raise LoraFileError(f"'{f}' is damaged: entry '{key}' fails its checksum (its SHA-256 "
                          f"differs from the one jlora recorded when writing it)")
    return x


def read_mark(meta: Mapping[str, str], keys: list[str], f: pathlib.Path
               ) -> dict[str, str] | None:
  """The checksums of a file jlora wrote (verified as entries are read); None
  for a file others wrote."""
  raw = meta.get(MARK)
  if raw is None:
    return None
  try:
    mark = json.loads(raw)
    sums = mark["tensors_sha256"]
    ok = mark["format"] == FORMAT and isinstance(sums, dict)
  except (ValueError, KeyError, TypeError, RecursionError):
    ok = False
  if not ok:
    raise LoraFileError(f"'{f}' is damaged: jlora's metadata in it is not valid")
  if mark.get("version") != VERSION:
    raise LoraFileError(f"'{f}': written with mark version {mark.get('version')!r}; this "
                        f"jlora reads version {VERSION}")
  if sorted(sums) != sorted(keys):
    raise LoraFileError(f"'{f}' is damaged: it does not hold the entries jlora wrote")
  return sums


def is_owned(path: PathLike) -> bool:
  """Whether ``path`` is a bitsandbytes checkpoint jlora wrote (it carries
  jlora's mark): the only kind of file ``save(..., overwrite=True)`` replaces."""
  p = pathlib.Path(path)
  if not p.is_file():
    return False
  try:
    from safetensors import safe_open
    with safe_open(os.fspath(p), "numpy") as f:
      raw = (f.metadata() or {}).get(MARK)
    return raw is not None and json.loads(raw).get("format") == FORMAT
  except Exception:  # unreadable: not ours
    return False
