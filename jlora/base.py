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

A plain orbax PyTree checkpoint directory (as
``StandardCheckpointer().save(path, params)`` writes it) and a safetensors
file written by other tools are read too, as long as the keys are the
'/'-joined paths. Only JSON, orbax and safetensors are read: nothing is
unpickled and no code from a file runs.
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

from jlora import _atomic, _multihost
from jlora.errors import LoraFileError
from jlora._paths import flatten_with_paths
from jlora.orbax import manifest

PathLike = str | os.PathLike

_PARAMS, _PARAMS_META = "params", "params_meta"
_PARAMS_FORMAT = "jlora.params"
_PARAMS_VERSION = 1
# Keys of a safetensors file's metadata (string -> string): the format is
# jlora's mark; the leaf order and a SHA-256 per tensor are checked on read.
_ST_FORMAT, _ST_PATHS, _ST_SHA256 = "format", "jlora.paths", "jlora.sha256"


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


def _params_rows(pairs: Sequence[tuple[str, Any]]) -> list[list[Any]]:
  return [[p, [int(d) for d in leaf.shape], jnp.dtype(leaf.dtype).name] for p, leaf in pairs]


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
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype") or isinstance(
        leaf, jax.ShapeDtypeStruct):
      raise LoraFileError(f"'{p}': expected an array, got {type(leaf).__name__}")
  if not pairs:
    raise LoraFileError("params holds no arrays; nothing to save")
  rows = _params_rows(pairs)
  if is_safetensors(path):
    # One file: with several processes, the arrays are gathered to every
    # process (a collective) and process 0 alone writes it.
    from safetensors.flax import save_file
    if _multihost.process_count() > 1:
      pairs = list(zip([p for p, _ in pairs],
                       _multihost.gather_to_host([leaf for _, leaf in pairs])))
    tensors = {p: jnp.asarray(leaf) for p, leaf in pairs}
    metadata = {_ST_FORMAT: _PARAMS_FORMAT, _ST_PATHS: json.dumps([p for p, _ in pairs]),
                _ST_SHA256: json.dumps({p: _sha256(x) for p, x in tensors.items()})}
    return _atomic.replace_collective(
        path, write_primary=lambda tmp: save_file(tensors, os.fspath(tmp), metadata=metadata),
        overwrite=overwrite, owned=is_owned, what="base", op="jlora.base.save")
  nested = _nest(dict(pairs))
  ocp = _ocp()
  meta = {"format": _PARAMS_FORMAT, "version": _PARAMS_VERSION, "params": rows}
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
      tensors = {k: f.get_tensor(k) for k in keys}
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
  # jlora's: the order and every tensor's checksum must hold.
  try:
    order = json.loads(metadata.get(_ST_PATHS) or "null")
    sums = json.loads(metadata.get(_ST_SHA256) or "null")
  except (ValueError, RecursionError):
    order = sums = None
  if (not isinstance(order, list) or sorted(order) != sorted(keys)
      or not isinstance(sums, dict) or sorted(sums) != sorted(keys)):
    raise LoraFileError(f"'{path}' is damaged: its jlora metadata (leaf order, checksums) "
                        f"does not match its tensors")
  for k in order:
    if _sha256(tensors[k]) != sums[k]:
      raise LoraFileError(f"'{path}' is damaged: tensor '{k}' fails its checksum (its SHA-256 "
                          f"differs from the one jlora recorded when writing it)")
  return collections.OrderedDict((k, tensors[k]) for k in order)


def _abstract(shape: Sequence[int], dtype: str) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype),
                              sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def _read_orbax_params(path: pathlib.Path) -> collections.OrderedDict:
  ocp = _ocp()
  manifest.verify(path, (_PARAMS_FORMAT,), error=LoraFileError)
  try:
    with _quiet(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      meta = ckptr.restore(path, args=ocp.args.Composite(
          **{_PARAMS_META: ocp.args.JsonRestore()}))[_PARAMS_META]
      if not isinstance(meta, dict) or meta.get("format") != _PARAMS_FORMAT:
        raise LoraFileError(f"'{path}': '{_PARAMS_META}' is not {_PARAMS_FORMAT} metadata")
      if meta.get("version") != _PARAMS_VERSION:
        raise LoraFileError(f"'{path}': {_PARAMS_FORMAT} version {meta.get('version')} is not "
                            f"supported (this jlora reads version {_PARAMS_VERSION})")
      rows = meta["params"]
      target = _nest({p: _abstract(shape, dtype) for p, shape, dtype in rows})
      nested = ckptr.restore(path, args=ocp.args.Composite(
          **{_PARAMS: ocp.args.StandardRestore(target)}))[_PARAMS]
  except LoraFileError:
    raise
  except Exception as e:  # anything orbax raises means an unreadable checkpoint
    raise LoraFileError(f"'{path}': cannot read the params checkpoint ({type(e).__name__}: "
                        f"{' '.join(str(e).split())}); it is incomplete or corrupted") from e
  flat = dict(flatten_with_paths(nested)[0])
  out = collections.OrderedDict()
  for p, shape, dtype in rows:
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
      file with the same shape and dtype. Without it, the parameters come
      back as nested dicts keyed by path segment.

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
      raise LoraFileError(f"'{path}': '{p}' is {_describe(got.shape, got.dtype)}, expected "
                     f"{_describe(leaf.shape, leaf.dtype)}")
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
  """What a base file holds: each parameter's path, shape and dtype.

  Example:
    >>> import tempfile, jax.numpy as jnp, jlora
    >>> f = jlora.base.save(f"{tempfile.mkdtemp()}/b.safetensors", {"w": jnp.ones((2, 3))})
    >>> info = jlora.base.describe(f)
    >>> info["params"], info["elements"], info["tensors"]
    (1, 6, [{'path': 'w', 'shape': [2, 3], 'dtype': 'float32'}])
  """
  flat = read(path, "params checkpoint")
  dtypes = collections.Counter(jnp.dtype(x.dtype).name for x in flat.values())
  return {"path": str(pathlib.Path(path).absolute()), "format": "params",
          "format_detail": "parameters (a base or a merged model): " +
                           ("safetensors file" if pathlib.Path(path).is_file()
                            else "orbax checkpoint"),
          "params": len(flat), "elements": int(sum(x.size for x in flat.values())),
          "bytes": int(sum(x.size * x.dtype.itemsize for x in flat.values())),
          "dtypes": dict(dtypes),
          "tensors": [{"path": p, "shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name}
                      for p, x in flat.items()]}

