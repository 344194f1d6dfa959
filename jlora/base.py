"""Base parameters as files: ``jlora.base.save`` and ``jlora.base.load``.

A *base* (the parameters an adapter is applied to) is stored in one of two
forms, chosen by the path's suffix:

* ``NAME.safetensors``: one safetensors file, each parameter under its
  '/'-joined path (``params/layers/query/kernel``), in its own dtype, with
  the tree's leaf order in the file's metadata;
* any other name: an orbax checkpoint directory holding ``params/`` (a
  standard orbax PyTree checkpoint of the parameters as nested dicts, which
  ``orbax.checkpoint.StandardCheckpointer().restore(path / "params")``
  also reads) and ``params_meta/`` (JSON: each parameter's path, shape and
  dtype, in the tree's leaf order).

A quantized weight (a ``jlora.NF4Array`` leaf, from ``jlora.quantize``) is
stored as its arrays, ``codes``, ``absmax`` and with double quantization
``nested_absmax`` and ``offset``: in a safetensors file under
``<path>.nf4.<array>`` (``params/fc1/kernel.nf4.codes``), with its shape,
dtype, layout and block size in the metadata entry ``jlora.quantized``; in
an orbax checkpoint as a dict of those arrays at the weight's path, with the
same facts in its ``params_meta`` row (version 2). A read gives back the
``NF4Array`` exactly: the same bytes, the same static fields.

A plain orbax PyTree checkpoint directory (as
``StandardCheckpointer().save(path, params)`` writes it) and a safetensors
file written by other tools are read too, as long as the keys are the
'/'-joined paths. A Hugging Face bitsandbytes 4-bit checkpoint is keyed by
PyTorch module names instead: ``jlora.bnb.load`` reads it. Only JSON, orbax
and safetensors are read: nothing is unpickled and no code from a file runs.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _atomic, _compat, _multihost
from jlora.errors import LoraError, LoraFileError
from jlora._paths import flatten_with_paths
from jlora._param_table import summarize
from jlora.orbax import manifest
from jlora.quant import nf4, nf4_files
from jlora.quant.nf4 import NF4Array

__all__ = ["describe", "is_base", "is_owned", "load", "read", "save"]

PathLike = str | os.PathLike

_PARAMS, _PARAMS_META = "params", "params_meta"
_PARAMS_FORMAT = "jlora.params"
# Version 2 rows may describe a quantized weight; a base without one is still
# written as version 1, which earlier readers read.
_PARAMS_VERSION, _PARAMS_VERSIONS = 2, (1, 2)
# Keys of a safetensors file's metadata (string -> string): the format is
# jlora's mark; the leaf order and a SHA-256 per tensor are checked on read.
_ST_FORMAT, _ST_PATHS, _ST_SHA256 = "format", "jlora.paths", "jlora.sha256"
# path -> {shape, dtype, quant, block_size, double_quant, layout} of each NF4 weight,
# and the SHA-256 of that entry (the tensors' checksums do not cover it).
_ST_QUANT, _ST_QUANT_SHA256 = "jlora.quantized", "jlora.quantized.sha256"
# A quantized weight's arrays are stored under "<path>.nf4.<array>".
_NF4_KEY = ".nf4."


def _ocp():
  import orbax.checkpoint as ocp  # slow to import; only when a checkpoint is touched
  return ocp


def _quiet():
  from jlora.orbax.validation import quiet
  return quiet()


def is_safetensors(path: PathLike) -> bool:
  """Whether ``path`` names a safetensors file (by its suffix)."""
  return os.fspath(path).endswith(".safetensors")


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``{"a/b": x}`` -> ``{"a": {"b": x}}``; refuses paths that cannot nest."""
  root: dict[str, Any] = {}
  for path, leaf in flat.items():
    parts = path.split("/")
    if not all(parts):
      raise LoraFileError(f"parameter path '{path}' has an empty segment; cannot store it as "
                     f"nested names (use a .safetensors file)")
    node = root
    for part in parts[:-1]:
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        raise LoraFileError(f"parameter path '{path}' lies inside parameter "
                       f"'{path[:path.index(part) + len(part)]}'")
      node = child
    if parts[-1] in node:
      raise LoraFileError(f"parameter path '{path}' is also a prefix of other parameters")
    node[parts[-1]] = leaf
  return root


def canonical_order(paths: Sequence[str]) -> list[str]:
  """The leaf order JAX gives the tree the paths name, without a stored order.

  JAX sorts dict keys level by level: strings as strings (Linen's
  ``layers_10`` before ``layers_2``), integers as numbers (NNX's
  ``blocks/10`` after ``blocks/2``); a digit-only segment is taken to be an
  integer key.
  """
  def key(path: str):
    return tuple((0, int(s), "") if s.isdigit() else (1, 0, s) for s in path.split("/"))
  return sorted(paths, key=key)


def _sha256(x: Any) -> str:
  host = np.ascontiguousarray(np.asarray(x)).reshape(-1)
  return hashlib.sha256(host.view(np.uint8).data).hexdigest()


def _describe(shape: Any, dtype: Any) -> str:
  return f"shape {tuple(shape)} dtype {jnp.dtype(dtype).name}"


def _describe_leaf(x: Any) -> str:
  if isinstance(x, NF4Array):
    return (f"NF4 ({_describe(x.shape, x.dtype)}, block size {x.block_size}, "
            f"{'double quantization, ' if x.double_quant else ''}{x.layout})")
  return _describe(x.shape, x.dtype)


def _params_rows(pairs: Sequence[tuple[str, Any]]) -> list[list[Any]]:
  """[path, shape, dtype] per leaf, and the NF4 metadata of a quantized one."""
  return [[p, [int(d) for d in leaf.shape], jnp.dtype(leaf.dtype).name]
          + ([nf4_files.file_metadata(leaf)] if isinstance(leaf, NF4Array) else [])
          for p, leaf in pairs]


def _nf4_parts(q: NF4Array) -> dict[str, Any]:
  """name -> array of the fields an NF4Array holds (None fields left out)."""
  return {name: getattr(q, name) for name in nf4.PARTS if getattr(q, name) is not None}


def _is_concrete(x: Any) -> bool:
  return (hasattr(x, "shape") and hasattr(x, "dtype")
          and not isinstance(x, jax.ShapeDtypeStruct) and not _compat.is_tracer(x))


def _stored(pairs: Sequence[tuple[str, Any]], sep: str) -> dict[str, Any]:
  """key -> array of everything a base writes: a dense leaf under its path, an
  NF4 weight's arrays under ``<path><sep><array>``; refuses a key met twice."""
  out: dict[str, Any] = {}
  for p, leaf in pairs:
    items = ([(f"{p}{sep}{name}", x) for name, x in _nf4_parts(leaf).items()]
             if isinstance(leaf, NF4Array) else [(p, leaf)])
    for key, x in items:
      if key in out:
        raise LoraFileError(f"'{key}' names both a parameter and an array of the NF4 weight "
                            f"'{key.rpartition(sep)[0]}'; cannot store both")
      out[key] = x
  return out


def save(path: PathLike, params: Any, *, overwrite: bool = False) -> pathlib.Path:
  """Writes a parameter tree as a base the ``jlora`` command line reads.

  A path ending in ``.safetensors`` gives one safetensors file keyed by
  '/'-joined parameter paths; any other path gives an orbax checkpoint
  directory (``params/``: the parameters as nested dicts, ``params_meta/``:
  JSON with each path, shape and dtype). Both keep every leaf's dtype and
  record the tree's leaf order, and carry jlora's mark (a SHA-256 of each
  tensor, or of each file), which readers verify. The write is atomic: a
  reader finds the old base or the new one whatever point a kill interrupts
  it at, and ``overwrite`` replaces only a base jlora wrote (see the module
  docstring for the layout). With several JAX processes every process calls
  it, as ``jlora.orbax.save``: process 0 checks, writes the manifest (or
  the whole safetensors file, from arrays gathered to every process) and
  swaps the result in.

  Args:
    path: the file or directory to create.
    params: a tree of arrays (Linen ``variables``, an NNX ``State``, a dict);
      None leaves are skipped.
    overwrite: replace an existing base at ``path`` (one jlora wrote).

  Returns:
    The absolute path written.

  Raises:
    LoraFileError: ``path`` exists (without ``overwrite``, or is not a base
      jlora wrote), two leaves share a path, a leaf is not an array, or the
      file system refused (the message names the path and the reason).

  Example:
    >>> import tempfile, jax.numpy as jnp, jlora
    >>> params = {"dense": {"kernel": jnp.ones((2, 3), jnp.bfloat16)}}
    >>> f = jlora.base.save(f"{tempfile.mkdtemp()}/base.safetensors", params)
    >>> jlora.base.load(f)["dense"]["kernel"].dtype
    dtype(bfloat16)
  """
  path = pathlib.Path(path).absolute()
  if _atomic.exists(path) and not _atomic.is_empty_dir(path) and not overwrite:
    raise LoraFileError(f"'{path}' already exists; pass overwrite=True (--overwrite) to "
                        f"replace it")
  pairs = [(p, leaf) for p, leaf in flatten_with_paths(params)[0] if leaf is not None]
  seen: set[str] = set()
  for p, leaf in pairs:
    if p in seen:
      raise LoraFileError(f"two parameters are both named '{p}'; cannot store by path")
    seen.add(p)
    arrays = _nf4_parts(leaf).values() if isinstance(leaf, NF4Array) else [leaf]
    if not all(_is_concrete(x) for x in arrays):
      what = "an abstract NF4Array" if isinstance(leaf, NF4Array) else type(leaf).__name__
      raise LoraFileError(f"'{p}': expected an array, got {what}")
  if not pairs:
    raise LoraFileError("params holds no arrays; nothing to save")
  rows = _params_rows(pairs)
  quantized = {row[0]: {"shape": row[1], "dtype": row[2], **row[3]} for row in rows
               if len(row) > 3}
  if is_safetensors(path):
    # One file: with several processes, the arrays are gathered to every
    # process (a collective) and process 0 alone writes it.
    from safetensors.flax import save_file
    stored = _stored(pairs, _NF4_KEY)
    if _multihost.process_count() > 1:
      stored = dict(zip(stored, _multihost.gather_to_host(list(stored.values()))))
    tensors = {k: jnp.asarray(x) for k, x in stored.items()}
    metadata = {_ST_FORMAT: _PARAMS_FORMAT, _ST_PATHS: json.dumps([p for p, _ in pairs]),
                _ST_SHA256: json.dumps({k: _sha256(x) for k, x in tensors.items()})}
    if quantized:
      metadata[_ST_QUANT] = json.dumps(quantized)
      metadata[_ST_QUANT_SHA256] = hashlib.sha256(metadata[_ST_QUANT].encode()).hexdigest()
    return _atomic.replace_collective(
        path, write_primary=lambda tmp: save_file(tensors, os.fspath(tmp), metadata=metadata),
        overwrite=overwrite, owned=is_owned, what="base", op="jlora.base.save")
  nested = _nest(_stored(pairs, "/"))
  ocp = _ocp()
  meta = {"format": _PARAMS_FORMAT, "version": _PARAMS_VERSION if quantized else 1,
          "params": rows}
  args = ocp.args.Composite(**{_PARAMS: ocp.args.StandardSave(nested),
                               _PARAMS_META: ocp.args.JsonSave(meta)})

  def write(tmp: pathlib.Path) -> None:   # every process writes its shards
    with _quiet(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      ckptr.save(tmp, args=args)

  return _atomic.replace_collective(
      path, write_all=write, write_primary=lambda tmp: manifest.write(tmp, _PARAMS_FORMAT),
      overwrite=overwrite, owned=is_owned, what="base", op="jlora.base.save")


def read(path: PathLike, what: str = "base") -> collections.OrderedDict:
  """A base on disk -> ``OrderedDict(path -> array)`` in the tree's leaf order.

  Example:
    >>> import tempfile, jax.numpy as jnp, jlora
    >>> f = jlora.base.save(f"{tempfile.mkdtemp()}/b.safetensors", {"z": jnp.ones(2), "a": jnp.ones(3)})
    >>> list(jlora.base.read(f))
    ['a', 'z']
  """
  path = _atomic.resolve(path)
  if not path.exists():
    raise LoraFileError(f"no {what} at '{path}': it does not exist")
  if path.is_file():
    return _read_safetensors_params(path, what)
  if (path / _PARAMS_META).is_dir():
    return _read_orbax_params(path)
  if (path / "_METADATA").is_file():
    return _read_plain_orbax(path, what)
  from jlora.orbax.adapter import is_adapter as is_orbax_adapter
  from jlora.peft.describe import is_adapter as is_peft_adapter
  hint = ""
  if is_orbax_adapter(path) or is_peft_adapter(path):
    hint = "; it is an adapter, not a base"
  raise LoraFileError(f"'{path}' is not a {what}: expected a jlora params checkpoint (with "
                      f"'{_PARAMS_META}/'), an orbax PyTree checkpoint or a .safetensors "
                      f"file{hint}")


def _read_safetensors_params(path: pathlib.Path, what: str) -> collections.OrderedDict:
  from safetensors import safe_open
  try:
    with safe_open(os.fspath(path), "flax") as f:
      keys = list(f.keys())
      metadata = f.metadata() or {}
      if metadata.get(_ST_FORMAT) != _PARAMS_FORMAT:
        state = next((k for k in keys if nf4_files.is_quant_state_key(k)), None)
        if state is not None:
          raise LoraFileError(
              f"'{path}' is a bitsandbytes 4-bit checkpoint (it has '{state}'), keyed by "
              f"PyTorch module names, not a base keyed by parameter paths: read it with "
              f"jlora.bnb.load(path, like, rules)")
      tensors = {k: f.get_tensor(k) for k in keys}
  except LoraFileError:
    raise
  except Exception as e:  # safetensors raises its own (non-OSError) types
    raise LoraFileError(f"'{path}' is not a {what}: not a readable safetensors file "
                        f"({' '.join(str(e).split())})") from None
  if metadata.get(_ST_FORMAT) != _PARAMS_FORMAT:
    # Written by another tool: no order and no checksums to check.
    order = None
    if metadata.get(_ST_PATHS):
      try:
        order = json.loads(metadata[_ST_PATHS])
      except json.JSONDecodeError:
        order = None
      if not isinstance(order, list) or sorted(order) != sorted(keys):
        order = None
    order = order or canonical_order(keys)
    return collections.OrderedDict((k, tensors[k]) for k in order)
  # jlora's: the order, the quantized weights' arrays and every tensor's checksum must hold.
  damaged = (f"'{path}' is damaged: its jlora metadata (leaf order, quantized weights, "
             f"checksums) does not match its tensors")
  try:
    order = json.loads(metadata.get(_ST_PATHS) or "null")
    sums = json.loads(metadata.get(_ST_SHA256) or "null")
    raw = metadata.get(_ST_QUANT)
    if raw is not None and hashlib.sha256(raw.encode()).hexdigest() != metadata.get(
        _ST_QUANT_SHA256):
      raise LoraFileError(f"'{path}' is damaged: its quantized weights' metadata "
                          f"('{_ST_QUANT}') fails its checksum")
    quantized = json.loads(raw or "{}")
    expected = [p for p in order if p not in quantized]
    for p, info in quantized.items():
      if p not in order:
        raise ValueError(p)
      expected += [f"{p}{_NF4_KEY}{name}" for name in nf4.part_specs(
          info["shape"], nf4_files.layout_of(info), info["block_size"], info["double_quant"])]
  except LoraFileError:
    raise
  except (ValueError, RecursionError, TypeError, KeyError, AttributeError, LoraError):
    raise LoraFileError(damaged) from None
  if (len(set(order)) != len(order) or sorted(expected) != sorted(keys)
      or not isinstance(sums, dict) or sorted(sums) != sorted(keys)):
    raise LoraFileError(damaged)
  for k in keys:
    if _sha256(tensors[k]) != sums[k]:
      raise LoraFileError(f"'{path}' is damaged: tensor '{k}' fails its checksum (its SHA-256 "
                          f"differs from the one jlora recorded when writing it)")
  out = collections.OrderedDict()
  for p in order:
    if p in quantized:
      info = quantized[p]
      parts = {k[len(p) + len(_NF4_KEY):]: x for k, x in tensors.items()
               if k.startswith(p + _NF4_KEY)}
      out[p] = nf4_files.from_file(parts, info["shape"], info["dtype"], info, f"'{path}': '{p}'",
                             error=LoraFileError)
    else:
      out[p] = tensors[p]
  return out


def _abstract(shape: Sequence[int], dtype: str) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype),
                              sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def _row(row: Any) -> tuple[str, list[int], str, dict[str, Any] | None]:
  """(path, shape, dtype, NF4 metadata or None) of a ``params_meta`` row."""
  if not isinstance(row, list) or len(row) not in (3, 4):
    raise LoraFileError(f"a '{_PARAMS_META}' row is not [path, shape, dtype(, quantization)]: "
                        f"{str(row)[:100]}")
  return row[0], row[1], row[2], row[3] if len(row) == 4 else None


def _read_orbax_params(path: pathlib.Path) -> collections.OrderedDict:
  ocp = _ocp()
  manifest.verify(path, (_PARAMS_FORMAT,), error=LoraFileError)
  try:
    with _quiet(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      meta = ckptr.restore(path, args=ocp.args.Composite(
          **{_PARAMS_META: ocp.args.JsonRestore()}))[_PARAMS_META]
      if not isinstance(meta, dict) or meta.get("format") != _PARAMS_FORMAT:
        raise LoraFileError(f"'{path}': '{_PARAMS_META}' is not {_PARAMS_FORMAT} metadata")
      if meta.get("version") not in _PARAMS_VERSIONS:
        raise LoraFileError(f"'{path}': {_PARAMS_FORMAT} version {meta.get('version')} is not "
                            f"supported (this jlora reads versions "
                            f"{', '.join(map(str, _PARAMS_VERSIONS))})")
      rows = [_row(r) for r in meta["params"]]
      abstract = {}
      for p, shape, dtype, quant in rows:
        if quant is None:
          abstract[p] = _abstract(shape, dtype)
          continue
        specs = nf4.part_specs(shape, nf4_files.layout_of(quant), quant["block_size"],
                               quant["double_quant"])
        abstract.update({f"{p}/{name}": _abstract(s, d) for name, (s, d) in specs.items()})
      target = _nest(abstract)
      nested = ckptr.restore(path, args=ocp.args.Composite(
          **{_PARAMS: ocp.args.StandardRestore(target)}))[_PARAMS]
  except LoraFileError:
    raise
  except Exception as e:  # anything orbax raises means an unreadable checkpoint
    raise LoraFileError(f"'{path}': cannot read the params checkpoint ({type(e).__name__}: "
                        f"{' '.join(str(e).split())}); it is incomplete or corrupted") from e
  flat = dict(flatten_with_paths(nested)[0])
  out = collections.OrderedDict()
  for p, shape, dtype, quant in rows:
    if quant is not None:
      parts = {k[len(p) + 1:]: x for k, x in flat.items() if k.startswith(p + "/")}
      out[p] = nf4_files.from_file(parts, shape, dtype, quant, f"'{path}': '{p}'",
                             error=LoraFileError)
      continue
    leaf = flat.get(p)
    if leaf is None or list(leaf.shape) != list(shape) or jnp.dtype(leaf.dtype).name != dtype:
      raise LoraFileError(f"'{path}': '{p}' is missing or is not {_describe(shape, dtype)}")
    out[p] = leaf
  return out


def _read_plain_orbax(path: pathlib.Path, what: str) -> collections.OrderedDict:
  ocp = _ocp()
  try:
    with _quiet(), ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(path)
  except Exception as e:  # anything orbax raises means an unreadable checkpoint
    raise LoraFileError(f"'{path}': cannot read it as an orbax PyTree checkpoint "
                        f"({type(e).__name__}: {' '.join(str(e).split())})") from e
  pairs = [(p, leaf) for p, leaf in flatten_with_paths(tree)[0] if leaf is not None]
  if not pairs:
    raise LoraFileError(f"'{path}' is not a {what}: the orbax checkpoint holds no arrays")
  return collections.OrderedDict((p, jnp.asarray(leaf)) for p, leaf in pairs)


def load(path: PathLike, like: Any = None) -> Any:
  """Reads a base written by ``jlora.base.save`` (or ``jlora merge``).

  Args:
    path: a ``.safetensors`` file or an orbax checkpoint directory
      (``jlora.base.save``'s, or a plain orbax PyTree checkpoint).
    like: optional tree (concrete or ``jax.ShapeDtypeStruct`` leaves) whose
      structure the result takes; every one of its paths must be in the
      file with the same shape and dtype. A quantized weight in the file
      (an ``NF4Array``) comes back quantized where ``like`` has the dense
      weight it stands for (same shape and dtype) or an ``NF4Array`` with
      the same layout and block size. Without ``like``, the parameters
      come back as nested dicts keyed by path segment.

  Returns:
    The parameter tree.

  Raises:
    LoraFileError: no such file, not a base, or it does not fit ``like``.

  Example:
    See ``jlora.base.save``.
  """
  flat = read(path)
  if like is None:
    return _nest(flat)
  pairs, treedef = flatten_with_paths(like)
  leaves = []
  for p, leaf in pairs:
    if leaf is None:
      leaves.append(None)
      continue
    if p not in flat:
      raise LoraFileError(f"'{path}' has no parameter '{p}'")
    got = flat[p]
    if tuple(got.shape) != tuple(leaf.shape) or got.dtype != leaf.dtype:
      raise LoraFileError(f"'{path}': '{p}' is {_describe_leaf(got)}, expected "
                          f"{_describe_leaf(leaf)}")
    if isinstance(leaf, NF4Array) and (
        not isinstance(got, NF4Array) or nf4_files.file_metadata(got) != nf4_files.file_metadata(leaf)):
      raise LoraFileError(f"'{path}': '{p}' is {_describe_leaf(got)}, expected "
                          f"{_describe_leaf(leaf)}")
    leaves.append(got)
  unused = sorted(set(flat) - {p for p, _ in pairs})
  if unused:
    raise LoraFileError(f"'{path}' has parameters that `like` lacks: {unused[:5]}")
  return treedef.unflatten(leaves)


def is_owned(path: PathLike) -> bool:
  """Whether ``path`` is a base jlora wrote (it carries jlora's mark): the only
  kind of file ``save(..., overwrite=True)`` replaces.

  Example:
    >>> import pathlib, tempfile, jax.numpy as jnp, jlora
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "notes.safetensors").write_text("mine")
    >>> is_owned(jlora.base.save(d / "b.safetensors", {"w": jnp.ones(2)})), is_owned(d / "notes.safetensors")
    (True, False)
  """
  p = pathlib.Path(path)
  if p.is_dir():
    return manifest.kind(p) == _PARAMS_FORMAT
  if not p.is_file() or not is_safetensors(p):
    return False
  from safetensors import safe_open
  try:
    with safe_open(os.fspath(p), "numpy") as f:
      return (f.metadata() or {}).get(_ST_FORMAT) == _PARAMS_FORMAT
  except Exception:  # not a readable safetensors file: not ours
    return False


def is_base(path: PathLike) -> bool:
  """Whether ``path`` looks like a base: a ``.safetensors`` file, a jlora
  params checkpoint or a plain orbax PyTree checkpoint directory.

  Example:
    >>> import tempfile, jax.numpy as jnp, jlora
    >>> d = tempfile.mkdtemp()
    >>> is_base(jlora.base.save(f"{d}/b.safetensors", {"w": jnp.ones(2)})), is_base(d)
    (True, False)
  """
  p = pathlib.Path(path)
  if p.is_file():
    return is_safetensors(p)
  return (p / _PARAMS_META).is_dir() or (p / "_METADATA").is_file()


def describe(path: PathLike) -> dict[str, Any]:
  """What a base file holds: each parameter's path, shape and dtype, and for a
  quantized one its format and bytes; the totals of quantized and dense
  parameters.

  Example:
    >>> import tempfile, jax.numpy as jnp, jlora
    >>> f = jlora.base.save(f"{tempfile.mkdtemp()}/b.safetensors", {"w": jnp.ones((2, 3))})
    >>> info = jlora.base.describe(f)
    >>> info["params"], info["elements"], info["tensors"]
    (1, 6, [{'path': 'w', 'shape': [2, 3], 'dtype': 'float32'}])
    >>> q = jlora.quantize({"kernel": jnp.ones((128, 64)), "bias": jnp.ones(64)})
    >>> info = jlora.base.describe(jlora.base.save(f"{tempfile.mkdtemp()}/q.safetensors", q))
    >>> info["quantized"], info["dense"]["tensors"]
    ({'tensors': 1, 'elements': 8192, 'bytes': 4232, 'bits_per_param': 4.1328125}, 1)
  """
  flat = read(path, "params checkpoint")
  info = {"path": str(pathlib.Path(path).absolute()), "format": "params",
          "format_detail": "parameters (a base or a merged model): " +
                           ("safetensors file" if pathlib.Path(path).is_file()
                            else "orbax checkpoint")}
  info.update(summarize([(p, x.shape, x.dtype, _nbytes(x),
                          nf4_files.file_metadata(x) if isinstance(x, NF4Array) else None)
                         for p, x in flat.items()]))
  return info


def _nbytes(x: Any) -> int:
  if isinstance(x, NF4Array):
    return int(x.nbytes)
  return int(x.size * jnp.dtype(x.dtype).itemsize)
