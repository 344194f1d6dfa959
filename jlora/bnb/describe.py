"""What a bitsandbytes 4-bit checkpoint is and holds: ``is_checkpoint`` and ``describe``.

Both read the safetensors headers (and ``describe`` the quant states) only;
no weight is read.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import jax.numpy as jnp

from jlora._param_table import summarize
from jlora.bnb import quant_state
from jlora.bnb.files import INDEX_NAME, WEIGHTS_NAME, Files, PathLike
from jlora.errors import LoraFileError
from jlora.quant import nf4
from jlora.quant.nf4_files import is_quant_state_key


def is_checkpoint(path: PathLike) -> bool:
  """Whether ``path`` is a bitsandbytes 4-bit checkpoint (a safetensors file,
  or a folder of them, with at least one 4-bit quant state); reads headers only.

  Example:
    >>> import tempfile, jax.numpy as jnp, jlora
    >>> d = tempfile.mkdtemp()
    >>> f = jlora.bnb.save(f"{d}/model.safetensors",
    ...                    jlora.quantize({"kernel": jnp.ones((64, 64))}), lambda p: "fc")
    >>> is_checkpoint(f), is_checkpoint(d), is_checkpoint(jlora.base.save(f"{d}/b.safetensors",
    ...                                                    {"w": jnp.ones(2)}))
    (True, True, False)
  """
  p = pathlib.Path(path)
  try:
    if p.is_dir():
      if (p / WEIGHTS_NAME).is_file():
        p = p / WEIGHTS_NAME
      elif (p / INDEX_NAME).is_file():
        weight_map = json.loads((p / INDEX_NAME).read_text())["weight_map"]
        return any(is_quant_state_key(k) for k in weight_map)
      else:
        return False
    if not p.is_file() or not p.name.endswith(".safetensors"):
      return False
    from safetensors import safe_open
    with safe_open(os.fspath(p), "numpy") as f:
      return any(is_quant_state_key(k) for k in f.keys())
  except Exception:  # unreadable: not one we can call a checkpoint
    return False


def describe(path: PathLike) -> dict[str, Any]:
  """What a bitsandbytes 4-bit checkpoint holds: each entry by its PyTorch
  name, the quantized weights with their format and bytes (those an
  ``NF4Array`` holds), and the totals of quantized and dense parameters.
  Reads the headers and the quant states only.

  Example:
    >>> import tempfile, jax.numpy as jnp, jlora
    >>> q = jlora.quantize({"fc": {"kernel": jnp.ones((128, 64)), "bias": jnp.ones(64)}})
    >>> f = jlora.bnb.save(f"{tempfile.mkdtemp()}/model.safetensors", q, jlora.peft.Rules())
    >>> info = jlora.bnb.describe(f)
    >>> [(t["path"], t["shape"], "quant" in t) for t in info["tensors"]]
    [('fc.bias', [64], False), ('fc.weight', [64, 128], True)]
    >>> info["quantized"]["bits_per_param"]
    4.1328125
  """
  files = Files(path)
  scan = quant_state.scan(files)
  entries = []
  for key in sorted(list(scan.states) + scan.dense):
    if key in scan.states:
      s = scan.states[key]
      nb = -(-s.size // s.block_size)
      nbytes = -(-s.size // 2) + (nb + 4 * -(-nb // nf4.NESTED_BLOCK_SIZE) + 4
                                  if s.double_quant else 4 * nb)
      entries.append((key, s.out_in, s.dtype, nbytes,
                      {"quant": "nf4", "block_size": s.block_size,
                       "double_quant": s.double_quant}))
    else:
      shape, dtype = files.info(key)
      x_dtype = _ST_DTYPES.get(dtype)
      if x_dtype is None:
        raise LoraFileError(f"'{files.file_of[key]}': '{key}' has dtype {dtype}, which jlora "
                            f"does not read")
      entries.append((key, shape, x_dtype, math.prod(shape) * jnp.dtype(x_dtype).itemsize,
                      None))
  p = pathlib.Path(files.where)
  info = {"path": str(p), "format": "bnb-4bit",
          "format_detail": "Hugging Face bitsandbytes 4-bit (NF4) checkpoint: " +
                           ("safetensors file" if p.is_file()
                            else f"folder of {len(files.handles)} safetensors file(s)"),
          "files": [str(f) for f in files.handles],
          "file_bytes": sum(f.stat().st_size for f in files.handles)}
  info.update(summarize(entries))
  return info


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}
