"""Several JAX processes writing one file: process 0 decides, everyone agrees.

With ``jax.distributed`` initialised, jlora's writers are called by every
process (as orbax's are). The file-system steps that must happen once
(checks, staging names, the manifest, the atomic swap) run on process 0;
the others wait for its outcome through the distributed key-value store and
return the same value or raise the same error, so no process goes on
believing a save succeeded that did not, and none hangs in a collective
the others skipped. Every wait is bounded by ``TIMEOUT_S``.

Without ``jax.distributed`` (one process) everything runs locally and no
backend is started.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Callable

from jlora import _compat, errors

# How long a process waits for the others (seconds); a slow file system or a
# large adapter may need more: JLORA_MULTIHOST_TIMEOUT_S overrides it.
TIMEOUT_S = float(os.environ.get("JLORA_MULTIHOST_TIMEOUT_S", 600))
# Every process numbers its collective operations alike (they are called in
# the same order everywhere), which makes each key-value key unique.
_ops = itertools.count()


def process_count() -> int:
  return _compat.distributed_state()[2]


def process_index() -> int:
  return _compat.distributed_state()[1]


def is_primary() -> bool:
  return process_index() == 0


def _error_class(name: str) -> type[Exception]:
  cls = getattr(errors, name, None)
  return cls if isinstance(cls, type) and issubclass(cls, errors.LoraError) else errors.LoraFileError


class Op:
  """One collective operation (a save), with keys of its own.

  Example:
    >>> op = Op("jlora.orbax.save")     # one process: runs locally
    >>> op.on_primary("prepare", lambda: {"tmp": ".x.jlora-tmp-1"}, errors.LoraCheckpointError)
    {'tmp': '.x.jlora-tmp-1'}
  """

  def __init__(self, what: str):
    self.what = what
    self.client, self.index, self.count = _compat.distributed_state()
    self.prefix = f"jlora/{next(_ops) if self.count > 1 else 0}/{what}"

  @property
  def multiprocess(self) -> bool:
    return self.count > 1

  def barrier(self, name: str, error: type[errors.LoraError]) -> None:
    """Waits until every process reaches this point (at most ``TIMEOUT_S``)."""
    if not self.multiprocess:
      return
    try:
      self.client.wait_at_barrier(f"{self.prefix}/{name}", int(TIMEOUT_S * 1000))
    except Exception as e:  # the runtime's own error type (deadline exceeded...)
      raise error(f"{self.what}: not every one of the {self.count} processes reached it "
                  f"within {TIMEOUT_S:.0f} s ({type(e).__name__}: "
                  f"{' '.join(str(e).split())[:200]}); every process must call "
                  f"{self.what} (process 0 writes)") from None

  def on_primary(self, name: str, fn: Callable[[], Any],
                 error: type[errors.LoraError]) -> Any:
    """Runs ``fn`` on process 0; every process returns its (JSON) result or
    raises its error (the same jlora error class and message)."""
    if not self.multiprocess:
      return fn()
    key = f"{self.prefix}/{name}"
    if self.index == 0:
      try:
        value = fn()
      except Exception as e:
        cls = type(e).__name__ if isinstance(e, errors.LoraError) else error.__name__
        self.client.key_value_set(key, json.dumps({"error": cls, "message": str(e)}))
        raise
      self.client.key_value_set(key, json.dumps({"ok": value}))
      return value
    try:
      body = json.loads(self.client.blocking_key_value_get(key, int(TIMEOUT_S * 1000)))
    except Exception as e:  # a timeout, or process 0 is gone
      raise error(f"{self.what}: process {self.index} got no answer from process 0 within "
                  f"{TIMEOUT_S:.0f} s ({type(e).__name__}: "
                  f"{' '.join(str(e).split())[:200]})") from None
    if "error" in body:
      raise _error_class(body["error"])(f"{body['message']} (raised on process 0)")
    return body["ok"]


def gather_to_host(tree: Any) -> Any:
  """Every array of ``tree`` as a whole NumPy array on every process (a
  collective: every process calls it); arrays one process sees whole are
  left as they are."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  spread = [i for i, x in enumerate(leaves)
            if isinstance(x, jax.Array) and not x.is_fully_addressable]
  if spread:
    gathered = multihost_utils.process_allgather([leaves[i] for i in spread], tiled=True)
    for i, arr in zip(spread, gathered):
      leaves[i] = np.asarray(arr)
  return treedef.unflatten(leaves)
