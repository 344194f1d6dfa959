"""The parameter table that ``describe`` of a parameter file reports.

``jlora.base.describe`` (jlora's base files) and ``jlora.bnb.describe``
(bitsandbytes checkpoints) list each parameter with its shape, dtype and
stored bytes, and for a quantized one its NF4 format; ``summarize`` turns
those rows into the counts both report (and ``jlora inspect`` prints). It
lives apart from both formats so that neither imports the other.
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np


def summarize(entries: Sequence[tuple[str, Any, Any, int, dict[str, Any] | None]]
              ) -> dict[str, Any]:
  """The counts ``describe`` reports, from ``(name, shape, dtype, stored bytes,
  NF4 metadata or None)`` per parameter.

  Example:
    >>> info = summarize([("w", (2, 3), "float32", 24, None)])
    >>> info["params"], info["bytes"], info["dense"], info["quantized"]
    (1, 24, {'tensors': 1, 'elements': 6, 'bytes': 24}, None)
  """
  tensors, totals = [], {True: [0, 0, 0], False: [0, 0, 0]}
  dtypes: collections.Counter = collections.Counter()
  dequantized = 0
  for name, shape, dtype, nbytes, quant in entries:
    size = int(np.prod(shape, dtype=np.int64))
    dtype = jnp.dtype(dtype).name
    dtypes[dtype] += 1
    dequantized += size * jnp.dtype(dtype).itemsize
    row = {"path": name, "shape": [int(d) for d in shape], "dtype": dtype}
    if quant is not None:
      row["quant"] = {"type": quant["quant"], "block_size": quant["block_size"],
                      "double_quant": quant["double_quant"], "bytes": nbytes,
                      "bits_per_param": 8 * nbytes / max(size, 1)}
    tensors.append(row)
    t = totals[quant is not None]
    t[0], t[1], t[2] = t[0] + 1, t[1] + size, t[2] + nbytes
  q, d = totals[True], totals[False]
  return {"params": q[0] + d[0], "elements": q[1] + d[1], "bytes": q[2] + d[2],
          "bits_per_param": 8 * (q[2] + d[2]) / max(q[1] + d[1], 1), "dtypes": dict(dtypes),
          "quantized": ({"tensors": q[0], "elements": q[1], "bytes": q[2],
                         "bits_per_param": 8 * q[2] / max(q[1], 1)} if q[0] else None),
          "dense": {"tensors": d[0], "elements": d[1], "bytes": d[2]},
          "dequantized_bytes": dequantized,
          "tensors": tensors}
