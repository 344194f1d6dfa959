"""Which axis of a bank dot's input holds the examples.

``lora_adapter_ids`` gives one adapter per example, and a bank applies
``ids[i]`` to row ``i`` of the leading axis of each dot's input. That axis
must be the examples: inside ``lax.map`` over examples, or a scan over
them, a dot sees one example at a time, and if its sequence length happens
to equal the number of examples, the leading axis is tokens, and each token
would silently run another example's adapter.

So before a batch with per-example ids runs, the transformed function is
traced and interpreted once more, abstractly, with the examples' count
changed to a size that appears nowhere else (``probe_size``): every array
argument whose leading axis has one entry per id gets that many. An axis of
a dot's input that holds the examples follows that count; one that only
coincides with it (tokens, positions) does not. Each bank dot then records
whether its input leads with the probe's count, and the real evaluation
refuses, naming the weight, a dot whose input was not seen to lead with
the examples. The probe is traced once per trace of the function (cached
with it), so it costs tracing time only, nothing at run time.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import jax


@dataclasses.dataclass
class ExampleAxes:
  """What the probe found, carried by the interpreter's context.

  Attributes:
    probe_size: while probing, the probe's number of examples; None in the
      real evaluation.
    verdicts: ``(path, dot key) -> whether the input led with the examples``
      (False if any dot of that weight and form did not).
    failure: why the probe could not run, if it could not.
  """

  probe_size: int | None = None
  verdicts: dict = dataclasses.field(default_factory=dict)
  failure: str | None = None

  def record(self, path: str, key: Any, leads: bool) -> None:
    self.verdicts[(path, key)] = self.verdicts.get((path, key), True) and leads

  def proven(self, path: str, key: Any) -> bool:
    return self.verdicts.get((path, key), False)


def probe_size(n_examples: int, shapes: list[tuple[int, ...]]) -> int:
  """A prime of at least twice the examples' count, it and its neighbours
  (a size plus or minus a token or two) unlike every dimension in sight."""
  dims = {d for s in shapes for d in s}
  p = 2 * max(n_examples, 8) + 1
  while True:
    if all(p % q for q in range(2, int(p ** 0.5) + 1)) and not dims & set(range(p - 2, p + 3)):
      return p
    p += 2


def resize_examples(tree: Any, n_examples: int, size: int) -> Any:
  """``tree`` with every array leaf that leads with ``n_examples`` entries
  replaced by an abstract one leading with ``size``."""
  def one(x):
    shape = getattr(x, "shape", None)
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) or hasattr(x, "__array__"):
      if shape and shape[0] == n_examples:
        return jax.ShapeDtypeStruct((size,) + tuple(shape[1:]), x.dtype)
    return x
  return jax.tree_util.tree_map(one, tree)


def probe(run: Callable[..., Any], size: int, *operands: Any) -> ExampleAxes:
  """``run(found, *operands)`` abstractly (``jax.eval_shape``), where
  ``run`` evaluates the resized function with ``found`` in its context;
  returns the verdicts for the real evaluation, or why the probe failed."""
  found = ExampleAxes(probe_size=size)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")     # the real evaluation warns
      jax.eval_shape(lambda *ops: run(found, *ops), *operands)
  except Exception as e:  # noqa: BLE001  (reported at the first bank dot, by name)
    first = str(e).splitlines()[0] if str(e) else ""
    return ExampleAxes(failure=f"{type(e).__name__}: {first}")
  return ExampleAxes(verdicts=found.verdicts)
