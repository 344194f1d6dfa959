"""NF4: 4-bit NormalFloat weights with double quantization, as bitsandbytes stores them.

The format (QLoRA; bitsandbytes 0.50 ``quantize_4bit(quant_type="nf4",
compress_statistics=True)``), for one weight of ``n`` elements:

* the weight is read in **storage order**: a PyTorch ``(out, in)`` weight
  flattened row-major, so blocks run along the input axis of each output row.
  A Flax ``(in, out)`` kernel is stored as its transpose; a multi-axis kernel
  as ``(*out_axes, *in_axes)`` (its ``Layout``); each slice of a stack axis
  (the layer axis of an ``nn.scan`` stack) is quantized on its own, as the
  separate ``nn.Linear`` of a PyTorch model would be;
* blocks of ``block_size`` (64) consecutive values; the last block may be
  short. Each block keeps its absolute maximum ``absmax`` (float32);
* each value is divided by its block's absmax (a full block multiplies by the
  float32 reciprocal, the short last block divides, both clipped to [-1, 1])
  and rounded to the nearest of the 16 NF4 code values; a value exactly
  halfway between two codes takes the lower one. A block whose absmax is 0
  stores the code of 0.0;
* two codes share a byte, the earlier value in the high nibble; an odd count
  is padded with the code of 0.0. ``codes`` has ``ceil(n / 2)`` bytes;
* double quantization: the ``absmax`` values minus their mean (``offset``,
  float32) are quantized to 8 bits with bitsandbytes' signed dynamic map in
  blocks of 256, each with its own float32 scale (``nested_absmax``). The
  8-bit rounding is that of bitsandbytes' CPU kernel: a value ``v`` of a block
  with scale ``m`` becomes ``s = v * (1 / m)``, ``s`` is placed on a grid of
  65536 points over [-1, 1] (``trunc((s + 1) * 32767.5 + 0.5)`` in float32),
  and the code nearest to that grid point is stored.

Dequantization: ``absmax = dynamic[absmax_code] * nested_absmax + offset``,
then ``w = nf4[code] * absmax``, in float32, rounded to the weight's dtype.
With double quantization a weight costs 4 + 8/64 + 32/(64*256) = 4.127 bits
per parameter (plus one float32 offset per slice).

Where bytes can differ from a bitsandbytes run: the offset is the float32
mean of the absmax values computed as the correctly rounded float32 sum
divided by the count; PyTorch sums float32 with a vectorised cascade whose
last bit depends on the CPU's vector width and thread count, so its offset
may differ from ours by one unit in the last place (and the nested scales
with it). Given the same offset, every byte is equal; the 4-bit codes and the
float32 absmax never depend on it. Arrays that bitsandbytes wrote are used as
they are, whatever machine made them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _compat
from jlora.errors import LoraSpecError
from jlora.layout import Layout

#: The 16 NF4 code values (QLoRA; bitsandbytes ``get_4bit_type("nf4")``).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# Decision points between neighbouring codes, computed in float32.
_NF4_BOUNDS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)
_NF4_ZERO = 7   # the code of 0.0 (padding, and blocks whose absmax is 0)

#: Block size of the nested (double) quantization of the absmax values.
NESTED_BLOCK_SIZE = 256
#: Block sizes bitsandbytes accepts for 4-bit quantization.
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def check_block_size(block_size: Any, where: str = "block_size") -> int:
  """``block_size`` as an int, or LoraSpecError unless it is an integer (not
  a bool, not a float such as 64.0) in ``BLOCK_SIZES``."""
  if (isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, (int, np.integer))
      or int(block_size) not in BLOCK_SIZES):
    raise LoraSpecError(f"{where} must be an int, one of {BLOCK_SIZES} (as bitsandbytes), "
                        f"got {block_size!r}")
  return int(block_size)


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
  """A float32 linspace evaluated as PyTorch's CPU kernel does: each point
  rounded once from ``start + step * i`` (first half) or ``stop - step *
  (num - 1 - i)`` (second half), with a float32 ``step``."""
  a, b = np.float32(start), np.float32(stop)
  step = np.float64((b - a) / np.float32(num - 1))
  i = np.arange(num, dtype=np.float64)
  lo = (np.float64(a) + step * i).astype(np.float32)
  hi = (np.float64(b) - step * (num - 1 - i)).astype(np.float32)
  return np.where(i < num // 2, lo, hi)


def _dynamic_map() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic map (Dettmers, 8-bit approximations):
  for exponent e = 0..6, the midpoints of 2**e + 1 evenly spaced fractions in
  [0.1, 1], scaled by 10**(e - 6), with both signs, plus 0 and 1; sorted."""
  values = [np.float32(0.0), np.float32(1.0)]
  for e in range(7):
    edges = _linspace_f32(0.1, 1.0, 2 ** e + 1)
    mids = (edges[:-1] + edges[1:]) / np.float32(2)
    scaled = (np.float32(10.0 ** (e - 6)) * mids).astype(np.float32)
    values += list(scaled) + list(-scaled)
  return np.sort(np.array(values, np.float32))


#: The 256 values of the 8-bit map used for the absmax codes.
DYNAMIC_CODE = _dynamic_map()


def _dynamic_lut() -> np.ndarray:
  grid = np.arange(65536, dtype=np.float64) / 32767.5 - 1.0
  order = np.searchsorted(DYNAMIC_CODE.astype(np.float64), grid)
  lo = np.clip(order - 1, 0, 255)
  hi = np.clip(order, 0, 255)
  pick_hi = (np.abs(DYNAMIC_CODE[hi].astype(np.float64) - grid)
             < np.abs(grid - DYNAMIC_CODE[lo].astype(np.float64)))
  return np.where(pick_hi, hi, lo).astype(np.uint8)


_DYNAMIC_LUT = _dynamic_lut()


# -- the arithmetic (jnp, along the last axis; leading axes are stack slices) ------------


def _rounded(x: jax.Array) -> jax.Array:
  """``x`` as computed, kept from XLA's algebraic rewrites: a division by a
  constant or by a broadcast scalar becomes a multiplication by its
  reciprocal otherwise, which changes the last bit."""
  return jax.lax.optimization_barrier(x)


def _blocks(x: jax.Array, block: int) -> jax.Array:
  """``(..., n)`` -> ``(..., ceil(n / block), block)``, zero-padded."""
  n = x.shape[-1]
  nb = -(-n // block)
  pad = nb * block - n
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(x.shape[:-1] + (nb, block))


def _quantize_nf4(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """4-bit codes (packed) and float32 absmax of ``x`` (..., n)."""
  n = x.shape[-1]
  full = n // block
  b = _blocks(x.astype(jnp.float32), block)
  absmax = jnp.max(jnp.abs(b), axis=-1)
  safe = jnp.where(absmax > 0, absmax, jnp.float32(1))[..., None]
  parts = []
  if full:   # full blocks: times the float32 reciprocal
    parts.append(b[..., :full, :] * (jnp.float32(1) / safe[..., :full, :]))
  if full < b.shape[-2]:   # the short last block: divided (by a full array, so that
    tail = b[..., full:, :]  # XLA does not turn it into a multiplication by 1 / absmax)
    parts.append(tail / _rounded(jnp.broadcast_to(safe[..., full:, :], tail.shape)))
  scaled = jnp.clip(jnp.concatenate(parts, axis=-2) if len(parts) > 1 else parts[0], -1, 1)
  q = jnp.zeros(scaled.shape, jnp.uint8)
  for bound in _NF4_BOUNDS:   # count of decision points strictly below the value
    q = q + (scaled > bound).astype(jnp.uint8)
  q = jnp.where((absmax > 0)[..., None], q, jnp.uint8(_NF4_ZERO))
  q = q.reshape(q.shape[:-2] + (-1,))[..., :n]
  return _pack(q), absmax


def _pack(q: jax.Array) -> jax.Array:
  if q.shape[-1] % 2:
    q = jnp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, 1)], constant_values=_NF4_ZERO)
  return (q[..., 0::2] << 4) | q[..., 1::2]


def _unpack(codes: jax.Array) -> jax.Array:
  hi, lo = codes >> 4, codes & 15
  return jnp.stack([hi, lo], axis=-1).reshape(codes.shape[:-1] + (2 * codes.shape[-1],))


# The per-block statistics (absmax codes, nested scales, offset) are a 64th of
# the weight. On concrete arrays they are computed with NumPy, one rounding
# per operation as bitsandbytes does; XLA:CPU would contract a multiply and
# an add into one fused multiply-add. Under a trace (``jax.jit(quantize)``,
# inside a training step) the same code runs with jax.numpy, where a value
# may differ in its last bit (never a 4-bit code).


def _xp(*arrays: Any) -> Any:
  """NumPy for concrete arrays, jax.numpy under a trace."""
  return jnp if any(_compat.is_tracer(a) for a in arrays if a is not None) else np


def _to_xp(x: Any, xp: Any) -> Any:
  return np.asarray(x) if xp is np else x


def _blocks_xp(x: Any, block: int, xp: Any) -> Any:
  n = x.shape[-1]
  nb = -(-n // block)
  if nb * block != n:
    x = xp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * block - n)])
  return x.reshape(x.shape[:-1] + (nb, block))


def _sum_f32(x: Any, xp: Any = jnp) -> Any:
  """The float32 sum over the last axis, correctly rounded but for the error
  of the compensation itself: a pairwise sum whose rounding errors are kept
  exactly (TwoSum) and added back at the end."""
  hi = x.astype(np.float32)
  m = hi.shape[-1]
  width = 1 << max(m - 1, 0).bit_length()
  if width != m:   # zeros add exactly
    hi = xp.pad(hi, [(0, 0)] * (hi.ndim - 1) + [(0, width - m)])
  lo = xp.zeros_like(hi)
  lead = hi.shape[:-1]
  while width > 1:
    width //= 2
    pairs = hi.reshape(lead + (width, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    lo = lo.reshape(lead + (width, 2)).sum(-1) + err
    hi = s
  return (hi + lo)[..., 0]


def _mean_f32(x: Any, xp: Any = jnp) -> Any:
  total = _sum_f32(x, xp)
  count = xp.full(total.shape, x.shape[-1], np.float32)
  if xp is jnp:
    total, count = _rounded(total), _rounded(count)
  return total / count


def _quantize_dynamic(v: Any, xp: Any = None) -> tuple[Any, Any]:
  """8-bit codes of ``v`` (..., m) on the dynamic map in blocks of 256, and
  each block's float32 scale, rounded as bitsandbytes' CPU kernel rounds:
  ``s = v * (1 / scale)``, the grid point ``trunc((s + 1) * 32767.5 + 0.5)``
  (computed as ``floor(g) + (g >= floor(g) + 0.5)``, the same for these
  values), and the code nearest that grid point."""
  xp = xp or _xp(v)
  v = _to_xp(v, xp).astype(np.float32)
  m = v.shape[-1]
  b = _blocks_xp(v, NESTED_BLOCK_SIZE, xp)
  scale = xp.max(xp.abs(b), axis=-1)
  with np.errstate(divide="ignore", invalid="ignore"):
    s = b * (np.float32(1) / scale)[..., None]   # 0 * inf = NaN: an all-zero block
    g = (s + np.float32(1)) * np.float32(32767.5)
    f = xp.floor(g)
    grid = f + (g >= f + np.float32(0.5)).astype(np.float32)
    grid = xp.where(xp.isnan(g), 0, xp.clip(grid, 0, 65535)).astype(np.int32)
  q = xp.asarray(_DYNAMIC_LUT)[grid]
  return q.reshape(q.shape[:-2] + (-1,))[..., :m], scale


def double_quantize(absmax: Any) -> tuple[Any, Any, Any]:
  """``(codes, nested_absmax, offset)`` of float32 ``absmax`` (..., n_blocks)."""
  xp = _xp(absmax)
  absmax = _to_xp(absmax, xp).astype(np.float32)
  offset = _mean_f32(absmax, xp)
  codes, nested = _quantize_dynamic(absmax - offset[..., None], xp)
  if xp is np:
    return jnp.asarray(codes), jnp.asarray(nested), jnp.asarray(offset)
  return codes, nested, offset


def dequantize_absmax(absmax: Any, nested_absmax: Any, offset: Any) -> Any:
  """The float32 absmax per block: ``dynamic[code] * nested_absmax + offset``
  (multiplied, rounded, then added), or ``absmax`` itself."""
  if nested_absmax is None:
    return absmax.astype(jnp.float32)
  xp = _xp(absmax, nested_absmax, offset)
  codes, nested, offset = (_to_xp(x, xp) for x in (absmax, nested_absmax, offset))
  scale = xp.repeat(nested, NESTED_BLOCK_SIZE, axis=-1)[..., :codes.shape[-1]]
  out = xp.asarray(DYNAMIC_CODE)[codes.astype(np.int32)] * scale + offset[..., None]
  return jnp.asarray(out) if xp is np else out


def dequantize_flat(codes: jax.Array, scale: jax.Array, n: int, block_size: int) -> jax.Array:
  """The float32 values (..., n) in storage order, given the float32 absmax
  ``scale`` (..., n_blocks) from ``dequantize_absmax``."""
  nb = scale.shape[-1]
  idx = _unpack(codes).astype(jnp.int32)
  total = nb * block_size
  if idx.shape[-1] >= total:
    idx = idx[..., :total]
  else:
    idx = jnp.pad(idx, [(0, 0)] * (idx.ndim - 1) + [(0, total - idx.shape[-1])],
                  constant_values=_NF4_ZERO)
  vals = jnp.asarray(NF4_CODE)[idx].reshape(idx.shape[:-1] + (nb, block_size))
  w = (vals * scale[..., None]).reshape(idx.shape[:-1] + (total,))
  return w[..., :n]


def dequantize_view(codes: jax.Array, absmax: jax.Array, nested_absmax: Any, offset: Any, *,
                    n: int, block_size: int, storage_shape: tuple[int, ...],
                    perm: tuple[int, ...], stored_dtype: Any, view_dtype: Any) -> jax.Array:
  """``transpose(dequantized storage reshaped to storage_shape, perm)`` in
  ``view_dtype``: a weight (or a view of it) dequantized."""
  scale = dequantize_absmax(absmax, nested_absmax, offset)
  return _dequantize_view(codes, scale, n=n, block_size=block_size,
                          storage_shape=tuple(storage_shape), perm=tuple(perm),
                          stored_dtype=jnp.dtype(stored_dtype), view_dtype=jnp.dtype(view_dtype))


@functools.partial(jax.jit, static_argnames=("n", "block_size", "storage_shape", "perm",
                                             "stored_dtype", "view_dtype"))
def _dequantize_view(codes, scale, *, n, block_size, storage_shape, perm, stored_dtype,
                     view_dtype):
  flat = dequantize_flat(codes, scale, n, block_size)
  w = flat.reshape(storage_shape)
  if tuple(perm) != tuple(range(len(perm))):
    w = jnp.transpose(w, perm)
  return round_to(w, stored_dtype, view_dtype)


def round_to(w: jax.Array, stored: Any, dtype: Any) -> jax.Array:
  """float32 ``w`` as the weight of dtype ``stored`` seen as ``dtype``: rounded
  to ``stored`` first when that is narrower (bitsandbytes returns the stored
  dtype), then cast."""
  stored, dtype = jnp.dtype(stored), jnp.dtype(dtype)
  if stored.itemsize < 4:
    w = w.astype(stored)
  return w.astype(dtype)


# -- the pytree ------------------------------------------------------------------------


def _static(**kw):
  return dataclasses.field(metadata=dict(static=True), **kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NF4Array:
  """A weight stored in NF4, byte-compatible with bitsandbytes.

  A pytree: its arrays are the leaves, so it passes through ``jax.jit``,
  ``jax.device_put`` and ``jax.eval_shape`` like any parameter (abstract
  when its leaves are ``jax.ShapeDtypeStruct``). ``shape`` and ``dtype`` are
  those of the weight it stands for, so ``jlora.lora_transform``,
  ``jlora.infer_layouts`` and ``jlora.summary`` treat it as that weight.

  Attributes:
    codes: uint8, ``(*stack, ceil(n / 2))``: the 4-bit codes, two per byte,
      of each slice's ``n`` values in storage order (see ``jlora.quant.nf4``).
    absmax: per block of ``block_size``: float32, or with double quantization
      the uint8 codes of ``absmax - offset``; ``(*stack, n_blocks)``.
    nested_absmax: float32 scale per 256 absmax codes, ``(*stack,
      ceil(n_blocks / 256))``; None without double quantization.
    offset: float32 mean of each slice's absmax, ``(*stack,)``; None without
      double quantization.
    shape: the weight's shape (as the model sees it).
    dtype: the weight's dtype before quantization; ``dequantize`` returns it.
    layout: which weight axes are input, output and stack axes; the storage
      order of a slice is ``(*out_axes, *in_axes)``, row-major.
    block_size: values per absmax block.

  Raises:
    LoraSpecError: where it is built (by the constructor, ``dataclasses.replace``
      or JAX rebuilding the pytree), when the arrays do not fit ``shape``,
      ``layout`` and ``block_size`` (lengths, stack axes, dtypes, both or
      neither of ``nested_absmax`` and ``offset``), or a static field is not
      valid.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> q = jlora.quantize({"kernel": jnp.ones((128, 64))})["kernel"]
    >>> q.shape, q.codes.shape, q.absmax.dtype, q.bits_per_param
    ((128, 64), (4096,), dtype('uint8'), 4.1328125)
  """

  codes: Any
  absmax: Any
  nested_absmax: Any
  offset: Any
  shape: tuple[int, ...] = _static()
  dtype: Any = _static()
  layout: Layout = _static()
  block_size: int = _static(default=64)

  def __post_init__(self):
    _validate(self)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def double_quant(self) -> bool:
    return self.nested_absmax is not None

  @property
  def nbytes(self) -> int:
    """Bytes of the stored arrays."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(self))

  @property
  def bits_per_param(self) -> float:
    return 8.0 * self.nbytes / max(self.size, 1)

  @property
  def stack_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[i] for i in self.layout.stack_axes)

  @property
  def storage_perm(self) -> tuple[int, ...]:
    """Weight axes in storage order: stack, then output, then input axes."""
    lay = self.layout
    return lay.stack_axes + lay.out_axes + lay.in_axes

  @property
  def slice_size(self) -> int:
    lay = self.layout
    return math.prod(self.shape[i] for i in lay.out_axes + lay.in_axes)

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The dense weight, computed in float32 and returned in ``dtype``
    (default: the dtype it had before quantization)."""
    perm = self.storage_perm
    return dequantize_view(
        self.codes, self.absmax, self.nested_absmax, self.offset, n=self.slice_size,
        block_size=self.block_size, storage_shape=tuple(self.shape[i] for i in perm),
        perm=tuple(perm.index(axis) for axis in range(len(perm))), stored_dtype=self.dtype,
        view_dtype=self.dtype if dtype is None else dtype)

  def __repr__(self) -> str:
    dq = "double_quant, " if self.double_quant else ""
    return (f"NF4Array(shape={self.shape}, dtype={jnp.dtype(self.dtype).name}, "
            f"{dq}block_size={self.block_size}, layout={self.layout})")


def _array_like(x: Any) -> bool:
  return isinstance(getattr(x, "shape", None), tuple) and getattr(x, "dtype", None) is not None


def _validate(q: NF4Array) -> None:
  """Normalizes the static fields of ``q`` and raises LoraSpecError unless its
  arrays are those of a weight of ``q.shape`` quantized with ``q.block_size``.

  JAX rebuilds an ``NF4Array`` from whatever its leaves are mapped to: tracers
  (whose leading axes a ``vmap`` or a ``scan`` has taken away), shardings,
  ``None`` or ``object()`` sentinels (``vmap``'s axis trees), float0
  tangents. The arrays are checked only when both packed arrays are arrays
  with a shape; the leading (stack) axes only when none is a tracer.
  """
  where = f"NF4Array of shape {getattr(q, 'shape', None)!r}"
  set_ = functools.partial(object.__setattr__, q)
  try:
    shape = tuple(operator.index(d) for d in q.shape)
    if any(d < 0 for d in shape):
      raise TypeError
  except TypeError:
    raise LoraSpecError(f"{where}: shape must be a tuple of non-negative ints") from None
  set_("shape", shape)
  where = f"NF4Array of shape {shape}"
  set_("block_size", check_block_size(q.block_size, f"{where}: block_size"))
  try:
    dtype = jnp.dtype(q.dtype)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise LoraSpecError(f"{where}: dtype must be the floating-point dtype of the weight, "
                        f"got {q.dtype!r}")
  set_("dtype", dtype)
  lay = q.layout
  if not isinstance(lay, Layout):
    raise LoraSpecError(f"{where}: layout must be a jlora.Layout, got {lay!r}")
  if sorted(lay.in_axes + lay.out_axes + lay.stack_axes) != list(range(len(shape))):
    raise LoraSpecError(f"{where}: layout {lay} does not partition the weight's "
                        f"{len(shape)} axes")

  arrays = {name: getattr(q, name) for name in PARTS}
  if not (_array_like(q.codes) and _array_like(q.absmax)) or not all(
      x is None or _array_like(x) for x in arrays.values()):
    return   # a tree of shardings, axes or sentinels: nothing to check
  if any(x is not None and jnp.dtype(x.dtype) == jax.dtypes.float0 for x in arrays.values()):
    return   # tangents of the packed arrays
  dq = q.nested_absmax is not None
  if dq != (q.offset is not None):
    have, lacks = ("nested_absmax", "offset") if dq else ("offset", "nested_absmax")
    raise LoraSpecError(f"{where}: has {have} but not {lacks}; double quantization needs "
                        f"both, plain NF4 neither")
  want = part_specs(shape, q.layout, q.block_size, dq)
  traced = any(_compat.is_tracer(x) for x in arrays.values())
  for name, (spec_shape, spec_dtype) in want.items():
    x = arrays[name]
    got_shape, got_dtype = tuple(x.shape), jnp.dtype(x.dtype).name
    # A tracer may lack the stack axes a vmap or a scan took away, or carry
    # the axes they stack outputs on; its last axis (per slice) must agree.
    fits = (name == "offset" or got_shape[-1:] == spec_shape[-1:]) if traced else (
        got_shape == spec_shape)
    if not fits or got_dtype != spec_dtype:
      raise LoraSpecError(
          f"{where}: {name} is shape {got_shape} dtype {got_dtype}, expected shape "
          f"{spec_shape} dtype {spec_dtype} ({_PART_MEANING[name]}, for "
          f"{'double-quantized' if dq else 'plain'} NF4 with block_size {q.block_size} and "
          f"layout {q.layout})")


_PART_MEANING = {
    "codes": "two 4-bit codes per byte of each slice's values",
    "absmax": "one entry per block: uint8 codes with double quantization, float32 without",
    "nested_absmax": "one float32 scale per 256 absmax codes",
    "offset": "one float32 mean per slice",
}


def quantized_nbytes(shape, layout: Layout, block_size: int = 64,
                     double_quant: bool = True) -> int:
  """Bytes of the NF4Array that ``quantize`` makes of a weight of ``shape``."""
  stack = math.prod(shape[i] for i in layout.stack_axes)
  n = math.prod(shape[i] for i in layout.out_axes + layout.in_axes)
  nb = -(-n // block_size)
  per_slice = -(-n // 2)
  if double_quant:
    per_slice += nb + 4 * -(-nb // NESTED_BLOCK_SIZE) + 4
  else:
    per_slice += 4 * nb
  return stack * per_slice


@functools.partial(jax.jit, static_argnames=("perm", "n_stack", "block_size"))
def _quantize_leaf(w, *, perm, n_stack, block_size):
  x = jnp.transpose(w, perm)
  return _quantize_nf4(x.reshape(x.shape[:n_stack] + (-1,)), block_size)


def _quantize_all(w, *, perm, n_stack, block_size, double_quant):
  codes, absmax = _quantize_leaf(w, perm=perm, n_stack=n_stack, block_size=block_size)
  if not double_quant:
    return codes, absmax, None, None
  return (codes, *double_quantize(absmax))


def quantize_array(w: Any, layout: Layout, *, block_size: int = 64,
                   double_quant: bool = True, path: str = "weight") -> NF4Array:
  """One weight (array or ``jax.ShapeDtypeStruct``) as an ``NF4Array``."""
  block_size = check_block_size(block_size)
  shape, dtype = tuple(w.shape), jnp.dtype(w.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise LoraSpecError(f"'{path}': only floating-point weights can be quantized (got {dtype})")
  layout.check(shape, path)
  if 0 in shape:
    raise LoraSpecError(f"'{path}': cannot quantize an empty weight (shape {shape})")
  perm = layout.stack_axes + layout.out_axes + layout.in_axes
  fn = functools.partial(_quantize_all, perm=perm, n_stack=len(layout.stack_axes),
                         block_size=block_size, double_quant=double_quant)
  if isinstance(w, jax.ShapeDtypeStruct):
    parts = jax.eval_shape(fn, w)
  else:
    parts = fn(w)
  return NF4Array(*parts, shape=shape, dtype=dtype, layout=layout, block_size=block_size)


#: The array fields of an ``NF4Array``, in the order files list them.
PARTS = ("codes", "absmax", "nested_absmax", "offset")


def part_specs(shape, layout: Layout, block_size: int = 64,
               double_quant: bool = True) -> dict[str, tuple[tuple[int, ...], str]]:
  """name -> ``(shape, dtype name)`` of each array an ``NF4Array`` of a weight
  of ``shape`` holds (the fields that are None are left out).

  Example:
    >>> part_specs((128, 64), Layout((0,), (1,)))
    {'codes': ((4096,), 'uint8'), 'absmax': ((128,), 'uint8'), 'nested_absmax': ((1,), 'float32'), 'offset': ((), 'float32')}
  """
  stack = tuple(int(shape[i]) for i in layout.stack_axes)
  n = math.prod(int(shape[i]) for i in layout.out_axes + layout.in_axes)
  nb = -(-n // block_size)
  out = {"codes": (stack + (-(-n // 2),), "uint8"),
         "absmax": (stack + (nb,), "uint8" if double_quant else "float32")}
  if double_quant:
    out["nested_absmax"] = (stack + (-(-nb // NESTED_BLOCK_SIZE),), "float32")
    out["offset"] = (stack, "float32")
  return out
