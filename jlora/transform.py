"""``lora_transform``: split a parameter pytree into frozen and trainable parts.

Both parts keep the structure of the parameters (dict, FrozenDict, Flax NNX
State, ...), with ``None`` where a leaf belongs to the other part, as
equinox's ``partition`` does:

* ``frozen`` holds every base weight, W0 included, and None at the extra
  trainable leaves;
* ``trainable`` holds a ``LoraParam(a, b)`` at each adapted weight, the
  extra trainable leaves themselves, and None elsewhere.

So ``optax`` given ``trainable`` keeps state for A, B and the extras alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jlora.errors import LoraLayoutError, LoraSpecError, LoraTreeError
from jlora._paths import flatten_with_paths, is_weight_node
from jlora.adapters import inits
from jlora.adapters.adapter import Adapter, is_adapter
from jlora.adapters.dora import DoraParam, column_norm
from jlora.adapters.lora_param import LoraParam
from jlora.quant.nf4 import quantize_array
from jlora.sharding import factor_shardings, leaf_sharding
from jlora.layout import Layout
from jlora.spec import LoraSpec


def _is_abstract(x: Any) -> bool:
  """An abstract weight: a ShapeDtypeStruct, or a weight node (an NF4Array)
  whose arrays are all abstract."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return True
  leaves = jax.tree_util.tree_leaves(x) if is_weight_node(x) else ()
  return bool(leaves) and all(isinstance(l, jax.ShapeDtypeStruct) for l in leaves)


def _is_array_like(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def resolve_layout(path: str, leaf: Any, spec: LoraSpec,
                   layouts: Mapping[str, Layout] | None) -> Layout:
  """The layout of one target: spec override, then inferred, then 2-D default."""
  layout = spec.layout_override(path)
  if layout is None and layouts is not None:
    layout = layouts.get(path)
  if layout is None:
    layout = Layout.default(len(leaf.shape))
  if layout is None:
    raise LoraLayoutError(
        f"'{path}': cannot tell which axes of this {len(leaf.shape)}-D weight "
        f"(shape {tuple(leaf.shape)}) the model contracts. Pass "
        f"layouts=jlora.infer_layouts(fn, params, *example_args) to "
        f"lora_transform, or LoraSpec(layouts={{regex: jlora.Layout(...)}}).")
  layout.check(leaf.shape, path)
  return layout


def select_targets(pairs, spec: LoraSpec) -> tuple[list[int], list[int]]:
  """Indices of the adapted leaves and of the extra trainable leaves."""
  targets, extras = [], []
  for i, (path, leaf) in enumerate(pairs):
    if leaf is None:
      continue
    is_target, is_extra = spec.is_target(path, leaf), spec.is_extra_trainable(path, leaf)
    if is_target and is_extra:
      raise LoraSpecError(
          f"'{path}' matches both targets and extra_trainable; a weight is either "
          f"adapted or trained in full")
    if is_target:
      if not _is_array_like(leaf) or not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise LoraSpecError(
            f"'{path}' matches targets but is not a floating-point array "
            f"(got {getattr(leaf, 'dtype', type(leaf).__name__)}); only float weights "
            f"can be adapted")
      targets.append(i)
    elif is_extra:
      extras.append(i)
  if not targets:
    paths = [p for p, leaf in pairs if leaf is not None]
    wanted = spec.targets if isinstance(spec.targets, str) else (
        ", ".join(spec.targets) if isinstance(spec.targets, (list, tuple)) else "")
    near = difflib.get_close_matches(str(wanted), paths, n=5, cutoff=0.0) if wanted else paths[:5]
    shown = list(spec.targets) if isinstance(spec.targets, tuple) else spec.targets
    raise LoraSpecError(
        f"targets {shown!r} match no parameter. Nearest paths: {near}")
  return targets, extras


def _init_one(key, path_hash, a_shape, b_shape, fan_in, rank, init, dtype):
  key = jax.random.fold_in(key, path_hash)
  if init == "gaussian":
    a = jax.random.normal(key, a_shape, jnp.float32) / rank
  else:
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
  return a.astype(dtype), jnp.zeros(b_shape, dtype)


# One jitted call initialises every factor: a single compilation instead of
# one per eager op and shape (seconds on a model with a handful of targets).
@functools.partial(jax.jit, static_argnames=("plans",))
def _init_factors(key: jax.Array, path_hashes: jax.Array, *, plans: tuple) -> list:
  return [_init_one(key, path_hashes[i], *plan) for i, plan in enumerate(plans)]


def lora_transform(params: Any, spec: LoraSpec, *, key: jax.Array | None = None,
                   layouts: Mapping[str, Layout] | None = None) -> tuple[Any, Any]:
  """Splits ``params`` into ``(frozen, trainable)`` for LoRA fine-tuning.

  Pure: ``params`` is not modified. Works on dict and FrozenDict trees, on a
  Flax NNX State, and on abstract trees of ``jax.ShapeDtypeStruct`` (from
  ``jax.eval_shape``), where A and B come back abstract too, so a large run
  can be planned without allocating it.

  Args:
    params: the parameter pytree.
    spec: what to adapt (see ``LoraSpec``).
    key: PRNG key for A's initialisation; needed unless ``params`` is abstract.
      Each weight's key is derived from its path, so adding a target leaves
      the others' initial factors unchanged.
    layouts: path -> Layout, typically from ``jlora.infer_layouts``; 2-D
      weights default to (in, out), so this is needed only for other shapes
      or for weights stored (out, in).

  Returns:
    ``(frozen, trainable)``, both with the structure of ``params``.

  Raises:
    LoraSpecError: targets match nothing, or match a non-float leaf; a rank
      outside [1, min(fan_in, fan_out)].
    LoraLayoutError: a layout cannot be determined for a weight.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"dense": {"kernel": jnp.zeros((16, 8)), "bias": jnp.zeros(8)}}
    >>> spec = jlora.LoraSpec(rank=4, alpha=8, targets=["kernel"])
    >>> frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
    >>> trainable["dense"]["kernel"].a.shape, trainable["dense"]["kernel"].b.shape
    ((16, 4), (4, 8))
  """
  pairs, treedef = flatten_with_paths(params)
  targets, extras = select_targets(pairs, spec)
  spec.check_patterns_match([pairs[i][0] for i in targets])
  frozen = [leaf for _, leaf in pairs]
  trainable: list[Any] = [None] * len(pairs)
  for i in extras:
    trainable[i], frozen[i] = pairs[i][1], None
  pending = []   # concrete targets, initialised together below
  for i in targets:
    path, w0 = pairs[i]
    layout = resolve_layout(path, w0, spec, layouts)
    rank = spec.rank_for(path)
    fan_in, fan_out = layout.fan_in(w0.shape), layout.fan_out(w0.shape)
    if rank > min(fan_in, fan_out):
      raise LoraSpecError(
          f"'{path}': rank {rank} exceeds min(fan_in={fan_in}, fan_out={fan_out}) "
          f"of this weight (shape {tuple(w0.shape)})")
    a_shape, b_shape = layout.a_shape(w0.shape, rank), layout.b_shape(w0.shape, rank)
    a_sharding, b_sharding = factor_shardings(leaf_sharding(w0), layout, len(w0.shape))
    dtype = jnp.dtype(spec.dtype)
    if _is_abstract(w0):
      a = jax.ShapeDtypeStruct(a_shape, dtype, sharding=a_sharding)
      b = jax.ShapeDtypeStruct(b_shape, dtype, sharding=b_sharding)
    else:
      if key is None:
        raise LoraSpecError(
            f"lora_transform needs key=jax.random.key(...) to initialise A of '{path}' "
            f"(params are concrete arrays; only abstract params need no key)")
      pending.append((i, zlib.crc32(path.encode()) & 0x7FFFFFFF,
                      (a_shape, b_shape, fan_in, rank, spec.init, dtype), (a_sharding, b_sharding)))
      a = b = None
    trainable[i] = LoraParam(a=a, b=b, scale=spec.scale_for(path), layout=layout,
                             dropout=float(spec.dropout))
  if pending:
    hashes = np.array([h for _, h, _, _ in pending], np.uint32)
    factors = _init_factors(key, hashes, plans=tuple(plan for _, _, plan, _ in pending))
    for (i, _, _, (a_sharding, b_sharding)), (a, b) in zip(pending, factors):
      if a_sharding is not None:
        a, b = jax.device_put(a, a_sharding), jax.device_put(b, b_sharding)
      trainable[i] = dataclasses.replace(trainable[i], a=a, b=b)
  if inits.is_base_changing(spec.init):
    for i in targets:
      if is_weight_node(pairs[i][1]):
        raise LoraSpecError(f"'{pairs[i][0]}': init={spec.init!r} rewrites W0, which is "
                            f"quantized here; quantize the residual afterwards instead")
      if not _is_abstract(pairs[i][1]):
        frozen[i], trainable[i] = _from_base(pairs[i], trainable[i], spec, key)
      elif inits.is_loftq(spec.init):   # planning: the base is NF4 too
        frozen[i] = quantize_array(pairs[i][1], trainable[i].layout, path=pairs[i][0])
      # Marked, abstract or not: the adapter is relative to the residual W0.
      trainable[i] = dataclasses.replace(trainable[i], residual=spec.init)
  if spec.use_dora:
    for i in targets:
      trainable[i] = _with_magnitude(pairs[i][1], trainable[i])
  return treedef.unflatten(frozen), treedef.unflatten(trainable)


def _from_base(pair: tuple[str, Any], lp: LoraParam, spec: LoraSpec, key: jax.Array):
  """The residual W0 and the factors of a base-changing init (PiSSA, OLoRA)."""
  path, w0 = pair
  if inits.is_loftq(spec.init):   # quantizes as it goes: NumPy statistics, not jitted
    a, b, q = inits.loftq(spec.init, w0, lp.layout, lp.rank, lp.scale, lp.a.dtype)
    return q, dataclasses.replace(lp, a=a, b=b)
  key = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
  a, b, residual = _base_init(w0, key, init=spec.init, layout=lp.layout, rank=lp.rank,
                              scale=lp.scale, dtype=lp.a.dtype)
  a_sharding, b_sharding = factor_shardings(leaf_sharding(w0), lp.layout, len(w0.shape))
  if a_sharding is not None:
    a, b = jax.device_put(a, a_sharding), jax.device_put(b, b_sharding)
    residual = jax.device_put(residual, leaf_sharding(w0))
  return residual, dataclasses.replace(lp, a=a, b=b)


_base_init = functools.partial(jax.jit, static_argnames=("init", "layout", "rank", "scale",
                                                         "dtype"))(
    lambda w0, key, *, init, layout, rank, scale, dtype: inits.from_base(
        init, w0, layout, rank, scale, key, dtype))


def _with_magnitude(w0: Any, lp: LoraParam) -> DoraParam:
  """DoRA's pair and magnitude, the magnitude starting at W0's column norms."""
  lay = lp.layout
  if _is_abstract(w0):
    spec = leaf_sharding(w0)
    sharding = None
    if isinstance(spec, NamedSharding):
      entries = tuple(spec.spec) + (None,) * (len(w0.shape) - len(spec.spec))
      sharding = NamedSharding(spec.mesh, PartitionSpec(
          *(entries[i] for i in lay.stack_axes + lay.out_axes)))
    m = jax.ShapeDtypeStruct(tuple(w0.shape[i] for i in lay.stack_axes + lay.out_axes),
                             lp.a.dtype, sharding=sharding)
  else:
    dense = w0.dequantize(jnp.float32) if is_weight_node(w0) else jnp.asarray(w0, jnp.float32)
    m = column_norm(dense, lay).astype(lp.a.dtype)
  return DoraParam(a=lp.a, b=lp.b, magnitude=m, scale=lp.scale, layout=lay, dropout=lp.dropout,
                   residual=lp.residual)


def split_trees(frozen: Any, trainable: Any):
  """Pairs up the leaves of a frozen and a trainable tree, checking they match.

  Returns ``(paths, frozen_leaves, trainable_leaves, treedef)`` where the
  treedef has None leaves and LoraParam leaves kept whole.
  """
  f_pairs, f_def = flatten_with_paths(frozen)
  t_pairs, t_def = flatten_with_paths(trainable, is_leaf=is_adapter)
  if f_def != t_def:
    f_paths = {p for p, _ in f_pairs}
    t_paths = {p for p, _ in t_pairs}
    only_f, only_t = sorted(f_paths - t_paths), sorted(t_paths - f_paths)
    detail = (f"only in frozen: {only_f[:5]}; only in trainable: {only_t[:5]}"
              if only_f or only_t else f"frozen: {f_def}\ntrainable: {t_def}")
    raise LoraTreeError(
        f"frozen and trainable trees have different structures ({detail}); pass the "
        f"pair returned by one lora_transform call")
  paths = [p for p, _ in f_pairs]
  f_leaves = [leaf for _, leaf in f_pairs]
  t_leaves = [leaf for _, leaf in t_pairs]
  for path, f, t in zip(paths, f_leaves, t_leaves):
    if f is not None and t is not None and not is_adapter(t):
      raise LoraTreeError(f"'{path}' is a leaf of both frozen and trainable")
    if f is None and is_adapter(t):
      raise LoraTreeError(f"'{path}' has LoRA factors in trainable but no W0 in frozen")
    if is_adapter(t):
      check_factors(path, f, t)
  return paths, f_leaves, t_leaves, f_def


def check_factors(path: str, w0: Any, adapter: Adapter) -> None:
  """Raises LoraTreeError unless the adapter's arrays fit W0."""
  shape = tuple(w0.shape)
  if len(shape) != adapter.layout.ndim:
    raise LoraTreeError(f"'{path}': W0 has shape {shape} but the factors' layout "
                        f"{adapter.layout} is for a {adapter.layout.ndim}-D weight")
  want, got = adapter.factor_shapes(shape), adapter.array_shapes()
  if want != got:
    show = lambda shapes: " and ".join(f"{n}{s}" for n, s in zip("AB", shapes))  # noqa: E731
    raise LoraTreeError(f"'{path}': factors {show(got)} do not fit W0{shape}; expected "
                        f"{show(want)}")


def assemble(frozen: Any, trainable: Any):
  """The base leaves (W0 at adapted weights) plus the adapters by leaf index."""
  leaves, treedef, adapters, _ = assemble_with_paths(frozen, trainable)
  return leaves, treedef, adapters


def assemble_with_paths(frozen: Any, trainable: Any):
  """``assemble``, and the path of every leaf."""
  paths, f_leaves, t_leaves, treedef = split_trees(frozen, trainable)
  leaves, adapters = [], {}
  for i, (path, f, t) in enumerate(zip(paths, f_leaves, t_leaves)):
    if is_adapter(t):
      adapters[i] = (path, t)
      leaves.append(f)
    else:
      leaves.append(f if f is not None else t)
  return leaves, treedef, adapters, paths


def array_bytes(leaf: Any) -> int:
  return int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
