"""A Hugging Face checkpoint folder read tensor by tensor, without mapping it.

A checkpoint is a folder with ``config.json`` and either ``model.safetensors``
or the shards that ``model.safetensors.index.json`` lists (what
``save_pretrained`` writes), or one ``.safetensors`` file. ``Checkpoint``
parses the headers (JSON) and reads one tensor at a time with plain file reads
into a buffer of its own: no file is memory-mapped, so the pages of tensors
already read do not stay in the process's resident memory (a mapped file
counts there until it is unmapped), and at most one tensor's bytes are held
by the reader at any time.

Only JSON and the raw tensor bytes are read: nothing is unpickled and no code
from the folder runs. ``Checkpoint`` offers what ``jlora.bnb``'s quant-state
readers ask of a checkpoint (``where``, ``file_of``, ``keys``, ``info``,
``get``, ``checksummed``), so a ``*-bnb-4bit`` folder is read with them.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Any

import numpy as np

from jlora._shards import INDEX_NAME, WEIGHTS_NAME, shard_files
from jlora.errors import LoraFileError, one_line

CONFIG_NAME = "config.json"
# A header larger than this is not one save_pretrained wrote (safetensors' own limit).
_MAX_HEADER = 100_000_000


def _dtypes() -> dict[str, np.dtype]:
  import ml_dtypes   # a dependency of jax: NumPy has no bfloat16
  table = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
           "F64": np.float64, "U8": np.uint8, "I8": np.int8, "I16": np.int16,
           "I32": np.int32, "I64": np.int64, "U16": np.uint16, "U32": np.uint32,
           "U64": np.uint64, "BOOL": np.bool_}
  return {k: np.dtype(v).newbyteorder("<") for k, v in table.items()}


#: safetensors dtype names -> NumPy dtypes (little-endian) that ``Checkpoint`` reads.
DTYPES = _dtypes()


class Entry:
  """Where one tensor lies: its file, byte range, shape and dtype name."""
  __slots__ = ("file", "start", "stop", "shape", "dtype")

  def __init__(self, file: pathlib.Path, start: int, stop: int, shape: tuple[int, ...],
               dtype: str):
    self.file, self.start, self.stop, self.shape, self.dtype = file, start, stop, shape, dtype

  @property
  def nbytes(self) -> int:
    return self.stop - self.start


def read_header(f: pathlib.Path) -> tuple[dict[str, Entry], dict[str, str]]:
  """The entries and the metadata of one safetensors file (its header only)."""
  try:
    size = f.stat().st_size
    with open(f, "rb") as fh:
      raw = fh.read(8)
      if len(raw) != 8:
        raise ValueError("shorter than a header")
      (n,) = struct.unpack("<Q", raw)
      if n > min(size - 8, _MAX_HEADER):
        raise ValueError(f"its header claims {n} bytes")
      header = json.loads(fh.read(n).decode("utf-8"))
    if not isinstance(header, dict):
      raise ValueError("its header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    base, out = 8 + n, {}
    for key, e in header.items():
      start, stop = (int(x) for x in e["data_offsets"])
      shape = tuple(int(d) for d in e["shape"])
      if not (0 <= start <= stop and base + stop <= size) or any(d < 0 for d in shape):
        raise ValueError(f"entry '{key}' lies outside the file")
      dtype = str(e["dtype"])
      if dtype in DTYPES and stop - start != int(np.prod(shape)) * DTYPES[dtype].itemsize:
        raise ValueError(f"entry '{key}' holds {stop - start} bytes, not those of "
                         f"{dtype} {shape}")
      out[key] = Entry(f, base + start, base + stop, shape, dtype)
  except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
    raise LoraFileError(f"'{f}' is not a readable safetensors file ({one_line(e)})") from None
  return out, meta


class Checkpoint:
  """The safetensors file(s) of a Hugging Face checkpoint, read on demand."""

  def __init__(self, path: str | os.PathLike):
    p = pathlib.Path(path).expanduser().resolve()
    self.where = str(p)
    if not p.exists():
      raise LoraFileError(f"no Hugging Face checkpoint at '{p}': it does not exist")
    if p.is_dir():
      files = self._folder(p)
      self.folder = p
    elif p.name.endswith(".safetensors"):
      files, self.folder = [p], None
    else:
      raise LoraFileError(f"'{p}' is not a safetensors file or a folder holding "
                          f"{WEIGHTS_NAME} or {INDEX_NAME}")
    self.entries: dict[str, Entry] = {}
    self.file_of: dict[str, pathlib.Path] = {}
    self.metadata: dict[pathlib.Path, dict[str, str]] = {}
    for f in files:
      entries, self.metadata[f] = read_header(f)
      for k, e in entries.items():
        if k in self.entries:
          raise LoraFileError(f"'{f}': entry '{k}' is also in '{self.file_of[k]}'")
        self.entries[k], self.file_of[k] = e, f

  @staticmethod
  def _folder(p: pathlib.Path) -> list[pathlib.Path]:
    return shard_files(p)

  def config(self, required: bool = True) -> dict[str, Any] | None:
    """The folder's ``config.json`` (JSON only), or None for a single file
    (and for a folder without one, unless ``required``)."""
    if self.folder is None:
      return None
    f = self.folder / CONFIG_NAME
    if not f.is_file() and not required:
      return None
    if not f.is_file():
      raise LoraFileError(f"'{self.folder}' holds no {CONFIG_NAME}, which says which model "
                          f"the checkpoint is for")
    try:
      config = json.loads(f.read_text())
      if not isinstance(config, dict):
        raise ValueError("not a JSON object")
    except (OSError, ValueError, RecursionError) as e:
      raise LoraFileError(f"'{f}' is not valid JSON ({one_line(e)})") from None
    return config

  def keys(self) -> list[str]:
    return list(self.entries)

  def info(self, key: str) -> tuple[tuple[int, ...], str]:
    """(shape, safetensors dtype name such as "BF16", "U8") from the header."""
    e = self.entries[key]
    return e.shape, e.dtype

  def nbytes(self, key: str) -> int:
    return self.entries[key].nbytes

  def checksummed(self, key: str) -> bool:
    return False   # Hugging Face's files carry no checksums

  def get(self, key: str) -> np.ndarray:
    """One tensor, read into an array of its own (the only copy)."""
    e = self.entries[key]
    dtype = DTYPES.get(e.dtype)
    if dtype is None:
      raise LoraFileError(f"'{e.file}': entry '{key}' is {e.dtype}, a dtype jlora cannot "
                          f"read (it reads {', '.join(DTYPES)})")
    buf = np.empty(e.nbytes, np.uint8)
    try:
      with open(e.file, "rb", buffering=0) as fh:
        view, done = memoryview(buf), 0
        while done < e.nbytes:
          n = os.preadv(fh.fileno(), [view[done:]], e.start + done)
          if n <= 0:
            raise OSError("the file ends early")
          done += n
    except OSError as err:
      raise LoraFileError(f"'{e.file}': cannot read entry '{key}' ({one_line(err)})") from None
    out = buf.view(dtype).reshape(e.shape)
    return out.astype(out.dtype.newbyteorder("="), copy=False)
