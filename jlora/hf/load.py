"""``jlora.hf.load``: a Hugging Face checkpoint into a model's parameter tree, tensor by tensor.

Two passes. The first reads only the headers: every entry is mapped to its
parameter (or slice of a stacked one), and every shape, every missing or
unexpected entry and every quantized weight's state is checked before any
tensor is read. The second reads one entry at a time, transforms it (dense),
quantizes it (NF4, when selected) or takes the bytes bitsandbytes wrote (a
``*-bnb-4bit`` weight), and drops what it read before the next: host memory
holds the tree being built plus one tensor and its transform.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from jlora._paths import flatten_with_paths
from jlora.errors import LoraError, LoraFileError, LoraSpecError
from jlora.hf.mapping import Mapping, Target, apply, slice_layout, tunix_mapping
from jlora.hf.tensors import Checkpoint
from jlora.layout import Layout
from jlora.quant import nf4_files
from jlora.quant.nf4 import NF4Array, PARTS, check_block_size, quantize_array
from jlora.spec import _compile_selector, _freeze_selector


# The dtypes of dense parameters it reads (safetensors' names).
_FLOATS = ("BF16", "F16", "F32")


@dataclasses.dataclass
class _Plan:
  target: Target
  shape: tuple[int, ...]          # the (slice of the) parameter's shape
  state: Any = None               # jlora.bnb's quant State of a 4-bit weight
  quantize: bool = False


def _is_module(model: Any) -> bool:
  nnx = _nnx()
  return nnx is not None and isinstance(model, nnx.Module)


def _nnx():
  try:
    from flax import nnx
  except ImportError:   # no Flax: the tree is a plain pytree
    return None
  return nnx


def load(path: str | os.PathLike, model: Any, *, mapping: Mapping | None = None,
         quantize: Any = None, block_size: int = 64, double_quant: bool = True,
         dtype: Any = None) -> Any:
  """Reads a Hugging Face checkpoint into a model's parameters, tensor by tensor.

  ``path`` is what ``save_pretrained`` writes: a folder with ``config.json``
  and ``model.safetensors`` or the shards ``model.safetensors.index.json``
  lists (or one ``.safetensors`` file, whose architecture is then not
  checked), in bfloat16, float16 or float32. A ``*-bnb-4bit`` checkpoint's
  4-bit weights become ``jlora.NF4Array`` leaves of the file's bytes, not
  dequantized; ``quantize`` stores dense weights in NF4 as they are read, with
  the codes and absmax bitsandbytes' ``quantize_4bit`` gives the PyTorch
  weight. An NF4 model runs through ``jlora.nnx.lora`` (or ``jlora.lora``).

  Args:
    path: the checkpoint folder or file.
    model: a google-tunix Llama 3, Qwen 3 or Gemma 3 model (``nnx.Module``;
      an abstract one from ``nnx.eval_shape(lambda: Llama3(cfg, rngs=...))``
      costs no memory), or a parameter tree (nested dicts of arrays or
      ``jax.ShapeDtypeStruct``, an ``nnx.State``) with ``mapping``. Every
      parameter must be in the checkpoint with its shape.
    mapping: how PyTorch keys become parameter paths; default: Tunix's table
      for the model's family (``jlora.hf.tunix_mapping``).
    quantize: which weights to store in NF4 while loading: True for every
      linear weight but ``lm_head`` (as transformers' ``load_in_4bit``), or
      ``jlora.quantize``'s selector forms (regex on the parameter path, list of
      suffixes, ``fn(path, leaf)``); None: none.
    block_size: values per absmax block of the weights quantized here.
    double_quant: quantize their absmax values too.
    dtype: cast dense leaves to it; None keeps the checkpoint's dtype.

  Returns:
    A model of the same class (``nnx.merge`` of the model's graph and the
    loaded ``nnx.Param`` values; other variables kept), or a tree of the
    structure given.

  Raises:
    LoraError: a model family without a mapping. LoraFileError (one line,
      naming the file and entry): a checkpoint for another architecture, an
      entry no rule maps or a parameter no entry fills, a shape mismatch, a
      missing shard, a dtype it cannot read, a damaged file or quant state.

  Example:
    >>> import tempfile, numpy as np, safetensors.numpy, jax, jlora
    >>> d = tempfile.mkdtemp()
    >>> safetensors.numpy.save_file({"fc.weight": np.ones((64, 128), np.float32)},
    ...                             f"{d}/model.safetensors")
    >>> m = jlora.hf.Mapping({r"fc\\.weight": ("fc.kernel", ((1, 0), None))})
    >>> like = {"fc": {"kernel": jax.ShapeDtypeStruct((128, 64), np.float32)}}
    >>> jlora.hf.load(d, like, mapping=m, quantize=True)["fc"]["kernel"]
    NF4Array(shape=(128, 64), dtype=float32, double_quant, block_size=64, layout=Layout(in_axes=(0,), out_axes=(1,), stack_axes=()))
  """
  ck = Checkpoint(path)
  where = f"'{ck.where}'"
  block_size = check_block_size(block_size)
  graph = None
  if _is_module(model):
    nnx = _nnx()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    like, graph = params.to_pure_dict(), (graphdef, rest)
  elif _nnx() is not None and isinstance(model, _nnx().State):
    like, graph = model.to_pure_dict(), "state"
  else:
    like = model
  if mapping is None:
    try:
      mapping = tunix_mapping(model)
    except LoraError as e:
      raise type(e)(f"{where}: {e}") from None
  mapping.check_config(ck.config(required=bool(mapping.model_types or mapping.architectures)),
                       ck.where)
  pairs, treedef = flatten_with_paths(like)
  leaves = dict(pairs)
  plans = _plan(ck, mapping, leaves, quantize, where)
  out: dict[str, Any] = {}
  slices: dict[str, dict[int, Any]] = {}
  for key, plan in plans.items():
    value = _read(ck, plan, block_size, double_quant, dtype, where)
    t = plan.target
    if t.index is None:
      out[t.path] = value
    else:
      slices.setdefault(t.path, {})[t.index] = value
      if len(slices[t.path]) == leaves[t.path].shape[0]:
        out[t.path] = _stack(slices.pop(t.path), t.path, where)
  tree = treedef.unflatten([None if leaf is None else out[p] for p, leaf in pairs])
  if graph == "state":   # a new State: the one given is left as it was
    state = jax.tree.map(lambda x: x, model)
    state.replace_by_pure_dict(tree)
    return state
  if graph is not None:
    return _nnx().merge(graph[0], tree, graph[1])
  return tree


def _selector(quantize: Any):
  if quantize is None or quantize is False:
    return None
  if quantize is True:
    return lambda path, leaf, target, shape: target.linear(shape) and "lm_head" not in path
  select = _compile_selector(_freeze_selector(quantize, "quantize"), "quantize")
  return lambda path, leaf, target, shape: select(path, leaf)


def _plan(ck: Checkpoint, mapping: Mapping, leaves: dict[str, Any], quantize: Any,
          where: str) -> dict[str, _Plan]:
  """Every entry's target and shape, checked, from the headers alone (in file order)."""
  from jlora.bnb import quant_state   # bitsandbytes' entries, read as jlora.bnb reads them
  scan = quant_state.scan(ck)
  select = _selector(quantize)
  plans: dict[str, _Plan] = {}
  filled: dict[str, str] = {}
  chosen = 0
  for key in scan.dense + list(scan.states):
    state = scan.states.get(key)
    target = mapping.resolve(key, where)
    if target is None:
      continue
    shape, kind = state.out_in if state is not None else ck.info(key)[0], ck.info(key)[1]
    if state is None and kind not in _FLOATS:
      raise LoraFileError(f"{where}: '{key}' is {kind}; jlora reads parameters in "
                          f"{', '.join(_FLOATS)}")
    if leaves.get(target.path) is None:
      raise LoraFileError(f"{where}: '{key}' maps to '{target.path}', which the model does "
                          f"not have")
    leaf = leaves[target.path]
    got = target.shape(shape)
    want = tuple(leaf.shape) if target.index is None else tuple(leaf.shape[1:])
    if target.index is not None and not 0 <= target.index < (leaf.shape[0] if leaf.shape else 0):
      raise LoraFileError(f"{where}: '{key}' is slice {target.index} of '{target.path}' "
                          f"{tuple(leaf.shape)}, which has no such slice")
    if got != want:
      raise LoraFileError(f"{where}: '{key}' {tuple(shape)} makes '{target.path}' {got}, but "
                          f"the model's is {want}"
                          + ("" if target.index is None else f" (slice {target.index})"))
    slot = target.path + ("" if target.index is None else f"[{target.index}]")
    if slot in filled:
      raise LoraFileError(f"{where}: '{key}' and '{filled[slot]}' both map to '{slot}'")
    filled[slot] = key
    q = False
    if state is None and select is not None and select(target.path, leaf, target, shape):
      if not target.linear(shape):
        raise LoraSpecError(f"'{target.path}' matches quantize, but '{key}' {tuple(shape)} is "
                            f"not the weight of a linear layer; only those are stored in NF4")
      slice_layout(target, shape, where)
      q, chosen = True, chosen + 1
    elif state is not None:
      slice_layout(target, shape, where)
    plans[key] = _Plan(target, got, state, q)
  stacked = {t.target.path for t in plans.values() if t.target.index is not None}
  for p, leaf in leaves.items():
    if leaf is None:   # an empty slot of the tree (None) stays empty
      continue
    slots = [f"{p}[{i}]" for i in range(leaf.shape[0])] if p in stacked else [p]
    missing = [s for s in slots if s not in filled]
    if missing:
      raise LoraFileError(f"{where} has no entry for '{missing[0]}' (the model's "
                          f"'{p}' {tuple(leaf.shape)})")
  if quantize not in (None, False, True) and not chosen:
    raise LoraSpecError(f"quantize {quantize!r} matches no weight of {where}")
  # Read in file order: each shard front to back.
  order = sorted(plans, key=lambda k: (str(ck.file_of[k]), ck.entries[k].start))
  return {k: plans[k] for k in order}


def _read(ck: Checkpoint, plan: _Plan, block_size: int, double_quant: bool, dtype: Any,
          where: str) -> Any:
  target = plan.target
  if plan.state is not None:
    from jlora.bnb import quant_state
    parts = quant_state.arrays(ck, plan.state)
    layout = slice_layout(target, plan.state.out_in, where)
    arrays = {k: _to_jax(v) for k, v in parts.items()}
    return _nf4(arrays, plan.shape, plan.state.dtype, layout, plan.state.block_size,
                plan.state.double_quant, f"{where}: '{target.key}'")
  x = ck.get(target.key)
  if plan.quantize:
    layout = slice_layout(target, x.shape, where)
    # The PyTorch (out, in) weight row-major is the storage order of the parameter.
    q = quantize_array(_to_jax(x), Layout((1,), (0,)), block_size=block_size,
                       double_quant=double_quant, path=target.path)
    del x
    arrays = {k: getattr(q, k) for k in PARTS if getattr(q, k) is not None}
    return _nf4(arrays, plan.shape, q.dtype, layout, block_size, double_quant,
                f"{where}: '{target.key}'")
  x = apply(x, target)
  if dtype is not None:
    x = x.astype(jnp.dtype(dtype))
  return _to_jax(x)


def _to_jax(x: Any) -> jax.Array:
  """``x`` as a JAX array, using its buffer where the backend can (the CPU
  can): ``jnp.asarray`` would copy it, twice the tensor for a moment. The
  buffer is the reader's own, never written again."""
  return jax.device_put(x, may_alias=True)


def _nf4(arrays: dict, shape, dtype, layout: Layout, block_size: int, double_quant: bool,
         where: str) -> NF4Array:
  meta = {"quant": "nf4", "block_size": block_size, "double_quant": double_quant,
          "layout": {"in_axes": layout.in_axes, "out_axes": layout.out_axes,
                     "stack_axes": layout.stack_axes}}
  return nf4_files.from_file(arrays, shape, jnp.dtype(dtype).name, meta, where,
                             error=LoraFileError)


def _stack(parts: dict[int, Any], path: str, where: str) -> Any:
  """Slices 0..n-1 of a stacked parameter as one leaf."""
  values = [parts[i] for i in range(len(parts))]
  first = values[0]
  if not isinstance(first, NF4Array):
    if any(isinstance(v, NF4Array) for v in values):
      raise LoraFileError(f"{where}: some slices of '{path}' are NF4 and some are not")
    return jnp.stack(values)
  for v in values[1:]:
    if not isinstance(v, NF4Array) or (v.dtype, v.block_size, v.double_quant, v.layout) != (
        first.dtype, first.block_size, first.double_quant, first.layout):
      raise LoraFileError(f"{where}: the slices of '{path}' are not quantized alike "
                          f"({first!r} and {v!r})")
  lay = first.layout
  layout = Layout(tuple(a + 1 for a in lay.in_axes), tuple(a + 1 for a in lay.out_axes),
                  (0,) + tuple(a + 1 for a in lay.stack_axes))
  arrays = {k: jnp.stack([getattr(v, k) for v in values]) for k in PARTS
            if getattr(first, k) is not None}
  return NF4Array(*(arrays.get(k) for k in PARTS), shape=(len(values),) + first.shape,
                  dtype=first.dtype, layout=layout, block_size=first.block_size)
