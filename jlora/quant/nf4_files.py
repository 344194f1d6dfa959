"""NF4 weights in files: the arrays of an ``NF4Array`` and the metadata beside them.

``jlora.base`` files store each array of an ``NF4Array`` under its own key,
with ``file_metadata`` in the file's JSON; ``from_file`` rebuilds and checks
one. ``jlora.bnb`` reads and writes the same arrays under bitsandbytes' names
(its quant-state key is recognised here, so that ``jlora.base`` can say a file
is a bitsandbytes checkpoint without importing ``jlora.bnb``).
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from jlora.errors import LoraSpecError
from jlora.layout import Layout
from jlora.quant.nf4 import PARTS, NF4Array, check_block_size, part_specs

def file_metadata(q: NF4Array) -> dict[str, Any]:
  """What a file keeps beside an ``NF4Array``'s arrays (with the weight's own
  shape and dtype): JSON-ready."""
  lay = q.layout
  return {"quant": "nf4", "block_size": int(q.block_size), "double_quant": q.double_quant,
          "layout": {"in_axes": list(lay.in_axes), "out_axes": list(lay.out_axes),
                     "stack_axes": list(lay.stack_axes)}}


def layout_of(meta: Any) -> Layout:
  """The ``Layout`` that ``file_metadata`` recorded."""
  lay = meta["layout"]
  return Layout(lay["in_axes"], lay["out_axes"], lay["stack_axes"])


def from_file(parts: dict[str, Any], shape, dtype: str, meta: Any, where: str,
              error: type[Exception] = LoraSpecError) -> NF4Array:
  """The ``NF4Array`` of arrays read from a file, checked against the metadata
  that ``file_metadata`` wrote: anything that does not fit raises ``error``
  (one line, starting with ``where``)."""
  try:
    if not isinstance(meta, dict) or meta.get("quant") != "nf4":
      raise ValueError(f"quantization {meta.get('quant') if isinstance(meta, dict) else meta!r}"
                       f" is not 'nf4'")
    block_size, dq = check_block_size(meta["block_size"]), meta["double_quant"]
    if not isinstance(dq, bool):
      raise ValueError(f"double_quant {dq!r} is not a bool")
    layout = layout_of(meta)
    shape = tuple(int(d) for d in shape)
    layout.check(shape, where)
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
      raise ValueError(f"dtype {dtype} is not a floating-point type")
  except (ValueError, KeyError, TypeError, LoraSpecError) as e:
    raise error(f"{where}: its NF4 metadata is not valid ({' '.join(str(e).split())})"
                ) from None
  want = part_specs(shape, layout, block_size, dq)
  if sorted(parts) != sorted(want):
    raise error(f"{where}: holds NF4 arrays {sorted(parts)}, expected {sorted(want)}")
  for name, (s, d) in want.items():
    got = parts[name]
    if tuple(got.shape) != s or jnp.dtype(got.dtype).name != d:
      raise error(f"{where}: NF4 array '{name}' is shape {tuple(got.shape)} dtype "
                  f"{jnp.dtype(got.dtype).name}, expected shape {s} dtype {d}")
  return NF4Array(parts["codes"], parts["absmax"], parts.get("nested_absmax"),
                  parts.get("offset"), shape=shape, dtype=jnp.dtype(dtype), layout=layout,
                  block_size=block_size)


#: What a bitsandbytes 4-bit quant state's key holds after the weight's key
#: (``M.weight.quant_state.bitsandbytes__nf4``); the quant type follows it.
BNB_STATE = ".quant_state.bitsandbytes__"


def is_quant_state_key(key: str) -> bool:
  """Whether ``key`` is the quant state of a bitsandbytes 4-bit weight (an
  entry of a Hugging Face ``*-bnb-4bit`` checkpoint, read by ``jlora.bnb``).

  Example:
    >>> is_quant_state_key("model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4")
    True
    >>> is_quant_state_key("model.layers.0.mlp.up_proj.weight.absmax")
    False
  """
  return BNB_STATE in key
