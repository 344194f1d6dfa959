"""Merge adapters into the base weights for export, and take them out again."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jlora import _compat
from jlora._paths import flatten_with_paths
from jlora.errors import LoraError, LoraTreeError
from jlora.adapters.adapter import Adapter, is_adapter
from jlora.adapters.bank import LoraBank, select_adapter
from jlora.quant.nf4 import NF4Array, quantize_array
from jlora.transform import split_trees

_DENSE_DTYPES = ("bfloat16", "float16", "float32", "float64")


def _merged_leaf(w0: jax.Array, adapter: Adapter, sign: float) -> jax.Array:
  acc = jnp.promote_types(jnp.float32, w0.dtype)
  w = adapter.merged(w0.astype(acc)) if sign > 0 else adapter.unmerged(w0.astype(acc))
  return w.astype(w0.dtype)


@dataclasses.dataclass(frozen=True)
class RequantizeReport:
  """What requantizing the merged weights to NF4 changed.

  Each adapted NF4 weight is merged densely (``dequantize + s B A`` in
  float32) and requantized; the change is ``dequantize(requantized) - dense
  merge``, in float32. The report is a pytree, so a merge under ``jax.jit``
  returns it too (its changes as arrays).

  Attributes:
    per_path: path -> ``(max_abs_change, mean_abs_change, size)``.
  """

  per_path: dict[str, tuple[Any, Any, int]]

  @property
  def max_abs(self) -> float:
    """The largest absolute change of any merged weight."""
    return max((float(m) for m, _, _ in self.per_path.values()), default=0.0)

  @property
  def mean_abs(self) -> float:
    """The mean absolute change over all elements of the requantized weights."""
    total = sum(n for _, _, n in self.per_path.values())
    return sum(float(mean) * n for _, mean, n in self.per_path.values()) / max(total, 1)

  def __str__(self) -> str:
    lines = [f"requantized {len(self.per_path)} weights to NF4: max |change| "
             f"{self.max_abs:.4g}, mean |change| {self.mean_abs:.4g} (against the dense merge)"]
    for path, (mx, mean, _) in self.per_path.items():
      lines.append(f"  {path}: max {float(mx):.4g}, mean {float(mean):.4g}")
    return "\n".join(lines)


def _report_flatten(report: RequantizeReport):
  paths = tuple(report.per_path)
  changes = [report.per_path[p][:2] for p in paths]
  return changes, tuple((p, report.per_path[p][2]) for p in paths)


def _report_unflatten(aux, changes) -> RequantizeReport:
  return RequantizeReport({p: (*change, size) for (p, size), change in zip(aux, changes)})


jax.tree_util.register_pytree_node(RequantizeReport, _report_flatten, _report_unflatten)


def _quantized_merge(path: str, q: NF4Array, adapter: Adapter | None, dtype: Any,
                     requantize: bool, report: dict) -> Any:
  """A merged NF4 weight: dense in ``dtype``, or requantized (reported)."""
  if adapter is None:
    return q if requantize else q.dequantize(dtype)
  dense = adapter.merged(q.dequantize(jnp.float32))
  if not requantize:
    return dense.astype(q.dtype if dtype is None else dtype)
  back = quantize_array(dense.astype(q.dtype), q.layout, block_size=q.block_size,
                        double_quant=q.double_quant, path=path)
  change = jnp.abs(back.dequantize(jnp.float32) - dense)
  mx, mean = jnp.max(change), jnp.mean(change)
  if not _compat.is_tracer(change):
    mx, mean = float(mx), float(mean)
  report[path] = (mx, mean, int(change.size))   # traced under jit: the report leaves it too
  return back


def _combine(frozen: Any, trainable: Any, sign: float, check_finite: bool, dtype: Any = None,
             requantize: bool = False, report: dict | None = None) -> Any:
  paths, f_leaves, t_leaves, treedef = split_trees(frozen, trainable)
  out = []
  for path, f, t in zip(paths, f_leaves, t_leaves):
    if isinstance(f, NF4Array):
      if sign < 0:
        raise LoraError(
            f"unmerge: '{path}' is quantized (NF4); W0 = W - s B A cannot be taken out of a "
            f"quantized weight exactly. Keep the quantized frozen tree from lora_transform "
            f"instead")
      leaf = _quantized_merge(path, f, t if is_adapter(t) else None, dtype, requantize, report)
    elif is_adapter(t):
      leaf = _merged_leaf(f, t, sign)
    elif sign < 0:
      # unmerge returns a frozen part: None stays at the extra trainable leaves.
      leaf = f
    else:
      leaf = f if f is not None else t
    if check_finite and leaf is not None and not isinstance(leaf, NF4Array):
      if _compat.is_tracer(leaf):
        raise LoraError(
            f"merge(check_finite=True) needs concrete arrays, but '{path}' is traced (merge is "
            f"inside jax.jit or another transformation); merge outside it, or check with "
            f"jnp.isfinite on the result")
      if not bool(jnp.all(jnp.isfinite(leaf))):
        raise LoraError(f"'{path}' has non-finite values after merging")
    out.append(leaf)
  return treedef.unflatten(out)


def _one_adapter(trainable: Any, adapter: str | None) -> Any:
  """``trainable``, or for a bank tree the adapter named ``adapter``."""
  banks = [path for path, leaf in flatten_with_paths(trainable, is_leaf=is_adapter)[0]
           if isinstance(leaf, LoraBank)]
  if banks and adapter is None:
    raise LoraTreeError(f"'{banks[0]}' holds a bank of adapters; name the one to merge "
                        f"with adapter=... (jlora.select_adapter)")
  if adapter is not None and not banks:
    raise LoraTreeError(f"adapter={adapter!r} selects from a bank of adapters, but the "
                        f"trainable tree holds none")
  return select_adapter(trainable, adapter) if banks else trainable


def merge(frozen: Any, trainable: Any, *, adapter: str | None = None,
          check_finite: bool = False, dtype: Any = None, requantize: bool = False) -> Any:
  """Returns the base parameters with ``W0 + s B A`` at every adapted weight.

  The sum is accumulated in float32 (or wider) and cast back to W0's dtype;
  extra trainable leaves are put back in place. The result has the
  structure and dtypes of the original ``params``.

  A quantized base (``NF4Array`` leaves, QLoRA) merges to a dense base, as
  QLoRA's authors export: each NF4 weight is dequantized, the delta is added
  in float32, and the result is cast to ``dtype`` (default: the weight's
  dtype before quantization; ``jnp.bfloat16`` is the usual choice). NF4
  weights without an adapter are dequantized to ``dtype`` too, so the result
  holds plain arrays only. Requantizing the merged weights to NF4 loses
  accuracy; it is an explicit choice, ``requantize=True``, which returns the
  change it made beside the tree.

  Args:
    frozen: the frozen part from ``lora_transform``.
    trainable: the (trained) trainable part, or a bank tree
      (``jlora.stack_adapters``) with ``adapter`` naming the one to merge.
    adapter: with a bank, the adapter to merge.
    check_finite: raise ``LoraError`` naming the first parameter with a NaN
      or infinity (needs concrete arrays, not tracers).
    dtype: the dtype of the dense weights made from NF4 weights (float32,
      bfloat16, ...); other leaves keep theirs.
    requantize: requantize each adapted NF4 weight after merging (same block
      size and double quantization) and keep the other NF4 weights as they
      are. Returns ``(merged, report)``, where the ``RequantizeReport`` gives
      the max and mean absolute change of each requantized weight against
      the dense merge.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"w": jnp.ones((4, 3))}
    >>> frozen, trainable = jlora.lora_transform(
    ...     params, jlora.LoraSpec(rank=2, targets=["w"]), key=jax.random.key(0))
    >>> bool(jnp.allclose(jlora.merge(frozen, trainable)["w"], params["w"]))
    True
  """
  if dtype is not None and jnp.dtype(dtype).name not in _DENSE_DTYPES:
    raise LoraError(f"merge: dtype must be a floating dtype such as jnp.bfloat16 or "
                    f"jnp.float32, got {dtype!r}")
  report: dict = {}
  merged = _combine(frozen, _one_adapter(trainable, adapter), 1.0, check_finite, dtype,
                    requantize, report)
  return (merged, RequantizeReport(report)) if requantize else merged


def unmerge(merged: Any, trainable: Any, *, adapter: str | None = None) -> Any:
  """Inverts ``merge``: returns ``frozen`` with ``W0 = W - s B A``.

  ``merged`` must have None at the extra trainable leaves (as ``frozen``
  has); use ``jlora.frozen_like(params, trainable)`` to drop them from a full
  parameter tree first. With a bank, ``adapter`` names the merged adapter;
  unmerge it and merge another to swap adapters in a merged model.
  """
  trainable = _one_adapter(trainable, adapter)
  m_pairs, m_def = flatten_with_paths(merged)
  t_pairs, t_def = flatten_with_paths(trainable, is_leaf=is_adapter)
  if m_def == t_def:   # (split_trees reports other mismatches)
    for (path, m), (_, t) in zip(m_pairs, t_pairs):
      if m is not None and t is not None and not is_adapter(t):
        raise LoraTreeError(
            f"unmerge: '{path}' is trained in full, so the frozen tree holds None there, "
            f"but `merged` has it; pass jlora.frozen_like(merged, trainable) to drop the "
            f"weights trained in full first")
  return _combine(merged, trainable, -1.0, False)


def frozen_like(params: Any, trainable: Any) -> Any:
  """``params`` with None wherever ``trainable`` holds a plain (extra) leaf."""
  is_leaf = lambda x: x is None or is_adapter(x)  # noqa: E731
  return jax.tree_util.tree_map(
      lambda t, p: None if (t is not None and not is_adapter(t)) else p,
      trainable, params, is_leaf=is_leaf)
