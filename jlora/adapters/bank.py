"""Banks: several adapters of one base, stacked, and used per example.

``stack_adapters({"math": t1, "code": t2})`` turns trainable trees made for
the same base into one tree with a ``LoraBank`` at every weight any of them
adapts. ``jlora.lora(fn)(frozen, bank, x, lora_adapter_ids=ids)`` then runs
each example with its own adapter (``ids[i]``; -1 for the base model alone),
or the whole batch with one (a scalar id). Ids are traced, and a bank is an
ordinary pytree of arrays, so changing the ids or swapping in another bank of
the same shapes and scales does not recompile.

Ranks may differ: each adapter is zero-padded to the largest rank, so the
product, and each gradient, is exactly the unpadded adapter's (the padding
gets zero gradients and stays zero). An adapter that leaves a weight alone
has zero factors there: it contributes nothing and learns nothing there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jlora import _compat
from jlora._paths import flatten_with_paths
from jlora.adapters.adapter import Adapter, is_adapter, register_kind
from jlora.errors import LoraTreeError
from jlora.layout import Layout
from jlora.adapters.lora_param import LoraParam, pair_axes, weight_shape_of


@register_kind
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraBank(Adapter):
  """Several LoRA adapters of one frozen weight, on a leading adapter axis.

  A pytree node whose leaves are ``a`` and ``b``::

    a: (n, *stack, *in, r)      b: (n, *stack, r, *out)

  with ``r`` the largest rank; adapter ``k`` uses ``a[k, ..., :ranks[k]]``
  and ``b[k, ..., :ranks[k], ...]`` (the rest is zero), scaled by
  ``scales[k]``.

  Attributes:
    a, b: the stacked factors.
    scales: each adapter's ``alpha / r`` (static).
    ranks: each adapter's own rank; 0 where the adapter leaves this weight alone.
    names: the adapters' names, in stacking order.
    layout: which weight axes the factors cover, as for ``LoraParam``.
    dropout: the LoRA dropout rate (one for all adapters).
  """

  a: Any
  b: Any
  scales: tuple[float, ...] = dataclasses.field(metadata=dict(static=True))
  ranks: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
  layout: Layout = dataclasses.field(metadata=dict(static=True))
  dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

  kind: ClassVar[str] = "bank"

  @property
  def size(self) -> int:
    """The number of adapters."""
    return len(self.names)

  def factor_shapes(self, weight_shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    r = self.a.shape[-1]
    return ((self.size,) + self.layout.a_shape(weight_shape, r),
            (self.size,) + self.layout.b_shape(weight_shape, r))

  def array_shapes(self) -> tuple[tuple[int, ...], ...]:
    return tuple(self.a.shape), tuple(self.b.shape)

  @classmethod
  def array_axes(cls, layout: Layout) -> dict[str, tuple[int | None, ...]]:
    # The adapter axis leads; each adapter's pair follows W0 as a LoraParam's does.
    return {name: (None,) + axes for name, axes in pair_axes(layout).items()}

  def merged(self, w0: Any) -> Any:
    raise LoraTreeError("a bank holds several adapters; merge one of them "
                        "(jlora.merge(..., adapter=name) or jlora.select_adapter)")

  unmerged = merged

  def adapter(self, name: str) -> LoraParam | None:
    """Adapter ``name``'s own pair (padding dropped); None if it leaves this
    weight alone."""
    k = _index(self.names, name)
    r = self.ranks[k]
    if r == 0:
      return None
    return LoraParam(a=self.a[k][..., :r], b=jnp.take(self.b[k], jnp.arange(r),
                                                        axis=len(self.layout.stack_axes)),
                     scale=self.scales[k], layout=self.layout, dropout=self.dropout)


def _index(names: Sequence[str], name: str) -> int:
  if name not in names:
    raise LoraTreeError(f"no adapter named {name!r} in this bank (adapters: {list(names)})")
  return list(names).index(name)


def stack_adapters(adapters: Mapping[str, Any]) -> Any:
  """Stacks trainable trees made for the same base into one bank tree.

  Args:
    adapters: name -> trainable tree (from ``lora_transform``, ``load``...),
      all for the same base (the same tree structure). They may adapt
      different weights with different ranks and scales.

  Returns:
    A tree with the structure of the trainable trees: a ``LoraBank`` at every
    weight any adapter adapts, None elsewhere.

  Raises:
    LoraTreeError: the trees do not share a structure, an adapter trains a
      weight in full (a bank holds LoRA factors only), or the adapters lay
      out one weight differently, with different dropout rates or dtypes, or
      were made for weights of different shapes.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"w": jnp.zeros((8, 4)), "v": jnp.zeros((4, 4))}
    >>> _, t1 = jlora.lora_transform(params, jlora.LoraSpec(rank=2, targets=["w"]),
    ...                              key=jax.random.key(0))
    >>> _, t2 = jlora.lora_transform(params, jlora.LoraSpec(rank=3, targets=["w", "v"]),
    ...                              key=jax.random.key(1))
    >>> bank = jlora.stack_adapters({"math": t1, "code": t2})
    >>> bank["w"].a.shape, bank["w"].ranks, bank["v"].ranks
    ((2, 8, 3), (2, 3), (0, 3))
  """
  if not adapters:
    raise LoraTreeError("stack_adapters needs at least one adapter")
  names = tuple(adapters)
  for name in names:
    if not isinstance(name, str):
      raise LoraTreeError(f"adapter names must be strings, got {name!r}")
  flat = {name: flatten_with_paths(t, is_leaf=is_adapter) for name, t in adapters.items()}
  first, (pairs0, treedef) = names[0], flat[names[0]]
  for name in names[1:]:
    if flat[name][1] != treedef:
      raise LoraTreeError(f"adapter {name!r} is not for the same parameters as adapter "
                          f"{first!r} (their trees differ); a bank stacks adapters of one base")
  out = []
  for i, (path, _) in enumerate(pairs0):
    leaves = {name: flat[name][0][i][1] for name in names}
    for name, leaf in leaves.items():
      _check_stackable(path, name, leaf)
    present = {name: leaf for name, leaf in leaves.items() if leaf is not None}
    out.append(_stack_one(path, names, present) if present else None)
  return treedef.unflatten(out)


def _check_stackable(path: str, name: str, leaf: Any) -> None:
  if leaf is None or (isinstance(leaf, LoraParam) and leaf.residual is None):
    return
  if isinstance(leaf, LoraParam):
    raise LoraTreeError(
        f"'{path}' of adapter {name!r} is relative to the residual weights its init "
        f"({leaf.residual!r}) left in frozen, not to the base the bank shares; make it "
        f"relative to the original weights first (jlora.relative_to_original)")
  if is_adapter(leaf):
    raise LoraTreeError(
        f"'{path}' of adapter {name!r} is a {type(leaf).__name__} ({leaf.kind!r}); a bank "
        f"holds plain LoRA pairs (jlora.LoraParam) only: DoRA adapters and banks cannot be "
        f"stacked (merge a DoRA adapter into the base, or serve it alone)")
  raise LoraTreeError(f"'{path}' is trained in full by adapter {name!r}; a bank holds "
                      f"LoRA factors only (merge that weight into the base, or leave it "
                      f"out of the spec's extra_trainable)")


def _stack_one(path: str, names: tuple[str, ...], present: Mapping[str, LoraParam]) -> LoraBank:
  ref_name, ref = next(iter(present.items()))
  for name, lp in present.items():
    for what, mine, theirs in (("layout", lp.layout, ref.layout),
                               ("dropout rate", lp.dropout, ref.dropout),
                               ("factor dtype", lp.a.dtype, ref.a.dtype)):
      if mine != theirs:
        raise LoraTreeError(f"'{path}': adapters {ref_name!r} and {name!r} differ in {what} "
                            f"({theirs} and {mine}); a bank stacks adapters of one layout")
  check_same_weight(path, present, "a bank stacks adapters of one base")
  r_max = max(lp.rank for lp in present.values())
  ns = len(ref.layout.stack_axes)
  a_parts, b_parts = [], []
  for name in names:
    lp = present.get(name)
    if lp is None:
      a_parts.append(jnp.zeros(ref.a.shape[:-1] + (r_max,), ref.a.dtype))
      b_shape = ref.b.shape[:ns] + (r_max,) + ref.b.shape[ns + 1:]
      b_parts.append(jnp.zeros(b_shape, ref.b.dtype))
      continue
    pad = r_max - lp.rank
    a_parts.append(jnp.pad(lp.a, [(0, 0)] * (lp.a.ndim - 1) + [(0, pad)]))
    b_parts.append(jnp.pad(lp.b, [(0, 0)] * ns + [(0, pad)] + [(0, 0)] * (lp.b.ndim - ns - 1)))
  return LoraBank(a=jnp.stack(a_parts), b=jnp.stack(b_parts),
                  scales=tuple(float(present[n].scale) if n in present else 0.0 for n in names),
                  ranks=tuple(present[n].rank if n in present else 0 for n in names),
                  names=names, layout=ref.layout, dropout=ref.dropout)


def check_same_weight(path: str, pairs: Mapping[Any, LoraParam], why: str,
                      prefix: str = "") -> None:
  """Raises LoraTreeError unless every pair's factors fit together and adapt
  a weight of one shape (their ranks may differ)."""
  shapes = {}
  for name, lp in pairs.items():
    shapes[name] = weight_shape_of(lp.a, lp.b, lp.layout)
    if shapes[name] is None:
      raise LoraTreeError(f"{prefix}'{path}': the factors of adapter {name!r} do not fit "
                          f"together (A {tuple(lp.a.shape)}, B {tuple(lp.b.shape)}, "
                          f"{lp.layout})")
  ref_name = next(iter(pairs))
  for name, shape in shapes.items():
    if shape != shapes[ref_name]:
      ref, lp = pairs[ref_name], pairs[name]
      raise LoraTreeError(
          f"{prefix}'{path}': adapters {ref_name!r} and {name!r} were made for weights of "
          f"different shapes ({shapes[ref_name]} and {shape}: A {tuple(ref.a.shape)}, B "
          f"{tuple(ref.b.shape)} and A {tuple(lp.a.shape)}, B {tuple(lp.b.shape)}); {why}")


def select_adapter(bank: Any, name: str) -> Any:
  """The trainable tree of one adapter of a bank tree, as it was stacked.

  The result works with everything a plain trainable tree does: ``merge``,
  ``unmerge``, ``jlora.lora`` without ids, saving.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"w": jnp.zeros((8, 4))}
    >>> _, t1 = jlora.lora_transform(params, jlora.LoraSpec(rank=2, targets=["w"]),
    ...                              key=jax.random.key(0))
    >>> bank = jlora.stack_adapters({"math": t1, "code": t1})
    >>> jlora.select_adapter(bank, "math")["w"].a.shape
    (8, 2)
  """
  pairs, treedef = flatten_with_paths(bank, is_leaf=is_adapter)
  if not any(isinstance(leaf, LoraBank) for _, leaf in pairs):
    raise LoraTreeError("select_adapter: the tree holds no jlora.LoraBank (stack adapters "
                        "with jlora.stack_adapters)")
  out = []
  for path, leaf in pairs:
    if leaf is not None and not isinstance(leaf, LoraBank):
      raise LoraTreeError(f"select_adapter: '{path}' is not a LoraBank")
    out.append(None if leaf is None else leaf.adapter(name))
  return treedef.unflatten(out)


def bank_names(bank: Any) -> tuple[str, ...]:
  """The adapter names of a bank tree (the same at every weight)."""
  names = {leaf.names for _, leaf in flatten_with_paths(bank, is_leaf=is_adapter)[0]
           if isinstance(leaf, LoraBank)}
  if len(names) != 1:
    raise LoraTreeError(f"the tree's banks do not hold one set of adapters: {sorted(names)}")
  return next(iter(names))


def adapter_ids(ids: Any, names: Sequence[str], *, checked: bool = False) -> jax.Array:
  """``lora_adapter_ids`` as an int array, validated against a bank's adapters.

  The one validation ``jlora.lora``'s ``apply`` and ``jlora.optimizer``'s
  ``update`` share. Concrete ids are checked here: each must be -1 (the base
  model alone) or ``0..n-1``. Traced ids (under ``jax.jit``) cannot raise;
  an id out of range then gives NaN rows (a scalar id: the whole batch),
  never another adapter's output. With ``checked=True`` traced ids are
  checked with ``jax.experimental.checkify.check``, so a ``checkify``-ed
  step reports them (and an un-checkified ``jit`` refuses to trace).

  Raises:
    LoraTreeError: ids of a non-integer dtype, of rank above 1, or (concrete)
      out of range.
  """
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim > 1:
    raise LoraTreeError(f"lora_adapter_ids must be an int scalar or an int array with one "
                        f"entry per example, got {ids.dtype} of shape {ids.shape}")
  n = len(names)
  in_range = lambda i: (i >= -1) & (i < n)  # noqa: E731
  if not _compat.is_tracer(ids):
    bad = [int(i) for i in np.asarray(ids).reshape(-1) if not in_range(int(i))]
    if bad:
      raise LoraTreeError(f"lora_adapter_ids holds {bad[0]}, but the bank has {n} adapters "
                          f"{list(names)} (ids 0..{n - 1}, or -1 for the base model)")
  elif checked:
    ok = in_range(ids)
    first_bad = jnp.where(ok, 0, ids).reshape(-1)[jnp.argmin(ok.reshape(-1))]
    checkify.check(jnp.all(ok), f"lora_adapter_ids holds {{bad}}, but the bank has {n} "
                   f"adapters {list(names)} (ids 0..{n - 1}, or -1 for the base model)",
                   bad=first_bad)
  return ids
