"""What a save writes: the arrays and the JSON metadata of an adapter and an optimizer state.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> spec = jlora.LoraSpec(rank=2, targets=["w"])
  >>> frozen, t = jlora.lora_transform({"w": jnp.ones((8, 4))}, spec, key=jax.random.key(0))
  >>> saved, meta = adapter_payload(t, spec, frozen)
  >>> sorted(saved), meta["entries"][0]["static"]["scale"], meta["base"]["params"]
  (['p0_a', 'p0_b'], 8.0, [['w', [8, 4], 'float32']])
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jlora.errors import LoraCheckpointError, LoraSpecError, LoraTreeError
from jlora._paths import flatten_with_paths
from jlora.adapters.adapter import Adapter, is_adapter
from jlora.adapters.bank import LoraBank
from jlora.adapters.dora import DoraParam
from jlora.spec import LoraSpec
from jlora.adapters.inits import is_base_changing
from jlora.transform import check_factors
from jlora.orbax import arrays, encoding, fingerprint, names


def adapter_payload(trainable: Any, spec: LoraSpec | None, base: Any,
                    residual_sums: dict[str, str | None] | None = None
                    ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """The arrays and JSON metadata that store ``trainable``.

  Any kind of adapter is stored the same way: its arrays (the dataclass's
  non-static fields) as arrays, its static fields as JSON, under its kind's
  name. An adapter made by a base-changing init (``residual`` set) also
  records the SHA-256 of its W0 in ``base``, the residual it is relative to
  (``residual_sums`` caches them by path across saves)."""
  t_pairs, t_def = flatten_with_paths(trainable, is_leaf=is_adapter)
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
  out: dict[str, jax.Array] = {}
  entries: list[dict[str, Any]] = []
  extra_paths = []
  for (path, t), (_, w0) in zip(t_pairs, b_pairs):
    if t is None:
      continue
    key = f"p{len(entries)}"
    if is_adapter(t):
      if w0 is None:
        raise LoraTreeError(f"'{path}' has LoRA factors in trainable but no W0 in base")
      check_factors(path, w0, t)
      if spec is not None:
        check_spec_fits(spec, path, t)
      infos = {}
      for name in encoding.array_fields(type(t)):
        value = getattr(t, name)
        if value is None:
          infos[name] = None
          continue
        arrays.check_concrete(f"{path}:{name}", value)
        out[f"{key}_{name}"] = value
        infos[name] = arrays.array_info(value)
      entry = {"path": path, "kind": t.kind, "key": key, "arrays": infos,
               "static": encoding.encode_static(t, path)}
      if getattr(t, "residual", None) is not None:
        entry["residual_sha256"] = _residual_sum(path, w0, t, residual_sums)
      entries.append(entry)
    else:
      arrays.check_concrete(path, t)
      got = (arrays.shape(t), arrays.dtype_name(t))
      if w0 is not None and (arrays.shape(w0), arrays.dtype_name(w0)) != got:
        raise LoraTreeError(
            f"'{path}': trainable leaf ({arrays.describe(*got)}) does not match the base's "
            f"({arrays.describe(arrays.shape(w0), arrays.dtype_name(w0))})")
      out[f"{key}_value"] = t
      entries.append({"path": path, "kind": "extra", "key": key,
                      "arrays": {"value": arrays.array_info(t)}})
      extra_paths.append(path)
  if not out:
    raise LoraCheckpointError("trainable holds no arrays; nothing to save")
  if spec is not None:
    check_spec_selects(spec, t_pairs, b_pairs)
  rows = fingerprint.rows(b_pairs, set(extra_paths))
  import jlora  # the version, for the record
  meta = {
      "format": names.FORMAT,
      "version": names.VERSION,
      "jlora_version": jlora.__version__,
      "spec": None if spec is None else encoding.encode_spec(spec),
      "entries": entries,
      "adapter_bytes": int(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
                               for a in out.values())),
      "base": {"sha256": fingerprint.hash_rows(rows), "params": rows},
  }
  return out, meta


def _residual_sum(path: str, w0: Any, t: Adapter, cache: dict[str, str | None] | None
                  ) -> str | None:
  """SHA-256 of the residual W0 an adapter is relative to (None when this
  process cannot see all of it: a multi-host array)."""
  if cache is not None and path in cache:
    return cache[path]
  leaves = jax.tree_util.tree_leaves(w0)       # an array, or a weight node's (NF4) arrays
  if not leaves or any(isinstance(x, jax.ShapeDtypeStruct) or not hasattr(x, "dtype")
                       for x in leaves):
    raise LoraCheckpointError(
        f"'{path}' was made with init={t.residual!r}, so it is relative to the residual W0 "
        f"lora_transform returned in frozen; pass that frozen tree (with its arrays) as "
        f"base= so that its checksum is recorded and no other base is ever used with it")
  for x in leaves:
    arrays.check_concrete(path, x)
  digest = arrays.weight_sha256(w0)
  if cache is not None:
    cache[path] = digest
  return digest


def check_spec_fits(spec: LoraSpec, path: str, lp: Adapter) -> None:
  if isinstance(lp, LoraBank):
    raise LoraSpecError(f"'{path}' is a bank of adapters, each with its own spec; save a bank "
                        f"with spec=None")
  if spec.use_dora != isinstance(lp, DoraParam):
    raise LoraSpecError(
        f"'{path}': the spec has use_dora={spec.use_dora} but the trainable leaf is a "
        f"{type(lp).__name__}; pass the spec that made it (or spec=None)")
  residual = getattr(lp, "residual", None)
  if residual != (spec.init if is_base_changing(spec.init) else None):
    raise LoraSpecError(
        f"'{path}': the spec has init={spec.init!r} but the factors were made "
        f"{'with init=' + repr(residual) if residual else 'relative to the original W0'}; "
        f"pass the spec that made them (or spec=None)")
  rank, scale = lp.a.shape[-1], spec.scale_for(path)
  if spec.rank_for(path) != rank or not math.isclose(scale, lp.scale, rel_tol=1e-12):
    raise LoraSpecError(
        f"'{path}': the spec gives rank {spec.rank_for(path)} and scale {scale} but the "
        f"trainable factors have rank {rank} and scale {lp.scale}; pass the spec that "
        f"made them (or spec=None)")


def check_spec_selects(spec: LoraSpec, t_pairs, b_pairs) -> None:
  """The spec's targets must select exactly the adapted paths, and its
  extra_trainable exactly the weights trained in full, so that the stored
  spec describes the stored adapter."""
  for (path, t), (_, w0) in zip(t_pairs, b_pairs):
    leaf = w0 if w0 is not None else t
    if leaf is None:
      continue
    adapted, full = is_adapter(t), t is not None and not is_adapter(t)
    if spec.is_target(path, leaf) != adapted:
      if adapted:
        raise LoraSpecError(f"'{path}' has LoRA factors but the spec's targets "
                            f"{spec.targets!r} do not select it; pass the spec that made "
                            f"them (or spec=None)")
      raise LoraSpecError(f"the spec's targets {spec.targets!r} select '{path}', which has no "
                          f"LoRA factors in trainable; pass the spec that made them (or "
                          f"spec=None)")
    if spec.is_extra_trainable(path, leaf) != full:
      if full:
        raise LoraSpecError(f"'{path}' is trained in full but the spec's extra_trainable "
                            f"{spec.extra_trainable!r} does not select it; pass the spec that "
                            f"made the trainable tree (or spec=None)")
      raise LoraSpecError(f"the spec's extra_trainable {spec.extra_trainable!r} selects "
                          f"'{path}', which is not in trainable; pass the spec that made the "
                          f"trainable tree (or spec=None)")


def opt_payload(opt_state: Any) -> tuple[dict[str, jax.Array], list[dict[str, Any]]]:
  leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
  out, rows = {}, []
  for i, (kp, leaf) in enumerate(leaves):
    path = jax.tree_util.keystr(kp)
    if not hasattr(leaf, "dtype"):
      leaf = jnp.asarray(leaf)
    arrays.check_concrete(f"opt_state{path}", leaf)
    out[f"o{i}"] = leaf
    rows.append({"path": path, **arrays.array_info(leaf)})
  return out, rows
