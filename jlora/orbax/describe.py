"""What a jlora orbax adapter holds, as a dict (``jlora.orbax.describe``)."""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jlora._paths import flatten_with_paths
from jlora.layout import Layout
from jlora.adapters.adapter import is_adapter
from jlora.adapters.bank import LoraBank
from jlora.spec import LoraSpec
from jlora.orbax import adapter, fingerprint


def jsonable(value: Any) -> Any:
  """A spec field (layouts, dtypes, selectors) as JSON-able data."""
  if isinstance(value, Layout):
    return {"in_axes": list(value.in_axes), "out_axes": list(value.out_axes),
            "stack_axes": list(value.stack_axes)}
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, (np.dtype, type)):
    try:
      return jnp.dtype(value).name
    except TypeError:
      pass
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if callable(value):
    return f"<callable {getattr(value, '__qualname__', repr(value))}>"
  return repr(value)


def spec_dict(spec: LoraSpec | None) -> dict[str, Any] | None:
  """A LoraSpec as JSON-able data (None stays None)."""
  if spec is None:
    return None
  return {"rank": spec.rank, "alpha": spec.alpha, "use_rslora": spec.use_rslora,
          "targets": jsonable(spec.targets), "exclude": jsonable(spec.exclude),
          "rank_pattern": jsonable(dict(spec.rank_pattern)),
          "alpha_pattern": jsonable(dict(spec.alpha_pattern)),
          "dropout": spec.dropout, "init": spec.init, "dtype": jsonable(spec.dtype),
          "extra_trainable": jsonable(spec.extra_trainable),
          "layouts": jsonable(dict(spec.layouts))}


def _nbytes(shape, dtype: Any) -> int:
  return int(math.prod(shape)) * jnp.dtype(dtype).itemsize


def describe(path: str | os.PathLike) -> dict[str, Any]:
  """Describes a jlora orbax adapter (or a ``CheckpointManager`` step).

  Every array is read and its checksum verified; no base is needed (the
  adapter's fingerprint stands in for it).

  Args:
    path: the adapter directory.

  Returns:
    A JSON-able dict: ``format`` ("jlora"), ``spec``, ``targets`` (per
    adapted weight: kind, rank, scale, shapes, dtypes, layout, dropout; a
    DoRA adapter's magnitude shape; a bank's adapters, ranks and scales;
    the init an adapter's residual base came from),
    ``extra_trainable``, ``trainable_params``, ``bytes``, ``checksums`` and
    ``base`` (the fingerprint's hash, parameter and element counts) and
    ``adapters`` (for banks: each adapter's name, how many weights it
    adapts, its ranks and scales; empty otherwise).

  Raises:
    LoraCheckpointError: not an adapter, or unreadable or corrupted.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"w": jnp.ones((8, 4))}
    >>> spec = jlora.LoraSpec(rank=2, targets=["w"])
    >>> frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
    >>> d = jlora.orbax.save(f"{tempfile.mkdtemp()}/a", trainable, spec, base=frozen)
    >>> info = jlora.orbax.describe(d)
    >>> info["targets"][0]["path"], info["targets"][0]["rank"], info["checksums"]
    ('w', 2, 'ok')
  """
  meta = adapter.metadata(path)
  trainable, spec = adapter.load(path, base=fingerprint.abstract_base(meta))
  pairs = dict(flatten_with_paths(trainable, is_leaf=is_adapter)[0])
  bank: dict[str, dict[str, Any]] = {}
  base_rows = {p: (shape, dtype) for p, shape, dtype in meta["base"]["params"]}
  targets, extras, count, nbytes = [], [], 0, 0
  for e in meta["entries"]:
    infos = {k: v for k, v in e["arrays"].items() if v is not None}
    for info in infos.values():
      count += int(math.prod(info["shape"]))
      nbytes += _nbytes(info["shape"], info["dtype"])
    if e["kind"] != "extra":
      lp = pairs[e["path"]]
      shape, dtype = base_rows[e["path"]]
      row = {"path": e["path"], "kind": e["kind"], "rank": int(lp.a.shape[-1]),
             "scale": None if isinstance(lp, LoraBank) else float(lp.scale),
             "shape": list(shape), "dtype": dtype,
             "a_shape": infos["a"]["shape"], "b_shape": infos["b"]["shape"],
             "factor_dtype": infos["a"]["dtype"], "layout": jsonable(lp.layout),
             "dropout": float(lp.dropout)}
      if "magnitude" in infos:
        row["magnitude_shape"] = infos["magnitude"]["shape"]
      if getattr(lp, "residual", None) is not None:
        row["residual"] = lp.residual
      if isinstance(lp, LoraBank):
        row.update(adapters=list(lp.names), ranks=list(lp.ranks), scales=list(lp.scales))
        for name, r, sc in zip(lp.names, lp.ranks, lp.scales):
          bank.setdefault(name, {"name": name, "targets": 0, "ranks": set(), "scales": set()})
          if r:
            bank[name]["targets"] += 1
            bank[name]["ranks"].add(int(r))
            bank[name]["scales"].add(float(sc))
      targets.append(row)
    else:
      extras.append({"path": e["path"], "shape": infos["value"]["shape"],
                     "dtype": infos["value"]["dtype"]})
  # The fingerprint leaves out the weights the adapter trains in full; the
  # base still has them.
  shapes = [s for _, s, _ in meta["base"]["params"] if s is not None]
  shapes += [e["shape"] for e in extras]
  base = {"sha256": meta["base"]["sha256"], "params": len(shapes),
          "elements": int(sum(math.prod(s) for s in shapes))}
  notes = list((meta.get("spec") or {}).get("notes") or [])
  return {"path": str(pathlib.Path(path).absolute()), "format": "jlora",
          "format_detail": f"jlora orbax adapter ({meta['format']} v{meta['version']}, "
                           f"written by jlora {meta.get('jlora_version', '?')})",
          "spec": spec_dict(spec), "spec_notes": notes, "targets": targets,
          "extra_trainable": extras, "trainable_params": count, "bytes": nbytes,
          "checksums": "ok", "base": base,
          "adapters": [{**b, "ranks": sorted(b["ranks"]), "scales": sorted(b["scales"])}
                       for b in bank.values()]}
