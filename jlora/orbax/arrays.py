"""Arrays in orbax checkpoints: descriptions, checksums, shardings, restore.

Every array jlora saves is described by its shape, dtype and the SHA-256 of
its bytes; ``restore_arrays`` reads arrays back onto the wanted shardings
and checks each against its description.

Example:
  >>> import numpy as np
  >>> info = array_info(np.arange(6, dtype=np.float32).reshape(2, 3))
  >>> info["shape"], info["dtype"], len(info["sha256"])
  ([2, 3], 'float32', 64)
  >>> describe([2, 3], "float32")
  'shape (2, 3) dtype float32'
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding

from jlora import _compat
from jlora.errors import LoraCheckpointError
from jlora.sharding import array_sharding, leaf_sharding
from jlora.orbax import names, validation

def dtype_name(x: Any) -> str:
  return jnp.dtype(x.dtype).name if hasattr(x, "dtype") else np.asarray(x).dtype.name


def shape(x: Any) -> list[int]:
  return [int(d) for d in (x.shape if hasattr(x, "shape") else np.shape(x))]


def sha256(x: Any) -> str | None:
  """SHA-256 of an array's bytes (C order); None when this process cannot see
  all of it (a multi-host array)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  host = np.ascontiguousarray(np.asarray(x)).reshape(-1)
  return hashlib.sha256(host.view(np.uint8).data).hexdigest()


def weight_sha256(w: Any) -> str | None:
  """SHA-256 of a frozen weight's values: an array's bytes, or for a weight
  node (an ``NF4Array``) every array it holds, in order; None when this
  process cannot see all of it.

  Example:
    >>> import numpy as np
    >>> weight_sha256(np.zeros(2, np.float32)) == sha256(np.zeros(2, np.float32))
    True
  """
  from jlora._paths import is_weight_node
  if not is_weight_node(w):
    return sha256(w)
  parts = [sha256(leaf) for leaf in jax.tree_util.tree_leaves(w)]
  if any(p is None for p in parts):
    return None
  return hashlib.sha256("".join(parts).encode()).hexdigest()


def array_info(x: Any) -> dict[str, Any]:
  return {"shape": shape(x), "dtype": dtype_name(x), "sha256": sha256(x)}


def check_concrete(path: str, x: Any) -> None:
  if isinstance(x, jax.ShapeDtypeStruct) or _compat.is_tracer(x):
    raise LoraCheckpointError(
        f"'{path}': cannot save an abstract or traced value ({type(x).__name__}); "
        f"pass concrete arrays")
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise LoraCheckpointError(f"'{path}': expected an array, got {type(x).__name__}")


def default_sharding() -> jax.sharding.Sharding:
  """This process's first device (with several processes, jax.devices()[0]
  belongs to process 0)."""
  return SingleDeviceSharding(jax.local_devices()[0])


def describe(shape: Any, dtype: Any) -> str:
  """``"shape (8, 4) dtype float32"``, or ``"None"`` for a missing leaf."""
  return "None" if shape is None else f"shape {tuple(shape)} dtype {dtype}"


def sharding_of(x: Any) -> jax.sharding.Sharding | None:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x.sharding if isinstance(x.sharding, jax.sharding.Sharding) else None
  if isinstance(x, jax.Array):
    return leaf_sharding(x)
  return None



def restore_arrays(restore: validation.RestoreFn, item: str, path: pathlib.Path,
                   targets: dict[str, tuple[dict[str, Any], Any, str]]) -> dict[str, jax.Array]:
  """Restores ``{key: (info, sharding, name)}`` and verifies every checksum."""
  ocp = names.ocp()
  abstract = {key: jax.ShapeDtypeStruct(tuple(info["shape"]), jnp.dtype(info["dtype"]),
                                        sharding=sharding or default_sharding())
              for key, (info, sharding, _) in targets.items()}
  try:
    out = restore(ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))[item]
  except Exception as e:  # anything orbax raises means an unreadable checkpoint
    raise LoraCheckpointError(
        f"checkpoint '{path}': cannot read the arrays in '{item}/' ({type(e).__name__}: "
        f"{e}); the checkpoint is incomplete or corrupted") from e
  for key, (info, _, name) in targets.items():
    arr = out.get(key) if isinstance(out, Mapping) else None
    if arr is None or shape(arr) != info["shape"] or dtype_name(arr) != info["dtype"]:
      raise LoraCheckpointError(
          f"checkpoint '{path}': {name} in '{item}/' is missing or has the wrong "
          f"shape/dtype (expected {describe(info['shape'], info['dtype'])})")
    if info.get("sha256") is not None:
      got = sha256(arr)
      if got is not None and got != info["sha256"]:
        raise LoraCheckpointError(
            f"checkpoint '{path}': {name} in '{item}/' fails its checksum (stored "
            f"sha256 {info['sha256'][:12]}..., read {got[:12]}...); the checkpoint is "
            f"corrupted")
  return out


def load_shardings(w0: Any, axes: dict[str, tuple[int | None, ...]]) -> dict[str, Any]:
  """name -> the sharding of each adapter array, derived from W0's (``axes``:
  the weight axis each array axis follows, from ``Adapter.array_axes``)."""
  sharding = sharding_of(w0)
  if isinstance(sharding, NamedSharding):
    return {name: array_sharding(sharding, ax, len(w0.shape)) for name, ax in axes.items()}
  if isinstance(sharding, SingleDeviceSharding):
    return {name: sharding for name in axes}
  return {name: None for name in axes}
