"""Reading and validating the JSON metadata of a checkpoint, before any array."""

from __future__ import annotations

import contextlib
import logging
import pathlib
from typing import Any, Callable, Iterator

import jax.numpy as jnp

from jlora import _atomic
from jlora.errors import LoraCheckpointError
from jlora.layout import Layout
from jlora.orbax import encoding, names

RestoreFn = Callable[[Any], Any]  # orbax Composite args -> Composite


@contextlib.contextmanager
def quiet() -> Iterator[None]:
  """Silences orbax's own log records while jlora calls it: jlora reports
  what goes wrong as one LoraCheckpointError naming the checkpoint.

  Example:
    >>> with quiet():
    ...   logging.getLogger("absl").error("not shown")
  """
  loggers = [logging.getLogger(name) for name in ("absl", "orbax")]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def checkpointer_restore(path: pathlib.Path) -> RestoreFn:
  """A function restoring orbax Composite args from the checkpoint at ``path``."""
  def restore(args):
    ocp = names.ocp()
    with quiet(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      return ckptr.restore(path, args=args)
  return restore


def check_dir(path: pathlib.Path, item: str, what: str) -> None:
  """Raises LoraCheckpointError unless ``path`` is a directory with ``item/``."""
  _atomic.check_readable(path, LoraCheckpointError)
  if not path.exists():
    raise LoraCheckpointError(f"no {what} at '{path}': it does not exist")
  if not path.is_dir():
    raise LoraCheckpointError(f"'{path}' is a file, not a {what} directory")
  if not (path / item).is_dir():
    hint = ""
    if any(p.name.isdigit() for p in path.iterdir()):
      hint = ("; it looks like a CheckpointManager directory: pass one of its steps "
              "(manager.step_path(step))")
    raise LoraCheckpointError(f"'{path}' is not a {what} (it has no '{item}/'){hint}")


def read_json(restore: RestoreFn, item: str, path: pathlib.Path, fmt: str) -> dict[str, Any]:
  """The JSON metadata ``item`` of format ``fmt``, validated field by field."""
  ocp = names.ocp()
  try:
    meta = restore(ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
  except Exception as e:  # anything orbax or json raise means an unreadable file
    raise LoraCheckpointError(
        f"checkpoint '{path}': cannot read '{item}' ({type(e).__name__}: {e}); the "
        f"checkpoint is incomplete or corrupted") from e
  if not isinstance(meta, dict) or meta.get("format") != fmt:
    raise LoraCheckpointError(f"checkpoint '{path}': '{item}' is not {fmt} metadata")
  if meta.get("version") != names.VERSION:
    raise LoraCheckpointError(
        f"checkpoint '{path}': {fmt} version {meta.get('version')} is not supported "
        f"(this jlora reads version {names.VERSION})")
  try:
    validate(meta, fmt)
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise LoraCheckpointError(
        f"checkpoint '{path}': '{item}' is malformed ({type(e).__name__}: {e})") from e
  if fmt == names.FORMAT:
    check_kinds(meta, path)
  return meta


def check_kinds(meta: dict[str, Any], path: pathlib.Path) -> None:
  """Every adapter in the metadata is of a kind this jlora knows, with the
  fields it knows: refused before any array is read, never loaded half-way."""
  from jlora.adapters import adapter as adapter_kinds
  written = meta.get("jlora_version", "?")
  for e in meta["entries"]:
    if e["kind"] == "extra":
      continue
    cls = encoding.adapter_class(e["kind"])
    if cls is None:
      raise LoraCheckpointError(
          f"checkpoint '{path}': '{e['path']}' holds a {e['kind']!r} adapter, a kind this "
          f"jlora does not know (it reads {', '.join(adapter_kinds.known_kinds())}); it was "
          f"written by jlora {written}: load it with that version or a later one")
    arrays_, static = set(e["arrays"]), set(e["static"])
    unknown = sorted((arrays_ - set(encoding.array_fields(cls)))
                     | (static - set(encoding.static_fields(cls))))
    missing = sorted(set(encoding.array_fields(cls)) - arrays_)
    if unknown or missing:
      raise LoraCheckpointError(
          f"checkpoint '{path}': '{e['path']}' is a {e['kind']!r} adapter with fields this "
          f"jlora does not know ({unknown}) or lacks ({missing}); it was written by jlora "
          f"{written}: load it with that version or a later one")


def require(ok: bool, what: str) -> None:
  if not ok:
    raise ValueError(f"bad {what}")


def validate_info(info: Any) -> None:
  require(isinstance(info["shape"], list) and isinstance(info["dtype"], str), "array info")
  jnp.dtype(info["dtype"])


def validate(meta: dict[str, Any], fmt: str) -> None:
  """Touches every field the readers use, so a damaged file fails here."""
  if fmt == names.TRAIN_FORMAT:
    int(meta["step"])
    for row in meta["opt_state"]:
      require(isinstance(row["path"], str), "optimizer leaf path")
      validate_info(row)
    return
  base_paths = {row[0] for row in meta["base"]["params"]}
  require(isinstance(meta["base"]["sha256"], str), "base hash")
  for e in meta["entries"]:
    require(isinstance(e["kind"], str) and isinstance(e["key"], str), "entry")
    require(e["kind"] == "extra" or e["path"] in base_paths, f"entry {e['path']!r}")
    require(isinstance(e["arrays"], dict), f"arrays of {e['path']!r}")
    for info in e["arrays"].values():
      if info is not None or e["kind"] == "extra":
        validate_info(info)
    if e["kind"] != "extra":
      require(isinstance(e["static"], dict), f"static fields of {e['path']!r}")
      require(isinstance(encoding.decode(e["static"]["layout"]), Layout), "layout")
      residual = e.get("residual_sha256")
      require(residual is None or isinstance(residual, str), "residual checksum")
