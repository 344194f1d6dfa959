"""One adapter in one directory: ``jlora.orbax.save``, ``load`` and ``metadata``.

An adapter directory holds::

  adapter/       orbax arrays: A, B and the extra trainable leaves, nothing else
  adapter_meta/  JSON: LoRA metadata (scale, layout, dropout per weight), the
                 spec, a SHA-256 per array, and the base's fingerprint
                 (every parameter's path, shape and dtype, and their hash)

A ``CheckpointManager`` step adds ``opt_state/`` and ``train_meta/``, so
``load(manager.step_path(step), base=...)`` reads the adapter of a training
checkpoint.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from jlora import _atomic
from jlora.errors import LoraCheckpointError
from jlora.spec import LoraSpec
from jlora.orbax import encoding, manifest, names, payload, validation
from jlora.orbax import restore as restore_lib

PathLike = str | os.PathLike
# Directories whose adapter load() reads: adapters and CheckpointManager steps.
ADAPTER_KINDS = (names.FORMAT, names.TRAIN_FORMAT)


def save(path: PathLike, trainable: Any, spec: LoraSpec | None = None, *, base: Any,
         overwrite: bool = False) -> pathlib.Path:
  """Saves the adapter (A, B and extra trainable leaves) to a directory.

  Only the trainable part is written, with JSON metadata: each factor's
  scale, layout and dropout, the spec, a SHA-256 of every array and a
  fingerprint of ``base`` (every parameter's path, shape and dtype), so the
  directory is the adapter's bytes plus a few kilobytes whatever the size of
  the base. The directory carries jlora's mark (``jlora_manifest.json``: the
  size and SHA-256 of every file), which ``load`` verifies before reading.

  The write is atomic: it is staged beside ``path`` and swapped in at once,
  so a reader finds the previous adapter or the new one, never a mix, even
  if the process is killed at any point; the next call finishes or cleans
  up what a killed one left. ``overwrite`` replaces only an adapter jlora
  wrote, never another directory.

  With several JAX processes (``jax.distributed``), every process calls
  ``save`` with its part of the (globally sharded) arrays, as for any orbax
  save: each writes its shards into one staging folder, and process 0 checks
  ``path``, writes the manifest and swaps the folder in; every process
  returns once it is in place, or raises process 0's error. This needs one
  file system seen by every process at ``path`` (the same disk, or NFS);
  the arrays' own checksums are then left out of the metadata (no process
  sees a whole array), the manifest's file checksums remain.

  Args:
    path: the directory to create.
    trainable: the trainable part from ``lora_transform`` (trained or not).
    spec: the spec that made ``trainable``, stored as JSON so that
      ``jlora.orbax.load`` can return it. A callable selector cannot be stored;
      the metadata records its name and the loaded spec selects the saved
      paths exactly.
    base: the frozen part or the full parameters the adapter belongs to
      (concrete or ``jax.ShapeDtypeStruct`` leaves); only its paths, shapes
      and dtypes are recorded.
    overwrite: replace an existing adapter at ``path`` (one jlora wrote).

  Returns:
    The absolute path written.

  Raises:
    LoraCheckpointError: ``path`` exists (without ``overwrite``, or is not a
      jlora adapter), a value cannot be stored, or the file system refused
      (the message names the path and the reason).
    LoraTreeError: ``trainable`` does not belong to ``base``.
    LoraSpecError: ``spec`` gives another rank or scale than the factors.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"w": jnp.ones((8, 4))}
    >>> spec = jlora.LoraSpec(rank=2, targets=["w"])
    >>> frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
    >>> d = tempfile.mkdtemp()
    >>> _ = jlora.orbax.save(f"{d}/adapter", trainable, spec, base=frozen)
    >>> loaded, loaded_spec = jlora.orbax.load(f"{d}/adapter", base=frozen)
    >>> bool(jnp.array_equal(loaded["w"].a, trainable["w"].a)), loaded_spec == spec
    (True, True)
  """
  ocp = names.ocp()
  path = pathlib.Path(path).absolute()
  saved, meta = payload.adapter_payload(trainable, spec, base)
  args = ocp.args.Composite(**{names.ADAPTER: ocp.args.StandardSave(saved),
                               names.ADAPTER_META: ocp.args.JsonSave(meta)})
  # With several JAX processes every one calls save: each writes its shards
  # through orbax into the staging folder process 0 names, then process 0
  # writes the manifest and swaps the folder in (jlora._atomic.replace_collective).

  def write_arrays(staging: pathlib.Path) -> None:
    with validation.quiet(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      ckptr.save(staging, args=args)

  return _atomic.replace_collective(
      path, write_all=write_arrays, write_primary=lambda p: manifest.write(p, names.FORMAT),
      overwrite=overwrite, owned=is_owned, what="jlora adapter", error=LoraCheckpointError,
      op="jlora.orbax.save")


def load(path: PathLike, *, base: Any) -> tuple[Any, LoraSpec | None]:
  """Loads an adapter saved by ``jlora.orbax.save`` (or a ``CheckpointManager`` step).

  The adapter is checked against ``base`` first: a base whose parameter
  paths, shapes or dtypes differ from the one the adapter was made for
  raises an error naming the first differing parameter. Every array's
  checksum is verified after reading. Factors are placed with the sharding
  derived from W0's (as ``lora_transform`` does); extra leaves take the base
  leaf's sharding when ``base`` holds them (the full parameters), else are
  replicated on the base's mesh; without shardings in ``base``, everything
  goes to the default device.

  Args:
    path: the adapter directory.
    base: the frozen part or the full parameters (concrete, or abstract with
      ``jax.ShapeDtypeStruct`` leaves carrying the wanted shardings).

  Returns:
    ``(trainable, spec)``: ``trainable`` has the structure and LoRA metadata of
    the saved one, ready for ``jlora.lora`` and ``jlora.merge`` with the
    frozen part; ``spec`` is the stored spec, or None if none was saved.

  Raises:
    LoraCheckpointError: no directory, not an adapter, a different base, or an
      unreadable or corrupted checkpoint (the message names ``path``).

  Example:
    See ``jlora.orbax.save``.
  """
  path = _atomic.resolve(path)
  validation.check_dir(path, names.ADAPTER_META, "jlora adapter")
  manifest.verify(path, ADAPTER_KINDS)
  restore = validation.checkpointer_restore(path)
  meta = validation.read_json(restore, names.ADAPTER_META, path, names.FORMAT)
  spec = encoding.spec_from_meta(meta, path)
  return restore_lib.restore_trainable(restore, meta, base, path, spec=spec), spec


def metadata(path: PathLike) -> dict[str, Any]:
  """The JSON metadata of an adapter directory, without reading its arrays.

  Holds ``entries`` (per adapted weight: path, shapes, dtypes, checksums,
  scale and layout), ``spec`` (encoded), ``adapter_bytes`` and ``base``
  (``sha256`` and the ``params`` list of [path, shape, dtype]).

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"w": jnp.ones((8, 4))}
    >>> frozen, trainable = jlora.lora_transform(
    ...     params, jlora.LoraSpec(rank=2, targets=["w"]), key=jax.random.key(0))
    >>> d = jlora.orbax.save(f"{tempfile.mkdtemp()}/a", trainable, base=frozen)
    >>> jlora.orbax.metadata(d)["base"]["params"]
    [['w', [8, 4], 'float32']]
  """
  path = _atomic.resolve(path)
  validation.check_dir(path, names.ADAPTER_META, "jlora adapter")
  manifest.verify(path, ADAPTER_KINDS)
  return validation.read_json(validation.checkpointer_restore(path), names.ADAPTER_META, path,
                              names.FORMAT)


def is_adapter(path: PathLike) -> bool:
  """Whether ``path`` is a directory with jlora adapter metadata (an adapter
  or a ``CheckpointManager`` step).

  Example:
    >>> import tempfile
    >>> is_adapter(tempfile.mkdtemp())
    False
  """
  return (pathlib.Path(path) / names.ADAPTER_META).is_dir()


def is_owned(path: PathLike) -> bool:
  """Whether ``path`` is an adapter directory jlora wrote (its manifest says so):
  the only kind of directory ``save(..., overwrite=True)`` replaces."""
  return manifest.kind(path) == names.FORMAT
