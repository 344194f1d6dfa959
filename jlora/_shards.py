"""The safetensors files of a Hugging Face checkpoint folder, as ``save_pretrained`` writes them.

One ``model.safetensors``, or the shards that ``model.safetensors.index.json``
lists. Shared by ``jlora.bnb`` (bitsandbytes checkpoints) and ``jlora.hf``
(checkpoints into JAX models), which read the same folders and must refuse
the same bad ones alike.
"""

from __future__ import annotations

import json
import os
import pathlib

from jlora.errors import LoraFileError, one_line

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# What PyTorch's pickle-based save writes instead: named in the error, never read.
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin")


def shard_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """The folder's safetensors files, in name order.

  Raises:
    LoraFileError: (one line, naming the path) the folder holds neither file,
      or pickled weights only; the index is not JSON naming ``.safetensors``
      files inside the folder; a shard it lists is missing.

  Example:
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "model.safetensors").write_bytes(b"")
    0
    >>> [p.name for p in shard_files(d)]
    ['model.safetensors']
  """
  if (folder / WEIGHTS_NAME).is_file():
    return [folder / WEIGHTS_NAME]
  index = folder / INDEX_NAME
  if not index.is_file():
    pickled = [n for n in _PICKLED if (folder / n).exists()]
    hint = (f"; jlora does not read pickled weights ({pickled[0]}): save with "
            f"safe_serialization=True") if pickled else ""
    raise LoraFileError(f"'{folder}' holds no {WEIGHTS_NAME} and no {INDEX_NAME}{hint}")
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
    names = sorted(set(weight_map.values()))
    if not all(isinstance(n, str) and n.endswith(".safetensors")
               and os.path.basename(n) == n and n not in (".", "..") for n in names):
      raise ValueError("shard names must be .safetensors files in the folder")
  except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
    raise LoraFileError(f"'{index}' is not a valid index of shards ({one_line(e)})"
                        ) from None
  missing = [n for n in names if not (folder / n).is_file()]
  if missing:
    raise LoraFileError(f"'{index}' lists shard '{missing[0]}', which is missing from "
                        f"'{folder}'")
  return [folder / n for n in names]
