"""What every benchmark shares: the machine's description and interleaved timing.

Ratios are taken side by side in one run: each round times every variant
once, in turn, so drift in the machine's load hits all alike, and the
medians are compared.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Mapping

_FLAGS = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512_bf16": "avx512_bf16",
          "amx": "amx_tile"}


def machine_info() -> dict[str, Any]:
  """The CPU model, its vector extensions (AVX2, FMA, AVX-512, AMX) and core
  count: rankings between libraries depend on them.

  Example:
    >>> sorted(machine_info())
    ['cores', 'extensions', 'model', 'platform']
  """
  model, have = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read().splitlines()
    model = next((l.split(":", 1)[1].strip() for l in info if l.startswith("model name")),
                 model)
    have = set(next((l.split(":", 1)[1].split() for l in info if l.startswith("flags")), []))
  except OSError:
    pass
  return {"model": model, "extensions": [name for name, flag in _FLAGS.items() if flag in have],
          "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
          else os.cpu_count(),
          "platform": platform.platform()}


def machine() -> str:
  """One line: ``AMD EPYC ... (avx2 fma), 2 cores``."""
  info = machine_info()
  return f"{info['model']} ({' '.join(info['extensions']) or 'no AVX'}), {info['cores']} cores"


def interleaved(variants: Mapping[str, Callable[[], Any]], rounds: int, *,
                warmup: int = 2, block: Callable[[Any], Any] | None = None
                ) -> dict[str, float]:
  """Median seconds of each variant over ``rounds`` rounds that run every
  variant once, in a rotating order; ``block`` waits for a result (e.g.
  ``jax.block_until_ready``)."""
  names = list(variants)
  wait = block or (lambda x: x)
  for _ in range(warmup):
    for name in names:
      wait(variants[name]())
  times: dict[str, list[float]] = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      wait(variants[name]())
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}


def write_json(path: str | None, result: Mapping[str, Any]) -> None:
  """Writes a benchmark's result to ``path`` (``--json``), if one was given."""
  if path:
    with open(path, "w") as f:
      json.dump(result, f, indent=2, default=str)
