"""Shardings of the LoRA factors, derived from the frozen weight's.

A follows W0's input axes and B its output axes; stack axes lead in both and
the rank axis is replicated, so a sharded base needs no extra code.
``shardings(trainable, tx)`` gives the trainable part's shardings and the
optimizer state's, for ``jax.jit(..., in_shardings=..., out_shardings=...)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jlora._paths import flatten_with_paths
from jlora.adapters.adapter import is_adapter
from jlora.errors import LoraTreeError
from jlora.layout import Layout


def factor_shardings(sharding: Any, layout: Layout, ndim: int
                     ) -> tuple[NamedSharding | None, NamedSharding | None]:
  """``(A's, B's)`` NamedSharding for a weight of ``sharding``; None for others.

  Example:
    >>> import jax
    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> w = NamedSharding(mesh, PartitionSpec(None, "model"))
    >>> a, b = factor_shardings(w, Layout((0,), (1,)), 2)
    >>> a.spec, b.spec
    (P(None, None), P(None, 'model'))
  """
  if not isinstance(sharding, NamedSharding):
    return None, None
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  stack = tuple(spec[i] for i in layout.stack_axes)
  a_spec = stack + tuple(spec[i] for i in layout.in_axes) + (None,)
  b_spec = stack + (None,) + tuple(spec[i] for i in layout.out_axes)
  return (NamedSharding(sharding.mesh, PartitionSpec(*a_spec)),
          NamedSharding(sharding.mesh, PartitionSpec(*b_spec)))


def leaf_sharding(leaf: Any) -> Any:
  """The sharding of a concrete or abstract array; None for a tracer or a
  leaf without one."""
  try:
    return getattr(leaf, "sharding", None)
  except Exception:  # tracers under jit have no concrete sharding
    return None


def array_sharding(sharding: Any, axes: tuple[int | None, ...], ndim: int
                   ) -> NamedSharding | None:
  """The NamedSharding of an adapter array whose axes follow the weight axes
  ``axes`` (None: an axis of its own, replicated), for a weight of ``sharding``.

  Example:
    >>> import jax
    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> w = NamedSharding(mesh, PartitionSpec(None, "model"))
    >>> array_sharding(w, (None, 1), 2).spec          # a magnitude-like (r, out) array
    P(None, 'model')
  """
  if not isinstance(sharding, NamedSharding):
    return None
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  return NamedSharding(sharding.mesh,
                       PartitionSpec(*(None if ax is None else spec[ax] for ax in axes)))


def _axes_sharding(sharding: Any, axes: tuple[int, ...], ndim: int) -> NamedSharding | None:
  """The sharding of W0's ``axes``, in that order (None if W0 has no NamedSharding)."""
  if not isinstance(sharding, NamedSharding):
    return None
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  return NamedSharding(sharding.mesh, PartitionSpec(*(spec[i] for i in axes)))


def lead(sharding: NamedSharding | None, n: int = 1) -> NamedSharding | None:
  """``sharding`` with ``n`` replicated axes in front (a bank's adapter axis)."""
  if sharding is None:
    return None
  return NamedSharding(sharding.mesh, PartitionSpec(*((None,) * n + tuple(sharding.spec))))


class TrainShardings(NamedTuple):
  """What ``jlora.shardings`` returns: two trees of ``NamedSharding``.

  Attributes:
    trainable: the structure of the trainable tree (a ``LoraParam`` or
      ``LoraBank`` of shardings at each adapted weight, None elsewhere).
    opt_state: the structure of ``tx.init(trainable)``; None without ``tx``.
  """
  trainable: Any
  opt_state: Any


def shardings(trainable: Any, tx: Any = None, *, base: Any = None) -> TrainShardings:
  """The shardings of the trainable part and of its optimizer state.

  Give them to ``jax.jit`` as ``in_shardings``/``out_shardings`` of a
  training step (and to ``jax.device_put``), so that every step returns A, B
  and the optimizer state where they came in: XLA's sharding propagation is
  otherwise free to pick other shardings for a jitted step's outputs, and
  the next step would re-shard them.

  * A and B follow W0's sharding: A takes W0's input axes, B its output
    axes, stack axes lead in both and the rank axis is replicated (what
    ``lora_transform`` gives a sharded base). A bank's adapter axis is
    replicated.
  * A leaf trained in full (``extra_trainable``) keeps its base leaf's
    sharding when ``base`` holds it (the full parameters), else its own,
    else it is replicated.
  * A DoRA magnitude follows W0's stack and output axes.
  * Optimizer state: a leaf whose key path ends with a trainable leaf's path
    and has its shape (Adam's ``mu['w'].a`` of ``['w'].a``, a momentum,
    ``MultiSteps``' accumulated gradients, a masked transformation's
    leaves; per adapter for a bank) gets that leaf's sharding; every other
    leaf (Adam's ``count``, a schedule's step, a factored second moment) is
    replicated.

  Args:
    trainable: the trainable part from ``lora_transform`` or
      ``stack_adapters``; concrete, or abstract (``jax.ShapeDtypeStruct``).
    tx: the optax transformation (usually ``jlora.optimizer(...)``); its
      state is computed abstractly with ``jax.eval_shape``, nothing is
      allocated.
    base: the frozen part or the full parameters (concrete or abstract with
      shardings). With it, the factors' shardings are derived from W0's;
      without it, from the factors' own shardings.

  Returns:
    ``TrainShardings(trainable, opt_state)``.

  Raises:
    LoraTreeError: nothing in ``trainable`` or ``base`` is placed on a mesh
      (no ``NamedSharding``), or ``base`` has another structure.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> w = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("data", None)))
    >>> frozen, trainable = jlora.lora_transform({"w": w}, jlora.LoraSpec(rank=2, targets=["w"]),
    ...                                          key=jax.random.key(0))
    >>> tx = jlora.optimizer(optax.adam(1e-3), trainable)
    >>> sh = jlora.shardings(trainable, tx, base=frozen)
    >>> sh.trainable["w"].a.spec, sh.opt_state[0].mu["w"].a.spec, sh.opt_state[0].count.spec
    (P('data', None), P('data', None), P())
  """
  t_pairs, t_def = flatten_with_paths(trainable, is_leaf=is_adapter)
  b_leaves: list[Any] = [None] * len(t_pairs)
  if base is not None:
    b_pairs, b_def = flatten_with_paths(base)
    if b_def != t_def:
      t_paths, b_paths = {p for p, _ in t_pairs}, {p for p, _ in b_pairs}
      raise LoraTreeError(
          f"jlora.shardings: trainable and base have different structures (only in "
          f"trainable: {sorted(t_paths - b_paths)[:3]}; only in base: "
          f"{sorted(b_paths - t_paths)[:3]}); pass the frozen part or the parameters")
    b_leaves = [leaf for _, leaf in b_pairs]
  mesh = _find_mesh(b_leaves, trainable)
  replicated = NamedSharding(mesh, PartitionSpec())

  def named(s: Any) -> NamedSharding:
    return s if isinstance(s, NamedSharding) else replicated

  out = []
  for (path, leaf), w0 in zip(t_pairs, b_leaves):
    if leaf is None:
      out.append(None)
    elif is_adapter(leaf):
      lay = leaf.layout
      n_lead = leaf.a.ndim - len(lay.stack_axes) - len(lay.in_axes) - 1   # a bank's: 1
      derived = (None, None)
      if w0 is not None:
        derived = factor_shardings(leaf_sharding(w0), leaf.layout, len(w0.shape))
      a_sh, b_sh = (lead(s, n_lead) for s in derived)
      fields = {"a": a_sh or named(leaf_sharding(leaf.a)),
                "b": b_sh or named(leaf_sharding(leaf.b))}
      for f in dataclasses.fields(leaf):
        value = getattr(leaf, f.name)
        if f.name in fields or f.metadata.get("static") or value is None:
          continue
        # DoRA's magnitude: (*stack, *out), as W0's stack and output axes.
        own = None
        if f.name == "magnitude" and w0 is not None:
          own = lead(_axes_sharding(leaf_sharding(w0), lay.stack_axes + lay.out_axes,
                                    len(w0.shape)), n_lead)
        fields[f.name] = own or named(leaf_sharding(value))
      out.append(dataclasses.replace(leaf, **fields))
    else:
      own = leaf_sharding(w0) if w0 is not None else None
      out.append(own if isinstance(own, NamedSharding) else named(leaf_sharding(leaf)))
  t_shardings = t_def.unflatten(out)
  if tx is None:
    return TrainShardings(t_shardings, None)
  return TrainShardings(t_shardings, _opt_shardings(trainable, tx, t_shardings, replicated))


def _find_mesh(base_leaves: list[Any], trainable: Any) -> Any:
  for leaf in list(base_leaves) + jax.tree_util.tree_leaves(trainable):
    s = leaf_sharding(leaf)
    if isinstance(s, NamedSharding):
      return s.mesh
  raise LoraTreeError(
      "jlora.shardings: no leaf of trainable or base is placed on a mesh (none has a "
      "NamedSharding); put the parameters on a mesh first (jax.device_put with a "
      "NamedSharding, or abstract leaves with sharding=)")


def _opt_shardings(trainable: Any, tx: Any, t_shardings: Any, replicated: NamedSharding) -> Any:
  """Each optimizer leaf whose key path ends with a trainable leaf's path, with
  its shape, takes that leaf's sharding (``mu['w'].a`` of ``['w'].a``; masked
  or partial mirrors too); every other leaf is replicated."""
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
  state = jax.eval_shape(tx.init, abstract)
  t_leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
  s_leaves = jax.tree_util.tree_leaves(t_shardings)
  by_path = {tuple(path): (tuple(leaf.shape), sh) for (path, leaf), sh in zip(t_leaves, s_leaves)}
  lengths = sorted({len(p) for p in by_path}, reverse=True)

  def assign(path: tuple, leaf: Any) -> NamedSharding:
    for n in lengths:
      hit = by_path.get(tuple(path[len(path) - n:])) if n <= len(path) else None
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(assign, state)


def nf4_shardings(nf4: Any, sharding: Any) -> Any:
  """Shardings of an ``NF4Array``'s packed arrays for a W0 of ``sharding``.

  Each slice of a stack axis is quantized on its own, so the stack axes keep
  W0's sharding; the packed codes (and the per-block scales) of a slice are
  one flat axis, split over every mesh axis that splits W0's other axes, as
  FSDP splits W0 itself, when its length allows (else replicated). Returns
  an ``NF4Array`` whose leaves are ``NamedSharding``s (None without a
  NamedSharding).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> q = jlora.quantize({"kernel": jax.ShapeDtypeStruct((4, 256, 64), jnp.bfloat16)},
    ...                    layouts={"kernel": Layout((1,), (2,), (0,))})["kernel"]
    >>> s = nf4_shardings(q, NamedSharding(mesh, PartitionSpec(None, "data", None)))
    >>> s.codes.spec, s.offset.spec
    (P(None, 'data'), P(None,))
  """
  if not isinstance(sharding, NamedSharding):
    return None
  lay = nf4.layout
  spec = tuple(sharding.spec) + (None,) * (len(nf4.shape) - len(sharding.spec))
  stack = tuple(spec[i] for i in lay.stack_axes)
  flat_axes: list[str] = []
  for i in lay.out_axes + lay.in_axes:
    entry = spec[i]
    for name in (entry if isinstance(entry, tuple) else (entry,)):
      if name is not None and name not in flat_axes:
        flat_axes.append(name)
  split = 1
  for name in flat_axes:
    split *= sharding.mesh.shape[name]

  def place(x: Any) -> Any:
    if x is None:
      return None
    last: Any = None
    if x.ndim > len(stack) and flat_axes and x.shape[-1] % split == 0:
      last = flat_axes[0] if len(flat_axes) == 1 else tuple(flat_axes)
    tail = (last,) if x.ndim > len(stack) else ()
    return NamedSharding(sharding.mesh, PartitionSpec(*(stack + tail)))

  return jax.tree_util.tree_map(place, nf4)
