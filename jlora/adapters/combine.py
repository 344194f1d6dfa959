"""``combine``: one adapter whose update is a weighted sum of several.

For adapters ``k`` with updates ``Delta_k = s_k B_k A_k`` and weights ``w_k``,
the combined update is ``sum_k w_k Delta_k``:

* ``"cat"``: exact; the ranks are concatenated: ``A = [A_1; A_2; ...]``,
  ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]``, scale 1. Each A is kept as trained.
* ``"linear"``: the same exact sum as a rank-sum adapter, with each weight
  split evenly between the factors (``sqrt(|w_k s_k|)`` on A_k and B_k), which
  keeps both factors of one magnitude for further training. (PEFT's
  ``linear`` sums the A's and the B's instead, which adds cross terms
  ``B_j A_k``: not the weighted sum.)
* ``"svd"``: the exact sum truncated to ``rank`` by a per-weight (per stack
  slice) SVD; the relative error of each weight's truncation is reported.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from jlora._paths import flatten_with_paths
from jlora.adapters.adapter import is_adapter
from jlora.adapters.bank import check_same_weight
from jlora.errors import LoraSpecError, LoraTreeError
from jlora.adapters.lora_param import LoraParam

METHODS = ("cat", "linear", "svd")


class Combination(NamedTuple):
  """What ``combine`` returns.

  Attributes:
    trainable: a trainable tree with one ``LoraParam`` per adapted weight.
    errors: path -> relative Frobenius error of the combined update against
      the exact weighted sum (0.0 for the exact methods).
  """

  trainable: Any
  errors: dict[str, float]


def combine(adapters: Mapping[str, Any] | Sequence[Any], weights: Sequence[float] | None = None,
            *, method: str = "cat", rank: int | None = None) -> Combination:
  """Combines adapters of one base into one adapter.

  Args:
    adapters: trainable trees for the same base (a list, or name -> tree).
      They may adapt different weights with different ranks and scales.
    weights: one weight per adapter (default: 1 each).
    method: ``"cat"``, ``"linear"`` or ``"svd"`` (see the module docs).
    rank: the rank of the ``"svd"`` result.

  Returns:
    ``Combination(trainable, errors)``.

  Raises:
    LoraSpecError: an unknown method, a missing or impossible rank, a weight
      that is not a finite number.
    LoraTreeError: the trees are not for one base (another structure, or
      factors for a weight of another shape), or one trains a weight in full.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"w": jnp.zeros((8, 4))}
    >>> _, t1 = jlora.lora_transform(params, jlora.LoraSpec(rank=2, targets=["w"]),
    ...                              key=jax.random.key(0))
    >>> both = jlora.combine([t1, t1], [0.5, 0.5], method="cat")
    >>> both.trainable["w"].a.shape, both.errors["w"]
    ((8, 4), 0.0)
  """
  if method not in METHODS:
    raise LoraSpecError(f"method must be one of {METHODS}, got {method!r}")
  trees = list(adapters.values()) if isinstance(adapters, Mapping) else list(adapters)
  if not trees:
    raise LoraTreeError("combine needs at least one adapter")
  labels = list(adapters) if isinstance(adapters, Mapping) else list(range(len(trees)))
  weights = [1.0] * len(trees) if weights is None else _weights(weights, labels)
  if len(weights) != len(trees):
    raise LoraSpecError(f"{len(weights)} weights for {len(trees)} adapters")
  if method == "svd":
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
      raise LoraSpecError(f"method='svd' needs rank=<int >= 1>, got {rank!r}")
  elif rank is not None:
    raise LoraSpecError(f"rank is for method='svd'; {method!r} keeps the sum of the ranks")
  flat = [flatten_with_paths(t, is_leaf=is_adapter) for t in trees]
  treedef = flat[0][1]
  if any(f[1] != treedef for f in flat[1:]):
    raise LoraTreeError("combine: the adapters are not for the same parameters (their trees "
                        "differ)")
  out, errors = [], {}
  for i, (path, _) in enumerate(flat[0][0]):
    parts = [(w, f[0][i][1]) for w, f in zip(weights, flat) if f[0][i][1] is not None]
    named = {label: f[0][i][1] for label, f in zip(labels, flat) if f[0][i][1] is not None}
    for _, leaf in parts:
      if not isinstance(leaf, LoraParam):
        raise LoraTreeError(f"combine: '{path}' is not a LoraParam (a weight trained in "
                            f"full, a DoRA adapter or a bank); only LoRA pairs combine")
      if leaf.residual is not None:
        raise LoraTreeError(f"combine: '{path}' is relative to the residual weights its init "
                            f"({leaf.residual!r}) left in frozen; make it relative to the "
                            f"original weights first (jlora.relative_to_original)")
    if not parts:
      out.append(None)
      continue
    _check_alike(path, named)
    if method == "svd":
      leaf, errors[path] = _svd(path, parts, rank)
    else:
      leaf, errors[path] = _concatenate(parts, balanced=method == "linear"), 0.0
    out.append(leaf)
  return Combination(treedef.unflatten(out), errors)


def _weights(weights: Sequence[Any], labels: list[Any]) -> list[float]:
  """The weights as floats; LoraSpecError for one that is not a finite number
  (a NaN or an infinity would make every combined factor NaN)."""
  out = []
  for i, w in enumerate(weights):
    label = f"adapter {labels[i]!r}" if i < len(labels) else f"weights[{i}]"
    try:
      value = float(w)
    except (TypeError, ValueError):
      raise LoraSpecError(f"combine: the weight of {label} must be a number, got "
                          f"{w!r}") from None
    if not math.isfinite(value):
      raise LoraSpecError(f"combine: the weight of {label} must be finite, got {value}")
    out.append(value)
  return out


def _check_alike(path: str, params: Mapping[Any, LoraParam]) -> None:
  first = next(iter(params.values()))
  for lp in params.values():
    if lp.layout != first.layout:
      raise LoraTreeError(f"combine: the adapters lay out '{path}' differently "
                          f"({first.layout} and {lp.layout})")
  check_same_weight(path, params, "adapters of one base combine", prefix="combine: ")


def _concatenate(parts: list[tuple[float, LoraParam]], balanced: bool) -> LoraParam:
  ns = len(parts[0][1].layout.stack_axes)
  a_parts, b_parts = [], []
  for w, lp in parts:
    c = w * lp.scale
    if balanced:
      root = math.sqrt(abs(c))
      a_parts.append(lp.a * root)
      b_parts.append(lp.b * math.copysign(root, c))
    else:
      a_parts.append(lp.a)
      b_parts.append(lp.b * c)
  first = parts[0][1]
  return LoraParam(a=jnp.concatenate(a_parts, axis=-1).astype(first.a.dtype),
                   b=jnp.concatenate(b_parts, axis=ns).astype(first.b.dtype),
                   scale=1.0, layout=first.layout, dropout=first.dropout)


def _svd(path: str, parts: list[tuple[float, LoraParam]], rank: int) -> tuple[LoraParam, float]:
  first = parts[0][1]
  ns = len(first.layout.stack_axes)
  stack = first.a.shape[:ns]
  in_shape, out_shape = first.a.shape[ns:-1], first.b.shape[ns + 1:]
  fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
  if rank > min(fan_in, fan_out):
    raise LoraSpecError(f"'{path}': rank {rank} exceeds min(fan_in={fan_in}, "
                        f"fan_out={fan_out})")
  delta = np.zeros(stack + (fan_in, fan_out), np.float64)
  for w, lp in parts:
    a = np.asarray(lp.a, np.float64).reshape(stack + (fan_in, -1))
    b = np.asarray(lp.b, np.float64).reshape(stack + (-1, fan_out))
    delta += (w * lp.scale) * (a @ b)
  u, s, vt = np.linalg.svd(delta, full_matrices=False)
  root = np.sqrt(s[..., :rank])
  a = u[..., :, :rank] * root[..., None, :]
  b = root[..., :, None] * vt[..., :rank, :]
  norm = np.linalg.norm(delta)
  error = 0.0 if norm == 0 else float(np.linalg.norm(delta - a @ b) / norm)
  lp = LoraParam(a=jnp.asarray(a.reshape(stack + in_shape + (rank,)), first.a.dtype),
                 b=jnp.asarray(b.reshape(stack + (rank,) + out_shape), first.b.dtype),
                 scale=1.0, layout=first.layout, dropout=first.dropout)
  return lp, error
