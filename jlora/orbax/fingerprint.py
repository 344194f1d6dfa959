"""The base fingerprint: every parameter's path, shape and dtype, and their hash."""

from __future__ import annotations

import collections
import hashlib
import json
from typing import Any, Mapping

from jlora.errors import LoraCheckpointError
from jlora.orbax import arrays


def rows(base_pairs: list[tuple[str, Any]], skip: set[str]) -> list[list[Any]]:
  """[path, shape, dtype] of every base parameter but those in ``skip``."""
  out = []
  for path, leaf in base_pairs:
    if path in skip:
      continue  # extra trainable leaves live in the adapter (None in frozen)
    if leaf is None:
      out.append([path, None, None])
    else:
      out.append([path, arrays.shape(leaf), arrays.dtype_name(leaf)])
  return out


def hash_rows(rows: list[list[Any]]) -> str:
  """SHA-256 of the fingerprint rows as compact JSON."""
  return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def check_base(meta: Mapping[str, Any], base_pairs: list[tuple[str, Any]], where: str) -> None:
  """Raises LoraCheckpointError naming the first parameter in which ``base``
  differs from the base the adapter was made for."""
  extras = {e["path"]: e for e in meta["entries"] if e["kind"] == "extra"}
  stored = meta["base"]["params"]
  got = rows(base_pairs, set(extras))
  if hash_rows(got) != meta["base"]["sha256"] or got != stored:
    got_by_path = {row[0]: row for row in got}
    stored_paths = {row[0] for row in stored}
    for path, shape, dtype in stored:
      if path not in got_by_path:
        raise LoraCheckpointError(
            f"{where}: the adapter was made for a base with '{path}' "
            f"({arrays.describe(shape, dtype)}), which this base lacks")
      _, gshape, gdtype = got_by_path[path]
      if (gshape, gdtype) != (shape, dtype):
        raise LoraCheckpointError(
            f"{where}: the adapter was made for another base: '{path}' expected "
            f"{arrays.describe(shape, dtype)}, got {arrays.describe(gshape, gdtype)}")
    for path, shape, dtype in got:
      if path not in stored_paths:
        raise LoraCheckpointError(
            f"{where}: this base has '{path}' ({arrays.describe(shape, dtype)}), which the "
            f"base the adapter was made for lacks")
    raise LoraCheckpointError(
        f"{where}: the base has the adapter's parameters in another order "
        f"(a different tree structure)")
  base = dict(base_pairs)
  for path, e in extras.items():
    if path not in base:
      raise LoraCheckpointError(f"{where}: extra trainable '{path}' has no place in this base")
    leaf, info = base[path], e["arrays"]["value"]
    got = (arrays.shape(leaf), arrays.dtype_name(leaf)) if leaf is not None else None
    if got is not None and got != (info["shape"], info["dtype"]):
      raise LoraCheckpointError(
          f"{where}: the adapter was made for another base: '{path}' expected "
          f"{arrays.describe(info['shape'], info['dtype'])}, got {arrays.describe(*got)}")


def extras(meta: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """path -> array info of the weights an adapter trains in full."""
  return {e["path"]: e["arrays"]["value"] for e in meta["entries"] if e["kind"] == "extra"}


def abstract_base(meta: Mapping[str, Any]) -> collections.OrderedDict:
  """The base an adapter was made for, rebuilt from its fingerprint as
  ``jax.ShapeDtypeStruct`` leaves (path -> leaf, in the tree's order).

  Example:
    >>> meta = {"base": {"params": [["w", [8, 4], "float32"], ["b", None, None]]},
    ...         "entries": []}
    >>> list(abstract_base(meta).items())
    [('w', ShapeDtypeStruct(shape=(8, 4), dtype=float32)), ('b', None)]
  """
  import jax
  import jax.numpy as jnp
  base = collections.OrderedDict()
  for p, shape, dtype in meta["base"]["params"]:
    base[p] = None if shape is None else jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
  for p, info in extras(meta).items():
    base[p] = jax.ShapeDtypeStruct(tuple(info["shape"]), jnp.dtype(info["dtype"]))
  return base


def in_adapter_order(base: Mapping[str, Any], meta: Mapping[str, Any]
                     ) -> collections.OrderedDict:
  """``base`` (path -> leaf) in the leaf order of the tree the adapter was saved with.

  A file does not keep a tree's structure, only its paths; the adapter's
  fingerprint lists them in the original order, so the check against it
  compares paths, shapes and dtypes, not an accident of ordering. Paths the
  fingerprint lacks come last (the check then names them).

  Example:
    >>> meta = {"base": {"params": [["b", [2], "float32"], ["a", [3], "float32"]]},
    ...         "entries": []}
    >>> list(in_adapter_order({"a": 1, "b": 2, "c": 3}, meta))
    ['b', 'a', 'c']
  """
  out = collections.OrderedDict()
  for p, shape, _ in meta["base"]["params"]:
    if p in base:
      out[p] = base[p]
    elif shape is None:
      out[p] = None
  for p in extras(meta):
    if p in base:
      out[p] = base[p]
  for p, leaf in base.items():
    if p not in out:
      out[p] = leaf
  return out
