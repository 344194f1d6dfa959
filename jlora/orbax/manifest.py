"""jlora's mark on an orbax directory: a manifest of every file, checked before reading.

A directory jlora writes (an adapter, a training step, a base) gets
``jlora_manifest.json`` once every other file is complete: the kind of
directory, and the size and SHA-256 of each file, with a SHA-256 of the
manifest itself. Readers verify it before orbax opens anything, so a
damaged file (metadata included) is reported as one line naming it, and
orbax never parses a corrupted file. ``overwrite`` replaces a directory only
if its manifest says jlora wrote it, and as the same kind.

Example:
  >>> import pathlib, tempfile
  >>> d = pathlib.Path(tempfile.mkdtemp())
  >>> _ = (d / "data.bin").write_bytes(b"abc")
  >>> write(d, "jlora.adapter")
  >>> kind(d), verify(d, ("jlora.adapter",))["files"][0][:2]
  ('jlora.adapter', ['data.bin', 3])
  >>> _ = (d / "data.bin").write_bytes(b"abd")
  >>> verify(d, ("jlora.adapter",))
  Traceback (most recent call last):
  ...
  jlora.errors.LoraCheckpointError: checkpoint '...': 'data.bin' is corrupted (its SHA-256 differs from the one jlora recorded when writing it)
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Sequence

from jlora import _atomic
from jlora.errors import LoraCheckpointError, LoraFileError

NAME = "jlora_manifest.json"
FORMAT = "jlora.manifest"
VERSION = 1
# Orbax rewrites its step metadata (commit time) when it renames a step into
# place, after the manifest is written; jlora's readers never open it.
UNLISTED = ("_CHECKPOINT_METADATA",)


def _file_sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _canonical(obj: Any) -> bytes:
  return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def files(directory: pathlib.Path) -> list[str]:
  """Every file under ``directory`` but the manifest (and orbax's step
  metadata), as sorted relative paths."""
  out = []
  for root, _, names in os.walk(directory):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), directory)
      if rel != NAME and rel not in UNLISTED and not rel.startswith(f".{NAME}"):
        out.append(rel.replace(os.sep, "/"))
  return sorted(out)


def write(directory: str | os.PathLike, kind: str) -> None:
  """Writes the manifest of a complete directory (atomically, then flushed)."""
  directory = pathlib.Path(directory)
  rows = [[rel, os.path.getsize(directory / rel), _file_sha256(directory / rel)]
          for rel in files(directory)]
  body = {"format": FORMAT, "version": VERSION, "kind": kind, "files": rows}
  body["sha256"] = hashlib.sha256(_canonical(body)).hexdigest()
  tmp = directory / f".{NAME}.tmp"
  with open(tmp, "w") as f:
    f.write(json.dumps(body, indent=1))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, directory / NAME)
  _atomic.fsync_tree(directory / NAME)


def read(directory: str | os.PathLike, error: type[LoraFileError] = LoraCheckpointError
         ) -> dict[str, Any] | None:
  """The manifest (its own checksum verified), or None if there is none."""
  directory = pathlib.Path(directory)
  path = directory / NAME
  if not path.is_file():
    return None
  where = f"checkpoint '{directory}'"
  try:
    body = json.loads(path.read_bytes().decode("utf-8"))
  except (ValueError, UnicodeDecodeError, RecursionError) as e:
    raise error(f"{where}: '{NAME}' is corrupted ({type(e).__name__})") from None
  except OSError as e:
    raise error(f"{where}: cannot read '{NAME}': {e.strerror or e}") from None
  if not isinstance(body, dict) or body.get("format") != FORMAT:
    raise error(f"{where}: '{NAME}' is not a jlora manifest")
  stored = body.pop("sha256", None)
  if stored != hashlib.sha256(_canonical(body)).hexdigest():
    raise error(f"{where}: '{NAME}' is corrupted (its SHA-256 does not match)")
  if body.get("version") != VERSION:
    raise error(f"{where}: jlora manifest version {body.get('version')!r} is not supported "
                f"(this jlora reads version {VERSION})")
  rows = body.get("files")
  if not isinstance(body.get("kind"), str) or not isinstance(rows, list) or not all(
      isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and isinstance(r[1], int)
      and isinstance(r[2], str) for r in rows):
    raise error(f"{where}: '{NAME}' is malformed")
  return body


def kind(directory: str | os.PathLike) -> str | None:
  """The kind a manifest records ("jlora.adapter"...), or None without a
  readable one. Never raises: used to decide whether jlora wrote a folder."""
  try:
    body = read(directory)
  except (LoraFileError, OSError):
    return None
  return None if body is None else body["kind"]


def verify(directory: str | os.PathLike, kinds: Sequence[str], *, check: str = "sha256",
           error: type[LoraFileError] = LoraCheckpointError) -> dict[str, Any]:
  """Checks that every file the manifest lists is there, whole and unchanged.

  Args:
    directory: the directory.
    kinds: the kinds of directory the caller reads.
    check: how far to check each file: "exists", "size" or "sha256".
    error: the LoraFileError subclass to raise.

  Returns:
    The manifest.

  Raises:
    error: no manifest (an interrupted save, or not written by jlora), another
      kind, or a file missing, truncated or changed (named).
  """
  directory = pathlib.Path(directory)
  where = f"checkpoint '{directory}'"
  body = read(directory, error)
  if body is None:
    raise error(f"{where}: no '{NAME}': the save that wrote it did not finish (or it was "
                f"not written by jlora)")
  if body["kind"] not in kinds:
    raise error(f"{where}: it is a {body['kind']} directory, not a "
                f"{' or '.join(kinds)} directory")
  for rel, size, digest in body["files"]:
    path = directory / rel
    try:
      got = os.path.getsize(path)
    except OSError:
      raise error(f"{where}: '{rel}' is missing") from None
    if check == "exists":
      continue
    if got != size:
      raise error(f"{where}: '{rel}' is corrupted ({got} bytes, jlora wrote {size})")
    if check == "sha256":
      try:
        same = _file_sha256(path) == digest
      except OSError as e:
        raise error(f"{where}: cannot read '{rel}': {e.strerror or e}") from None
      if not same:
        raise error(f"{where}: '{rel}' is corrupted (its SHA-256 differs from the one jlora "
                    f"recorded when writing it)")
  return body
