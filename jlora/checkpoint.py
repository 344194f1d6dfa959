"""Adapters as files: orbax checkpoints of the trainable part alone.

Two entry points share one on-disk layout (an orbax composite checkpoint):

* ``save_adapter`` / ``load_adapter``: one adapter in one directory, for
  export and for loading onto a base model;
* ``CheckpointManager``: training checkpoints (adapter, optimizer state and
  step) under ``directory/<step>``, keeping the last N, restorable onto any
  sharding.

An adapter directory holds::

  adapter/       orbax arrays: A, B and the extra trainable leaves, nothing else
  adapter_meta/  JSON: LoRA metadata (scale, layout, dropout per weight), the
                 spec, a SHA-256 per array, and the base's fingerprint
                 (every parameter's path, shape and dtype, and their hash)

and a training step adds ``opt_state/`` (arrays) and ``train_meta/`` (JSON:
step, the optimizer leaves' paths, shapes and checksums, user metadata), so
``load_adapter(manager.step_path(step), base=...)`` reads the adapter of a
training checkpoint. Nothing is pickled; metadata is JSON. Orbax writes each
checkpoint to a temporary directory and renames it when complete, so an
interrupted save never replaces the last complete one; the checksums turn a
corrupted file into a ``LoraCheckpointError`` instead of a wrong adapter.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import pathlib
import re
import shutil
import uuid
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jlora.errors import LoraCheckpointError, LoraError, LoraSpecError, LoraTreeError
from jlora._paths import flatten_with_paths
from jlora.lora_param import LoraParam
from jlora.sharding import factor_shardings, leaf_sharding
from jlora.transform import check_factors
from jlora.layout import Layout
from jlora.spec import LoraSpec

PathLike = str | os.PathLike

_FORMAT = "jlora.adapter"
_TRAIN_FORMAT = "jlora.train_state"
_VERSION = 1
# Orbax item names: subdirectories of a checkpoint directory.
_ADAPTER, _ADAPTER_META = "adapter", "adapter_meta"
_OPT, _TRAIN_META = "opt_state", "train_meta"
_TAG = "__jlora__"
# Fields of LoraSpec that select parameters (regex, names or a callable).
_SELECTORS = ("targets", "exclude", "extra_trainable")


def _ocp():
  # Imported on first use: orbax takes a third of `import jlora`'s time.
  import orbax.checkpoint as ocp
  return ocp


# -- arrays --------------------------------------------------------------------


def _dtype_name(x: Any) -> str:
  return jnp.dtype(x.dtype).name if hasattr(x, "dtype") else np.asarray(x).dtype.name


def _shape(x: Any) -> list[int]:
  return [int(d) for d in (x.shape if hasattr(x, "shape") else np.shape(x))]


def _sha256(x: Any) -> str | None:
  """SHA-256 of an array's bytes (C order); None when this process cannot see
  all of it (a multi-host array)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  host = np.ascontiguousarray(np.asarray(x)).reshape(-1)
  return hashlib.sha256(host.view(np.uint8).data).hexdigest()


def _array_info(x: Any) -> dict[str, Any]:
  return {"shape": _shape(x), "dtype": _dtype_name(x), "sha256": _sha256(x)}


def _check_concrete(path: str, x: Any) -> None:
  if isinstance(x, jax.ShapeDtypeStruct) or isinstance(x, jax.core.Tracer):
    raise LoraCheckpointError(
        f"'{path}': cannot save an abstract or traced value ({type(x).__name__}); "
        f"pass concrete arrays")
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise LoraCheckpointError(f"'{path}': expected an array, got {type(x).__name__}")


def _default_sharding() -> jax.sharding.Sharding:
  return SingleDeviceSharding(jax.devices()[0])


def _sharding_of(x: Any) -> jax.sharding.Sharding | None:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x.sharding if isinstance(x.sharding, jax.sharding.Sharding) else None
  if isinstance(x, jax.Array):
    return leaf_sharding(x)
  return None


# -- metadata encoding ---------------------------------------------------------


def _encode(value: Any, what: str) -> Any:
  """JSON form of a spec field or of LoraParam's static metadata."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, Layout):
    return {_TAG: "layout", **{k: list(v) for k, v in dataclasses.asdict(value).items()}}
  dtype = _as_dtype(value)
  if dtype is not None:
    return {_TAG: "dtype", "name": dtype.name}
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, Mapping):
    if not all(isinstance(k, str) for k in value):
      raise LoraCheckpointError(f"{what}: mapping keys must be strings to be stored, got {value!r}")
    return {_TAG: "dict", "items": {k: _encode(v, f"{what}[{k!r}]") for k, v in value.items()}}
  if isinstance(value, tuple):
    return {_TAG: "tuple", "items": [_encode(v, what) for v in value]}
  if isinstance(value, list):
    return [_encode(v, what) for v in value]
  if callable(value):
    name = f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    return {_TAG: "callable", "name": name}
  raise LoraCheckpointError(f"{what}: cannot store a {type(value).__name__} ({value!r}) as JSON")


def _as_dtype(value: Any) -> np.dtype | None:
  # np.dtype('float32'), np.float32 and jnp.float32 (a class) all name a dtype.
  if isinstance(value, np.dtype):
    return value
  if isinstance(value, type):
    try:
      return jnp.dtype(value)
    except TypeError:
      return None
  return None


class _Callable(NamedTuple):
  name: str


def _decode(value: Any) -> Any:
  if isinstance(value, list):
    return [_decode(v) for v in value]
  if not isinstance(value, dict):
    return value
  tag = value.get(_TAG)
  if tag == "layout":
    return Layout(in_axes=tuple(value["in_axes"]), out_axes=tuple(value["out_axes"]),
                  stack_axes=tuple(value["stack_axes"]))
  if tag == "dtype":
    return jnp.dtype(value["name"])
  if tag == "dict":
    return {k: _decode(v) for k, v in value["items"].items()}
  if tag == "tuple":
    return tuple(_decode(v) for v in value["items"])
  if tag == "callable":
    return _Callable(value["name"])
  raise ValueError(f"unknown encoded value {value!r}")


def _exact_regex(paths: list[str]) -> str | None:
  return "|".join(re.escape(p) for p in paths) if paths else None


def _encode_spec(spec: LoraSpec) -> dict[str, Any]:
  fields = {f.name: _encode(getattr(spec, f.name), f"spec.{f.name}")
            for f in dataclasses.fields(spec)}
  notes = [f"spec.{name} was a callable ({fields[name]['name']}) and is not stored; "
           f"load_adapter returns a spec that selects the saved paths exactly"
           for name in _SELECTORS
           if isinstance(fields.get(name), dict) and fields[name].get(_TAG) == "callable"]
  return {"fields": fields, "notes": notes}


def _decode_spec(stored: Mapping[str, Any], lora_paths: list[str], extra_paths: list[str],
                 where: str) -> LoraSpec:
  fields = {k: _decode(v) for k, v in stored["fields"].items()}
  # A callable selector cannot be stored; the saved paths stand in for it.
  exact = {"targets": _exact_regex(lora_paths), "exclude": None,
           "extra_trainable": _exact_regex(extra_paths)}
  for name in _SELECTORS:
    if isinstance(fields.get(name), _Callable):
      fields[name] = exact[name]
  known = {f.name for f in dataclasses.fields(LoraSpec)}
  try:
    return LoraSpec(**{k: v for k, v in fields.items() if k in known})
  except (LoraError, TypeError, ValueError) as e:
    raise LoraCheckpointError(f"{where}: the stored spec is invalid: {e}") from e


def _static_fields() -> list[str]:
  return [f.name for f in dataclasses.fields(LoraParam) if f.metadata.get("static")]


def _array_fields() -> list[str]:
  return [f.name for f in dataclasses.fields(LoraParam) if not f.metadata.get("static")]


# -- base fingerprint ------------------------------------------------------------


def _fingerprint(base_pairs: list[tuple[str, Any]], skip: set[str]) -> list[list[Any]]:
  rows = []
  for path, leaf in base_pairs:
    if path in skip:
      continue  # extra trainable leaves live in the adapter (None in frozen)
    if leaf is None:
      rows.append([path, None, None])
    else:
      rows.append([path, _shape(leaf), _dtype_name(leaf)])
  return rows


def _hash_rows(rows: list[list[Any]]) -> str:
  return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def _describe(shape: Any, dtype: Any) -> str:
  return "None" if shape is None else f"shape {tuple(shape)} dtype {dtype}"


def _check_base(meta: Mapping[str, Any], base_pairs: list[tuple[str, Any]], where: str) -> None:
  extras = {e["path"]: e for e in meta["entries"] if e["kind"] == "extra"}
  stored = meta["base"]["params"]
  got = _fingerprint(base_pairs, set(extras))
  if _hash_rows(got) != meta["base"]["sha256"] or got != stored:
    got_by_path = {row[0]: row for row in got}
    stored_paths = {row[0] for row in stored}
    for path, shape, dtype in stored:
      if path not in got_by_path:
        raise LoraCheckpointError(
            f"{where}: the adapter was made for a base with '{path}' "
            f"({_describe(shape, dtype)}), which this base lacks")
      _, gshape, gdtype = got_by_path[path]
      if (gshape, gdtype) != (shape, dtype):
        raise LoraCheckpointError(
            f"{where}: the adapter was made for another base: '{path}' expected "
            f"{_describe(shape, dtype)}, got {_describe(gshape, gdtype)}")
    for path, shape, dtype in got:
      if path not in stored_paths:
        raise LoraCheckpointError(
            f"{where}: this base has '{path}' ({_describe(shape, dtype)}), which the "
            f"base the adapter was made for lacks")
    raise LoraCheckpointError(
        f"{where}: the base has the adapter's parameters in another order "
        f"(a different tree structure)")
  base = dict(base_pairs)
  for path, e in extras.items():
    if path not in base:
      raise LoraCheckpointError(f"{where}: extra trainable '{path}' has no place in this base")
    leaf, info = base[path], e["arrays"]["value"]
    if leaf is not None and (_shape(leaf), _dtype_name(leaf)) != (info["shape"], info["dtype"]):
      raise LoraCheckpointError(
          f"{where}: the adapter was made for another base: '{path}' expected "
          f"{_describe(info['shape'], info['dtype'])}, got "
          f"{_describe(_shape(leaf), _dtype_name(leaf))}")


# -- payloads ------------------------------------------------------------------


def _adapter_payload(trainable: Any, spec: LoraSpec | None, base: Any
                     ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """The arrays and JSON metadata that store ``trainable``."""
  t_pairs, t_def = flatten_with_paths(trainable, is_leaf=lambda x: isinstance(x, LoraParam))
  b_pairs, b_def = flatten_with_paths(base)
  if t_def != b_def:
    t_paths, b_paths = {p for p, _ in t_pairs}, {p for p, _ in b_pairs}
    only_t, only_b = sorted(t_paths - b_paths), sorted(b_paths - t_paths)
    raise LoraTreeError(
        f"trainable and base have different structures (only in trainable: {only_t[:5]}; "
        f"only in base: {only_b[:5]}); pass the frozen part (or the parameters) that "
        f"trainable was made from as base=")
  paths = [p for p, _ in b_pairs]
  if len(set(paths)) != len(paths):
    dup = next(p for p in paths if paths.count(p) > 1)
    raise LoraCheckpointError(f"two parameters are both named '{dup}'; cannot store by path")
  arrays: dict[str, jax.Array] = {}
  entries: list[dict[str, Any]] = []
  extra_paths = []
  for (path, t), (_, w0) in zip(t_pairs, b_pairs):
    if t is None:
      continue
    key = f"p{len(entries)}"
    if isinstance(t, LoraParam):
      if w0 is None:
        raise LoraTreeError(f"'{path}' has LoRA factors in trainable but no W0 in base")
      check_factors(path, w0, t)
      if spec is not None:
        _check_spec_fits(spec, path, t)
      infos = {}
      for name in _array_fields():
        value = getattr(t, name)
        if value is None:
          infos[name] = None
          continue
        _check_concrete(f"{path}:{name}", value)
        arrays[f"{key}_{name}"] = value
        infos[name] = _array_info(value)
      static = {name: _encode(getattr(t, name), f"'{path}' LoraParam.{name}")
                for name in _static_fields()}
      entries.append({"path": path, "kind": "lora", "key": key, "arrays": infos,
                      "static": static})
    else:
      _check_concrete(path, t)
      if w0 is not None and (_shape(w0), _dtype_name(w0)) != (_shape(t), _dtype_name(t)):
        raise LoraTreeError(
            f"'{path}': trainable leaf ({_describe(_shape(t), _dtype_name(t))}) does not "
            f"match the base's ({_describe(_shape(w0), _dtype_name(w0))})")
      arrays[f"{key}_value"] = t
      entries.append({"path": path, "kind": "extra", "key": key,
                      "arrays": {"value": _array_info(t)}})
      extra_paths.append(path)
  if not arrays:
    raise LoraCheckpointError("trainable holds no arrays; nothing to save")
  rows = _fingerprint(b_pairs, set(extra_paths))
  import jlora  # the version, for the record
  meta = {
      "format": _FORMAT,
      "version": _VERSION,
      "jlora_version": jlora.__version__,
      "spec": None if spec is None else _encode_spec(spec),
      "entries": entries,
      "adapter_bytes": int(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
                               for a in arrays.values())),
      "base": {"sha256": _hash_rows(rows), "params": rows},
  }
  return arrays, meta


def _check_spec_fits(spec: LoraSpec, path: str, lp: LoraParam) -> None:
  rank, scale = lp.a.shape[-1], spec.scale_for(path)
  if spec.rank_for(path) != rank or not math.isclose(scale, lp.scale, rel_tol=1e-12):
    raise LoraSpecError(
        f"'{path}': the spec gives rank {spec.rank_for(path)} and scale {scale} but the "
        f"trainable factors have rank {rank} and scale {lp.scale}; pass the spec that "
        f"made them (or spec=None)")


def _opt_payload(opt_state: Any) -> tuple[dict[str, jax.Array], list[dict[str, Any]]]:
  leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
  arrays, rows = {}, []
  for i, (kp, leaf) in enumerate(leaves):
    path = jax.tree_util.keystr(kp)
    if not hasattr(leaf, "dtype"):
      leaf = jnp.asarray(leaf)
    _check_concrete(f"opt_state{path}", leaf)
    arrays[f"o{i}"] = leaf
    rows.append({"path": path, **_array_info(leaf)})
  return arrays, rows


# -- reading -------------------------------------------------------------------

RestoreFn = Callable[[Any], Any]  # orbax Composite args -> Composite


def _checkpointer_restore(path: pathlib.Path) -> RestoreFn:
  def restore(args):
    ocp = _ocp()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      return ckptr.restore(path, args=args)
  return restore


def _check_dir(path: pathlib.Path, item: str, what: str) -> None:
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


def _read_json(restore: RestoreFn, item: str, path: pathlib.Path, fmt: str) -> dict[str, Any]:
  ocp = _ocp()
  try:
    meta = restore(ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
  except Exception as e:  # anything orbax or json raise means an unreadable file
    raise LoraCheckpointError(
        f"checkpoint '{path}': cannot read '{item}' ({type(e).__name__}: {e}); the "
        f"checkpoint is incomplete or corrupted") from e
  if not isinstance(meta, dict) or meta.get("format") != fmt:
    raise LoraCheckpointError(f"checkpoint '{path}': '{item}' is not {fmt} metadata")
  if meta.get("version") != _VERSION:
    raise LoraCheckpointError(
        f"checkpoint '{path}': {fmt} version {meta.get('version')} is not supported "
        f"(this jlora reads version {_VERSION})")
  try:
    _validate(meta, fmt)
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise LoraCheckpointError(
        f"checkpoint '{path}': '{item}' is malformed ({type(e).__name__}: {e})") from e
  return meta


def _require(ok: bool, what: str) -> None:
  if not ok:
    raise ValueError(f"bad {what}")


def _validate_info(info: Any) -> None:
  _require(isinstance(info["shape"], list) and isinstance(info["dtype"], str), "array info")
  jnp.dtype(info["dtype"])


def _validate(meta: dict[str, Any], fmt: str) -> None:
  """Touches every field the readers use, so a damaged file fails here."""
  if fmt == _TRAIN_FORMAT:
    int(meta["step"])
    for row in meta["opt_state"]:
      _require(isinstance(row["path"], str), "optimizer leaf path")
      _validate_info(row)
    return
  base_paths = {row[0] for row in meta["base"]["params"]}
  _require(isinstance(meta["base"]["sha256"], str), "base hash")
  for e in meta["entries"]:
    _require(e["kind"] in ("lora", "extra") and isinstance(e["key"], str), "entry")
    _require(e["kind"] == "extra" or e["path"] in base_paths, f"entry {e['path']!r}")
    for info in e["arrays"].values():
      if info is not None or e["kind"] == "extra":
        _validate_info(info)
    if e["kind"] == "lora":
      _require(isinstance(_decode(e["static"]["layout"]), Layout), "layout")


def _restore_arrays(restore: RestoreFn, item: str, path: pathlib.Path,
                    targets: dict[str, tuple[dict[str, Any], Any, str]]) -> dict[str, jax.Array]:
  """Restores ``{key: (info, sharding, name)}`` and verifies every checksum."""
  ocp = _ocp()
  abstract = {key: jax.ShapeDtypeStruct(tuple(info["shape"]), jnp.dtype(info["dtype"]),
                                        sharding=sharding or _default_sharding())
              for key, (info, sharding, _) in targets.items()}
  try:
    out = restore(ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))[item]
  except Exception as e:  # anything orbax raises means an unreadable checkpoint
    raise LoraCheckpointError(
        f"checkpoint '{path}': cannot read the arrays in '{item}/' ({type(e).__name__}: "
        f"{e}); the checkpoint is incomplete or corrupted") from e
  for key, (info, _, name) in targets.items():
    arr = out.get(key) if isinstance(out, Mapping) else None
    if arr is None or _shape(arr) != info["shape"] or _dtype_name(arr) != info["dtype"]:
      raise LoraCheckpointError(
          f"checkpoint '{path}': {name} in '{item}/' is missing or has the wrong "
          f"shape/dtype (expected {_describe(info['shape'], info['dtype'])})")
    if info.get("sha256") is not None:
      got = _sha256(arr)
      if got is not None and got != info["sha256"]:
        raise LoraCheckpointError(
            f"checkpoint '{path}': {name} in '{item}/' fails its checksum (stored "
            f"sha256 {info['sha256'][:12]}..., read {got[:12]}...); the checkpoint is "
            f"corrupted")
  return out


def _factor_shardings(w0: Any, layout: Layout) -> tuple[Any, Any]:
  sharding = _sharding_of(w0)
  if isinstance(sharding, NamedSharding):
    return factor_shardings(sharding, layout, len(w0.shape))
  if isinstance(sharding, SingleDeviceSharding):
    return sharding, sharding
  return None, None


def _load_trainable(restore: RestoreFn, meta: dict[str, Any], base: Any, path: pathlib.Path,
                    template: Any = None) -> Any:
  b_pairs, b_def = flatten_with_paths(base)
  _check_base(meta, b_pairs, f"checkpoint '{path}'")
  index = {p: i for i, (p, _) in enumerate(b_pairs)}
  t_leaves = None
  if template is not None:
    t_pairs, t_def = flatten_with_paths(template, is_leaf=lambda x: isinstance(x, LoraParam))
    if t_def != b_def:
      raise LoraTreeError("restore: the trainable template does not have the base's structure")
    t_leaves = [leaf for _, leaf in t_pairs]
  # Extra leaves have no W0 in a frozen base: replicate them on the base's mesh.
  meshes = [sh.mesh for _, leaf in b_pairs
            if isinstance(sh := _sharding_of(leaf), NamedSharding)]
  extra_default = NamedSharding(meshes[0], PartitionSpec()) if meshes else None
  targets = {}
  for e in meta["entries"]:
    i = index[e["path"]]
    w0 = b_pairs[i][1]
    tmpl = None if t_leaves is None else t_leaves[i]
    if e["kind"] == "lora":
      layout = _decode(e["static"]["layout"])
      default = dict(zip(("a", "b"), _factor_shardings(w0, layout)))
      for name, info in e["arrays"].items():
        if info is None:
          continue
        sharding = default.get(name)
        if isinstance(tmpl, LoraParam) and _sharding_of(getattr(tmpl, name)) is not None:
          sharding = _sharding_of(getattr(tmpl, name))
        targets[f"{e['key']}_{name}"] = (info, sharding, f"'{e['path']}' {name.upper()}")
    else:
      sharding = _sharding_of(tmpl) if tmpl is not None else None
      if sharding is None and w0 is not None:
        sharding = _sharding_of(w0)
      if sharding is None:
        sharding = extra_default
      targets[f"{e['key']}_value"] = (e["arrays"]["value"], sharding, f"'{e['path']}'")
  arrays = _restore_arrays(restore, _ADAPTER, path, targets)
  leaves: list[Any] = [None] * len(b_pairs)
  for e in meta["entries"]:
    i = index[e["path"]]
    if e["kind"] == "lora":
      fields = {name: (None if info is None else arrays[f"{e['key']}_{name}"])
                for name, info in e["arrays"].items()}
      fields.update({name: _decode(v) for name, v in e["static"].items()})
      try:
        leaves[i] = LoraParam(**fields)
      except TypeError as err:
        raise LoraCheckpointError(
            f"checkpoint '{path}': '{e['path']}' has LoRA fields this jlora does not know "
            f"({err})") from err
    else:
      leaves[i] = arrays[f"{e['key']}_value"]
  trainable = b_def.unflatten(leaves)
  if template is not None and (jax.tree_util.tree_structure(trainable)
                               != jax.tree_util.tree_structure(template)):
    raise LoraTreeError(
        "restore: the trainable template's structure (or LoRA scale/layout/dropout) differs "
        "from the checkpoint's")
  return trainable


def _spec_from_meta(meta: dict[str, Any], path: pathlib.Path) -> LoraSpec | None:
  if meta.get("spec") is None:
    return None
  lora_paths = [e["path"] for e in meta["entries"] if e["kind"] == "lora"]
  extra_paths = [e["path"] for e in meta["entries"] if e["kind"] == "extra"]
  return _decode_spec(meta["spec"], lora_paths, extra_paths, f"checkpoint '{path}'")


# -- adapters ------------------------------------------------------------------


def save_adapter(path: PathLike, trainable: Any, spec: LoraSpec | None = None, *, base: Any,
                 overwrite: bool = False) -> pathlib.Path:
  """Saves the adapter (A, B and extra trainable leaves) to a directory.

  Only the trainable part is written, with JSON metadata: each factor's
  scale, layout and dropout, the spec, a SHA-256 of every array and a
  fingerprint of ``base`` (every parameter's path, shape and dtype), so the
  directory is the adapter's bytes plus a few kilobytes whatever the size of
  the base. The write is atomic: an interrupted save leaves no directory at
  ``path`` (and, with ``overwrite``, the previous adapter in place until the
  new one is complete).

  Args:
    path: the directory to create.
    trainable: the trainable part from ``lora_transform`` (trained or not).
    spec: the spec that made ``trainable``, stored as JSON so that
      ``load_adapter`` can return it. A callable selector cannot be stored;
      the metadata records its name and the loaded spec selects the saved
      paths exactly.
    base: the frozen part or the full parameters the adapter belongs to
      (concrete or ``jax.ShapeDtypeStruct`` leaves); only its paths, shapes
      and dtypes are recorded.
    overwrite: replace an existing directory at ``path``.

  Returns:
    The absolute path written.

  Raises:
    LoraCheckpointError: ``path`` exists (without ``overwrite``), or a value
      cannot be stored.
    LoraTreeError: ``trainable`` does not belong to ``base``.
    LoraSpecError: ``spec`` gives another rank or scale than the factors.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"w": jnp.ones((8, 4))}
    >>> spec = jlora.LoraSpec(rank=2, targets=["w"])
    >>> frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
    >>> d = tempfile.mkdtemp()
    >>> _ = jlora.save_adapter(f"{d}/adapter", trainable, spec, base=frozen)
    >>> loaded, loaded_spec = jlora.load_adapter(f"{d}/adapter", base=frozen)
    >>> bool(jnp.array_equal(loaded["w"].a, trainable["w"].a)), loaded_spec == spec
    (True, True)
  """
  ocp = _ocp()
  path = pathlib.Path(path).absolute()
  if path.exists() and not overwrite:
    raise LoraCheckpointError(f"'{path}' already exists; pass overwrite=True to replace it")
  arrays, meta = _adapter_payload(trainable, spec, base)
  args = ocp.args.Composite(**{_ADAPTER: ocp.args.StandardSave(arrays),
                               _ADAPTER_META: ocp.args.JsonSave(meta)})
  path.parent.mkdir(parents=True, exist_ok=True)
  if jax.process_count() > 1:
    # Every host takes part in orbax's save; a rename dance here would race.
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      ckptr.save(path, args=args, force=overwrite)
    return path
  # Write beside the target and rename, so a crash never leaves half an adapter
  # at `path` (orbax's own save is atomic too, but `force` deletes first).
  for stale in path.parent.glob(f".{glob.escape(path.name)}.jlora-new-*"):
    shutil.rmtree(stale, ignore_errors=True)   # left by an interrupted save
  staging = path.parent / f".{path.name}.jlora-new-{uuid.uuid4().hex[:8]}"
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      ckptr.save(staging, args=args)
    if path.exists():
      old = path.parent / f".{path.name}.jlora-old-{uuid.uuid4().hex[:8]}"
      path.rename(old)
      staging.rename(path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      staging.rename(path)
  finally:
    if staging.exists():
      shutil.rmtree(staging, ignore_errors=True)
  return path


def load_adapter(path: PathLike, *, base: Any) -> tuple[Any, LoraSpec | None]:
  """Loads an adapter saved by ``save_adapter`` (or a ``CheckpointManager`` step).

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
    See ``save_adapter``.
  """
  path = pathlib.Path(path).absolute()
  _check_dir(path, _ADAPTER_META, "jlora adapter")
  restore = _checkpointer_restore(path)
  meta = _read_json(restore, _ADAPTER_META, path, _FORMAT)
  spec = _spec_from_meta(meta, path)
  return _load_trainable(restore, meta, base, path), spec


def adapter_metadata(path: PathLike) -> dict[str, Any]:
  """The JSON metadata of an adapter directory, without reading its arrays.

  Holds ``entries`` (per adapted weight: path, shapes, dtypes, checksums,
  scale and layout), ``spec`` (encoded), ``adapter_bytes`` and ``base``
  (``sha256`` and the ``params`` list of [path, shape, dtype]).

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"w": jnp.ones((8, 4))}
    >>> frozen, trainable = jlora.lora_transform(
    ...     params, jlora.LoraSpec(rank=2, targets=["w"]), key=jax.random.key(0))
    >>> d = jlora.save_adapter(f"{tempfile.mkdtemp()}/a", trainable, base=frozen)
    >>> jlora.adapter_metadata(d)["base"]["params"]
    [['w', [8, 4], 'float32']]
  """
  path = pathlib.Path(path).absolute()
  _check_dir(path, _ADAPTER_META, "jlora adapter")
  return _read_json(_checkpointer_restore(path), _ADAPTER_META, path, _FORMAT)


# -- training checkpoints ---------------------------------------------------------


class TrainCheckpoint(NamedTuple):
  """What ``CheckpointManager.restore`` returns."""
  step: int
  trainable: Any
  opt_state: Any
  extra: Any


class CheckpointManager:
  """Training checkpoints of an adapter: A, B, extras, optimizer state, step.

  A thin layer over ``orbax.checkpoint.CheckpointManager``: each step is a
  directory ``directory/<step>`` holding the adapter (as ``save_adapter``
  writes it) and the optimizer state, never the base. The last
  ``max_to_keep`` steps are kept. Saves are atomic (an interrupted save
  leaves the previous steps intact and is cleaned up when a manager is next
  created) and, with ``async_save``, written in the background once the
  arrays are on the host. Restoring verifies the base fingerprint and every
  array's checksum, and places the arrays on the shardings of ``base`` and of
  the templates, whatever the sharding they were saved with.

  Args:
    directory: the root directory (created if missing).
    base: the frozen part (or the parameters) being fine-tuned; its
      fingerprint is stored and checked on restore, and its shardings place
      the restored factors.
    spec: the spec, stored with each step.
    max_to_keep: keep the last N steps (None: keep all).
    save_interval_steps: ``save`` writes only at multiples of N unless forced
      (or when JAX has received a preemption notice).
    async_save: write in a background thread (call ``wait_until_finished``
      or ``close``, or use ``with``, before the process ends).

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, optax, jlora
    >>> params = {"w": jnp.ones((8, 4))}
    >>> frozen, trainable = jlora.lora_transform(
    ...     params, jlora.LoraSpec(rank=2, targets=["w"]), key=jax.random.key(0))
    >>> tx = jlora.optimizer(optax.adam(1e-3), trainable)
    >>> opt_state = tx.init(trainable)
    >>> with jlora.CheckpointManager(tempfile.mkdtemp(), base=frozen, max_to_keep=2) as mngr:
    ...   _ = mngr.save(5, trainable, opt_state)
    ...   restored = mngr.restore(opt_state=opt_state)
    >>> restored.step
    5
  """

  def __init__(self, directory: PathLike, *, base: Any, spec: LoraSpec | None = None,
               max_to_keep: int | None = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    if max_to_keep is not None and (isinstance(max_to_keep, bool) or max_to_keep < 1):
      raise LoraCheckpointError(f"max_to_keep must be None or >= 1, got {max_to_keep!r}")
    ocp = _ocp()
    self._directory = pathlib.Path(directory).absolute()
    self._base = base
    self._spec = spec
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        # Orbax's default also saves the first step it sees; every N steps is
        # easier to reason about. A preemption notice still forces a save.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_interval_steps),
            policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=policies.LatestN(n=max_to_keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True)
    self._mngr = ocp.CheckpointManager(self._directory, options=options)

  @property
  def directory(self) -> pathlib.Path:
    return self._directory

  def all_steps(self) -> list[int]:
    """The steps with a complete checkpoint, ascending."""
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_path(self, step: int) -> pathlib.Path:
    """The directory of ``step``: ``load_adapter`` reads the adapter there."""
    ocp = _ocp()
    return pathlib.Path(ocp.step.build_step_path(
        self._directory, ocp.step.standard_name_format(), step))

  def save(self, step: int, trainable: Any, opt_state: Any, *,
           extra: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Saves the adapter and optimizer state at ``step``.

    Args:
      step: the training step (the number of updates applied).
      trainable: the trainable part.
      opt_state: the optimizer state (any pytree of arrays, such as optax's).
      extra: JSON-serialisable metadata saved with the step (e.g. a data
        loader's position), returned by ``restore``.
      force: save even if ``save_interval_steps`` says not to.

    Returns:
      Whether a checkpoint was written (or started, with ``async_save``).
    """
    ocp = _ocp()
    if not force and not self._mngr.should_save(step):
      return False
    arrays, meta = _adapter_payload(trainable, self._spec, self._base)
    opt_arrays, opt_rows = _opt_payload(opt_state)
    try:
      json.dumps(extra)
    except (TypeError, ValueError) as e:
      raise LoraCheckpointError(f"extra must be JSON-serialisable: {e}") from None
    train_meta = {"format": _TRAIN_FORMAT, "version": _VERSION, "step": int(step),
                  "opt_state": opt_rows, "extra": extra}
    items = {_ADAPTER: ocp.args.StandardSave(arrays),
             _ADAPTER_META: ocp.args.JsonSave(meta),
             _TRAIN_META: ocp.args.JsonSave(train_meta)}
    if opt_arrays:  # orbax refuses an empty item (e.g. plain SGD's state)
      items[_OPT] = ocp.args.StandardSave(opt_arrays)
    if step in self._mngr.all_steps():
      raise LoraCheckpointError(f"step {step} already exists in '{self._directory}'")
    return self._mngr.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int | None = None, *, opt_state: Any,
              trainable: Any = None) -> TrainCheckpoint:
    """Restores a step (the latest by default).

    Args:
      step: the step to restore; None for the latest complete one.
      opt_state: a template of the optimizer state (``tx.init(trainable)``,
        or abstract leaves from ``jax.eval_shape``): its structure, and its
        leaves' shardings if they have any, are those of the restored state.
      trainable: optional template of the trainable part, whose shardings
        override those derived from ``base``.

    Returns:
      ``TrainCheckpoint(step, trainable, opt_state, extra)``.

    Raises:
      LoraCheckpointError: no checkpoint, a step that does not exist, a
        different base or optimizer structure, or an unreadable or corrupted
        checkpoint (the message names its directory).
    """
    self._mngr.wait_until_finished()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise LoraCheckpointError(f"no complete checkpoint in '{self._directory}'")
      step = steps[-1]
    elif step not in steps:
      raise LoraCheckpointError(
          f"no checkpoint for step {step} in '{self._directory}' (steps: {steps})")
    path = self.step_path(step)
    restore = lambda args: self._mngr.restore(step, args=args)
    meta = _read_json(restore, _ADAPTER_META, path, _FORMAT)
    train_meta = _read_json(restore, _TRAIN_META, path, _TRAIN_FORMAT)
    restored_trainable = _load_trainable(restore, meta, self._base, path, template=trainable)
    restored_opt = _load_opt_state(restore, train_meta, opt_state, path)
    return TrainCheckpoint(int(train_meta["step"]), restored_trainable, restored_opt,
                           train_meta.get("extra"))

  def wait_until_finished(self) -> None:
    """Blocks until a background save has been written."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _load_opt_state(restore: RestoreFn, train_meta: dict[str, Any], template: Any,
                    path: pathlib.Path) -> Any:
  pairs, treedef = jax.tree_util.tree_flatten_with_path(template)
  stored = train_meta["opt_state"]
  where = f"checkpoint '{path}'"
  for i, (kp, leaf) in enumerate(pairs):
    name = jax.tree_util.keystr(kp)
    if i >= len(stored):
      raise LoraCheckpointError(
          f"{where}: the optimizer state template has leaf opt_state{name} that the "
          f"checkpoint lacks (it stored {len(stored)} leaves)")
    row = stored[i]
    got = (_shape(leaf), _dtype_name(leaf))
    if row["path"] != name or got != (row["shape"], row["dtype"]):
      raise LoraCheckpointError(
          f"{where}: optimizer state mismatch at opt_state{row['path']}: stored "
          f"{_describe(row['shape'], row['dtype'])}, template has opt_state{name} "
          f"with {_describe(*got)}; use the same optimizer as when saving")
  if len(stored) > len(pairs):
    raise LoraCheckpointError(
        f"{where}: the checkpoint's optimizer state has {len(stored)} leaves, the "
        f"template {len(pairs)} (first missing: opt_state{stored[len(pairs)]['path']})")
  if not pairs:
    return treedef.unflatten([])
  targets = {f"o{i}": (row, _sharding_of(leaf), f"opt_state{row['path']}")
             for i, (row, (_, leaf)) in enumerate(zip(stored, pairs))}
  arrays = _restore_arrays(restore, _OPT, path, targets)
  return treedef.unflatten([arrays[f"o{i}"] for i in range(len(pairs))])
