"""Quantized frozen weights for QLoRA: ``jlora.quantize`` and ``jlora.dequantize``.

``nf4`` holds the format (4-bit NormalFloat with double quantization, byte
for byte as bitsandbytes 0.50 stores it). The interpreter's view of a
quantized weight is ``jlora.interpret.nf4``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jlora._paths import flatten_with_paths, register_weight_node
from jlora.errors import LoraLayoutError, LoraSpecError
from jlora.layout import Layout
from jlora.quant.nf4 import NF4Array, check_block_size, quantize_array, quantized_nbytes
from jlora.spec import PathSelector, _compile_selector, _freeze_selector

register_weight_node(NF4Array)

__all__ = ["NF4Array", "dequantize", "quantize", "quantized_nbytes"]

DEFAULT_TARGETS = r".*kernel"


def _is_float_array(leaf: Any) -> bool:
  return (hasattr(leaf, "shape") and hasattr(leaf, "dtype")
          and jnp.issubdtype(jnp.dtype(leaf.dtype), jnp.floating))


def default_target(path: str, leaf: Any) -> bool:
  """The default selection: every floating-point ``...kernel`` of 2 or more axes."""
  return (not isinstance(leaf, NF4Array) and _is_float_array(leaf)
          and len(leaf.shape) >= 2 and _compile_selector(DEFAULT_TARGETS, "targets")(path, leaf))


def quantize_layout(path: str, leaf: Any, layouts: Mapping[str, Layout] | None) -> Layout:
  layout = layouts.get(path) if layouts is not None else None
  if layout is None:
    layout = Layout.default(len(leaf.shape))
  if layout is None:
    raise LoraLayoutError(
        f"'{path}': cannot tell the input and output axes of this {len(leaf.shape)}-D weight "
        f"(shape {tuple(leaf.shape)}), so not where its quantization blocks run. Pass "
        f"layouts=jlora.infer_layouts(fn, params, *example_args) (or a dict of "
        f"path -> jlora.Layout), or leave it out of targets.")
  return layout


def quantize(params: Any, targets: PathSelector | None = None, *, block_size: int = 64,
             double_quant: bool = True, layouts: Mapping[str, Layout] | None = None) -> Any:
  """Returns ``params`` with the selected weights stored in NF4 (``NF4Array``).

  The bytes are those bitsandbytes 0.50 writes with ``quantize_4bit(w,
  quant_type="nf4", compress_statistics=double_quant, blocksize=block_size)``
  for the PyTorch ``(out, in)`` weight of the layer: a Flax ``(in, out)``
  kernel is quantized as its transpose, each layer of an ``nn.scan`` stack on
  its own, a multi-axis kernel as ``(*out_axes, *in_axes)`` of its layout.
  Works on abstract params (``jax.ShapeDtypeStruct``), for planning.

  Args:
    params: the parameter pytree (weights already quantized are kept).
    targets: which weights to quantize, in ``LoraSpec``'s selector forms (a
      regex matched against the whole path, a list of path suffixes, or
      ``fn(path, leaf) -> bool``). Default: every floating-point kernel of 2
      or more axes (path matching ``.*kernel``), as QLoRA quantizes every
      linear layer.
    block_size: values per absmax block (bitsandbytes' sizes, 32 to 4096).
    double_quant: quantize the absmax values too (8 bits per block of 256;
      4.127 bits per parameter in all).
    layouts: path -> ``jlora.Layout`` (from ``jlora.infer_layouts``) for
      weights that are not plain 2-D ``(in, out)`` kernels; a weight of
      another rank without one is refused, naming its path.

  Raises:
    LoraSpecError: targets match nothing, or match a non-float leaf; a
      block_size that is not an int of bitsandbytes' sizes.
    LoraLayoutError: a selected weight's layout cannot be known.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> q = jlora.quantize({"dense": {"kernel": jnp.ones((256, 64)), "bias": jnp.ones(64)}})
    >>> type(q["dense"]["kernel"]).__name__, q["dense"]["bias"].shape
    ('NF4Array', (64,))
  """
  block_size = check_block_size(block_size)
  pairs, treedef = flatten_with_paths(params)
  if targets is None:
    select = default_target
  else:
    select = _compile_selector(_freeze_selector(targets, "targets"), "targets")
  out, chosen = [], 0
  for path, leaf in pairs:
    if leaf is None or isinstance(leaf, NF4Array) or not select(path, leaf):
      out.append(leaf)
      continue
    if not _is_float_array(leaf):
      raise LoraSpecError(
          f"'{path}' matches targets but is not a floating-point array "
          f"(got {getattr(leaf, 'dtype', type(leaf).__name__)}); only float weights are "
          f"quantized")
    layout = quantize_layout(path, leaf, layouts)
    out.append(quantize_array(leaf, layout, block_size=block_size,
                              double_quant=double_quant, path=path))
    chosen += 1
  if targets is not None and not chosen and not any(isinstance(l, NF4Array) for _, l in pairs):
    raise LoraSpecError(f"quantize: targets {targets!r} match no parameter")
  return treedef.unflatten(out)


def dequantize(tree: Any, dtype: Any = None) -> Any:
  """Every ``NF4Array`` of ``tree`` as a dense array (in its own dtype, or
  ``dtype``); other leaves unchanged.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> w = jnp.linspace(-1, 1, 128 * 64).reshape(128, 64)
    >>> back = jlora.dequantize(jlora.quantize({"kernel": w}))["kernel"]
    >>> back.shape, float(jnp.max(jnp.abs(back - w))) < 0.16   # half the widest NF4 gap
    ((128, 64), True)
  """
  return jax.tree_util.tree_map(
      lambda x: x.dequantize(dtype) if isinstance(x, NF4Array) else x, tree,
      is_leaf=lambda x: isinstance(x, NF4Array))
