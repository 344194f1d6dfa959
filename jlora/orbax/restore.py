"""Restoring an adapter's trainable tree and a training step's optimizer state."""

from __future__ import annotations

import math
import pathlib
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jlora import _compat
from jlora.errors import LoraCheckpointError, LoraTreeError
from jlora._paths import flatten_with_paths
from jlora.adapters.adapter import is_adapter
from jlora.adapters.inits import is_base_changing
from jlora.spec import LoraSpec
from jlora.orbax import arrays, encoding, fingerprint, names, validation


def mismatch(meta: dict[str, Any], spec: LoraSpec, selection: bool = True) -> str | None:
  """How the stored LoRA metadata differs from what ``spec`` gives (the first
  difference, naming the parameter), or None if every entry follows from it.
  ``selection``: also check that the spec's selectors pick the stored paths
  (not for callable selectors, which need the leaves).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jlora.orbax import payload
    >>> spec = jlora.LoraSpec(rank=2, alpha=4, targets=["w"])
    >>> frozen, t = jlora.lora_transform({"w": jnp.ones((8, 4))}, spec, key=jax.random.key(0))
    >>> _, meta = payload.adapter_payload(t, spec, frozen)
    >>> mismatch(meta, spec) is None
    True
    >>> mismatch(meta, jlora.LoraSpec(rank=2, alpha=8, targets=["w"]))
    "'w': rank 2, scale 2.0, dropout 0.0 stored; the spec gives rank 2, scale 4.0, dropout 0.0"
  """
  for e in meta["entries"]:
    path = e["path"]
    if e["kind"] == "extra":
      if selection and not spec.is_extra_trainable(path, None):
        return f"'{path}' is trained in full, but the spec's extra_trainable does not select it"
      continue
    if selection and not spec.is_target(path, None):
      return f"'{path}' has LoRA factors, but the spec's targets do not select it"
    if e["kind"] == "bank":
      return f"'{path}' holds a bank of adapters; a spec describes one adapter"
    if (e["kind"] == "dora") != spec.use_dora:
      return (f"'{path}': a {e['kind']!r} adapter stored; the spec gives "
              f"use_dora={spec.use_dora}")
    static = {k: encoding.decode(v) for k, v in e["static"].items()}
    residual = spec.init if is_base_changing(spec.init) else None
    if static.get("residual") != residual:
      return (f"'{path}': an adapter made with init={static.get('residual') or 'default'!r} "
              f"stored; the spec gives init={spec.init!r}")
    rank = e["arrays"]["a"]["shape"][-1]
    want = (spec.rank_for(path), spec.scale_for(path), float(spec.dropout))
    got = (rank, static.get("scale"), static.get("dropout"))
    if (want[0] != got[0] or not isinstance(got[1], (int, float))
        or not math.isclose(want[1], got[1], rel_tol=1e-9) or want[2] != got[2]):
      return (f"'{path}': rank {got[0]}, scale {got[1]}, dropout {got[2]} stored; the spec "
              f"gives rank {want[0]}, scale {want[1]}, dropout {want[2]}")
    override = spec.layout_override(path)
    if override is not None and override != static.get("layout"):
      return f"'{path}': layout {static.get('layout')} stored; the spec gives {override}"
  return None


def restore_trainable(restore: validation.RestoreFn, meta: dict[str, Any], base: Any,
                      path: pathlib.Path, template: Any = None,
                      spec: LoraSpec | None = None) -> Any:
  """The trainable tree of an adapter, checked against ``base``, placed on the
  shardings derived from it (or from ``template``). ``spec``, the stored
  spec, must agree with every stored scale, rank and dropout."""
  if spec is not None:
    problem = mismatch(meta, spec)
    if problem is not None:
      raise LoraCheckpointError(f"checkpoint '{path}': its metadata contradicts its own spec: "
                                f"{problem}; the metadata was edited or damaged")
  b_pairs, b_def = flatten_with_paths(base)
  fingerprint.check_base(meta, b_pairs, f"checkpoint '{path}'")
  index = {p: i for i, (p, _) in enumerate(b_pairs)}
  t_leaves = None
  if template is not None:
    t_pairs, t_def = flatten_with_paths(template, is_leaf=is_adapter)
    if t_def != b_def:
      raise LoraTreeError("restore: the trainable template does not have the base's structure")
    t_leaves = [leaf for _, leaf in t_pairs]
  # Extra leaves have no W0 in a frozen base: replicate them on the base's mesh.
  meshes = [sh.mesh for _, leaf in b_pairs
            if isinstance(sh := arrays.sharding_of(leaf), NamedSharding)]
  extra_default = NamedSharding(meshes[0], PartitionSpec()) if meshes else None
  targets = {}
  for e in meta["entries"]:
    i = index[e["path"]]
    w0 = b_pairs[i][1]
    tmpl = None if t_leaves is None else t_leaves[i]
    if e["kind"] != "extra":
      cls = encoding.adapter_class(e["kind"])
      check_residual(e, w0, path)
      layout = encoding.decode(e["static"]["layout"])
      default = arrays.load_shardings(w0, cls.array_axes(layout))
      for name, info in e["arrays"].items():
        if info is None:
          continue
        sharding = default.get(name)
        if is_adapter(tmpl) and arrays.sharding_of(getattr(tmpl, name, None)) is not None:
          sharding = arrays.sharding_of(getattr(tmpl, name))
        targets[f"{e['key']}_{name}"] = (info, sharding, f"'{e['path']}' {name}")
    else:
      sharding = arrays.sharding_of(tmpl) if tmpl is not None else None
      if sharding is None and w0 is not None:
        sharding = arrays.sharding_of(w0)
      if sharding is None:
        sharding = extra_default
      targets[f"{e['key']}_value"] = (e["arrays"]["value"], sharding, f"'{e['path']}'")
  restored = arrays.restore_arrays(restore, names.ADAPTER, path, targets)
  leaves: list[Any] = [None] * len(b_pairs)
  for e in meta["entries"]:
    i = index[e["path"]]
    if e["kind"] != "extra":
      cls = encoding.adapter_class(e["kind"])
      fields = {name: (None if info is None else restored[f"{e['key']}_{name}"])
                for name, info in e["arrays"].items()}
      fields.update({name: encoding.decode(v) for name, v in e["static"].items()})
      try:
        leaves[i] = cls(**fields)
      except TypeError as err:
        raise LoraCheckpointError(
            f"checkpoint '{path}': '{e['path']}' has {e['kind']!r} adapter fields this jlora "
            f"does not know ({err})") from err
    else:
      leaves[i] = restored[f"{e['key']}_value"]
  trainable = b_def.unflatten(leaves)
  if template is not None and (jax.tree_util.tree_structure(trainable)
                               != jax.tree_util.tree_structure(template)):
    raise LoraTreeError(
        "restore: the trainable template's structure (or LoRA scale/layout/dropout) differs "
        "from the checkpoint's")
  return trainable


def check_residual(entry: dict[str, Any], w0: Any, path: pathlib.Path) -> None:
  """An adapter made by a base-changing init (PiSSA, OLoRA) is relative to the
  residual W0 it was saved with: a base whose W0 differs there (the original
  weights, say) is refused. Checked where ``base`` holds the arrays (an
  abstract base has no values to check)."""
  want = entry.get("residual_sha256")
  leaves = jax.tree_util.tree_leaves(w0)
  if want is None or not leaves or any(
      isinstance(x, jax.ShapeDtypeStruct) or not hasattr(x, "dtype") or _compat.is_tracer(x)
      for x in leaves):
    return
  got = arrays.weight_sha256(w0)
  if got is not None and got != want:
    init = encoding.decode(entry["static"].get("residual"))
    raise LoraCheckpointError(
        f"checkpoint '{path}': '{entry['path']}' was made with init={init!r}, so it is "
        f"relative to the residual W0 that lora_transform returned in frozen (sha256 "
        f"{want[:12]}...), and this base holds other values there (sha256 {got[:12]}...: "
        f"perhaps the original weights). Load it with the residual base it was trained "
        f"against (save that with jlora.base.save), or save "
        f"jlora.relative_to_original(trainable, initial) for the original weights")


def restore_opt_state(restore: validation.RestoreFn, train_meta: dict[str, Any], template: Any,
                      path: pathlib.Path) -> Any:
  """The optimizer state of a training step, in ``template``'s structure and shardings."""
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
    got = (arrays.shape(leaf), arrays.dtype_name(leaf))
    if row["path"] != name or got != (row["shape"], row["dtype"]):
      raise LoraCheckpointError(
          f"{where}: optimizer state mismatch at opt_state{row['path']}: stored "
          f"{arrays.describe(row['shape'], row['dtype'])}, template has opt_state{name} "
          f"with {arrays.describe(*got)}; use the same optimizer as when saving")
  if len(stored) > len(pairs):
    raise LoraCheckpointError(
        f"{where}: the checkpoint's optimizer state has {len(stored)} leaves, the "
        f"template {len(pairs)} (first missing: opt_state{stored[len(pairs)]['path']})")
  if not pairs:
    return treedef.unflatten([])
  targets = {f"o{i}": (row, arrays.sharding_of(leaf), f"opt_state{row['path']}")
             for i, (row, (_, leaf)) in enumerate(zip(stored, pairs))}
  restored = arrays.restore_arrays(restore, names.OPT, path, targets)
  return treedef.unflatten([restored[f"o{i}"] for i in range(len(pairs))])
