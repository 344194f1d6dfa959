"""The quant states of a bitsandbytes 4-bit checkpoint, and the arrays they describe.

Each quantized ``nn.Linear`` (PyTorch module ``M``) has the entries listed
in ``jlora.bnb``'s docstring; ``M.weight.quant_state.bitsandbytes__nf4``
holds, as uint8 JSON bytes, what the others mean. ``scan`` sorts a
checkpoint's entries into quantized weights (a ``State`` each, its entries
all accounted for) and dense entries; ``arrays`` reads one weight's entries
as the arrays of a ``jlora.NF4Array``, each checked against its state;
``state_json`` writes a state as bitsandbytes does. What jlora cannot read
faithfully (FP4 or 8-bit weights, another quant map, unknown keys, shapes
that do not fit, block absmaxes that cannot be a block's largest magnitude)
is refused with one line naming the entry.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax.numpy as jnp
import numpy as np

from jlora.bnb.files import Files, one_line
from jlora.errors import LoraFileError
from jlora.quant import nf4, nf4_files
from jlora.quant.nf4 import NF4Array

# The quant state's key is the weight's key, this, and the quant type ("nf4").
STATE = nf4_files.BNB_STATE
# The entries beside a quantized weight, by its key's suffix.
PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
# Entries of bitsandbytes' 8-bit (LLM.int8) weights.
_INT8 = (".SCB", ".weight_format")
# The dtypes a quant state may name (torch's names, as bitsandbytes writes them).
DTYPES = ("float32", "bfloat16", "float16")
_STATE_KEYS = {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize",
               "nested_dtype", "nested_offset"}
_NESTED_KEYS = ("nested_blocksize", "nested_dtype", "nested_offset")


@dataclasses.dataclass(frozen=True)
class State:
  """What one quant state says about its weight."""
  key: str                      # the weight's entry, "M.weight"
  out_in: tuple[int, int]       # the PyTorch weight's shape
  dtype: str
  block_size: int
  offset: float | None          # None without double quantization

  @property
  def double_quant(self) -> bool:
    return self.offset is not None

  @property
  def size(self) -> int:
    return self.out_in[0] * self.out_in[1]

  def entries(self) -> list[str]:
    out = [self.key] + [self.key + s for s in PARTS[:2]]
    if self.double_quant:
      out += [self.key + s for s in PARTS[2:]]
    return out + [self.key + STATE + "nf4"]

  def same_format(self, other: "State") -> bool:
    return (self.out_in, self.dtype, self.block_size, self.double_quant) == (
        other.out_in, other.dtype, other.block_size, other.double_quant)

  def describe(self) -> str:
    dq = ", double quantization" if self.double_quant else ""
    return (f"NF4 {self.dtype} (out, in) {self.out_in}, block size {self.block_size}{dq}")


def _no_constant(name: str):
  raise ValueError(f"{name} is not a number")


def parse_state(files: Files, state_key: str) -> State:
  """The quant state at ``state_key`` (``M.weight.quant_state.bitsandbytes__nf4``)."""
  key = state_key[:-len(STATE + "nf4")]
  where = f"'{files.file_of[state_key]}': '{state_key}'"
  raw = files.get(state_key)
  try:
    if raw.dtype != np.uint8 or raw.ndim != 1:
      raise ValueError(f"it is {raw.dtype} of shape {raw.shape}, not uint8 bytes")
    state = json.loads(raw.tobytes().decode("utf-8"), parse_constant=_no_constant)
    if not isinstance(state, dict):
      raise ValueError("not a JSON object")
    unknown = sorted(set(state) - _STATE_KEYS)
    if unknown:
      raise ValueError(f"unknown entries {unknown}")
    if state.get("quant_type") != "nf4":
      raise ValueError(f"quant_type {state.get('quant_type')!r} is not 'nf4'")
    block_size = state.get("blocksize")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or (
        block_size not in nf4.BLOCK_SIZES):
      raise ValueError(f"blocksize {block_size!r} is not one of {nf4.BLOCK_SIZES}")
    if state.get("dtype") not in DTYPES:
      raise ValueError(f"dtype {state.get('dtype')!r} is not one of {DTYPES}")
    shape = state.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
      raise ValueError(f"shape {shape!r} is not the [out, in] of a linear weight")
    nested = [k for k in _NESTED_KEYS if k in state]
    offset = None
    if nested:
      if len(nested) != len(_NESTED_KEYS):
        raise ValueError(f"it has {nested} but not all of {list(_NESTED_KEYS)}")
      if state["nested_blocksize"] != nf4.NESTED_BLOCK_SIZE:
        raise ValueError(f"nested_blocksize {state['nested_blocksize']!r} is not "
                         f"{nf4.NESTED_BLOCK_SIZE}")
      if state["nested_dtype"] != "float32":
        raise ValueError(f"nested_dtype {state['nested_dtype']!r} is not 'float32'")
      offset = state["nested_offset"]
      if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(
          offset):
        raise ValueError(f"nested_offset {offset!r} is not a finite number")
      offset = float(np.float32(offset))   # bitsandbytes keeps it in float32
  except (ValueError, UnicodeDecodeError, RecursionError) as e:
    raise LoraFileError(f"{where}: not a 4-bit NF4 quant state jlora can read "
                        f"({one_line(e)})") from None
  return State(key, (shape[0], shape[1]), state["dtype"], block_size, offset)


@dataclasses.dataclass
class Scan:
  """A checkpoint's entries, sorted by ``scan``."""
  states: dict[str, State]      # weight key -> state
  dense: list[str]              # every other entry


def scan(files: Files) -> Scan:
  """The quantized weights and the dense entries of a checkpoint, with every
  entry accounted for."""
  keys = files.keys()
  states: dict[str, State] = {}
  for k in keys:
    if STATE not in k:
      continue
    kind = k.rpartition(STATE)[2]
    if kind != "nf4":
      why = ("FP4 codes have other values than NF4's" if kind == "fp4"
             else "jlora knows only 'nf4'")
      raise LoraFileError(f"'{files.file_of[k]}': '{k}' is a 4-bit '{kind}' quant state; "
                          f"jlora reads NF4 weights only (bnb_4bit_quant_type='nf4'): {why}")
    state = parse_state(files, k)
    states[state.key] = state
  owned = set()
  for state in states.values():
    want = state.entries()
    missing = [e for e in want if e not in files.file_of]
    if missing:
      raise LoraFileError(f"'{files.where}': '{missing[0]}' is missing (the quantized weight "
                          f"'{state.key}' needs it)")
    extra = [state.key + s for s in PARTS if state.key + s not in want
             and state.key + s in files.file_of]
    if extra:
      raise LoraFileError(f"'{files.where}': '{extra[0]}' is there, but the quant state of "
                          f"'{state.key}' has no double quantization")
    owned.update(want)
  dense = []
  for k in keys:
    if k in owned:
      continue
    if k.endswith(_INT8):
      raise LoraFileError(f"'{files.file_of[k]}': '{k}' belongs to an 8-bit (LLM.int8, "
                          f"load_in_8bit) weight; jlora reads 4-bit NF4 checkpoints only")
    if k.endswith(PARTS):
      raise LoraFileError(f"'{files.file_of[k]}': '{k}' belongs to a quantized weight without "
                          f"its quant state '{k.rsplit('.', 1)[0]}{STATE}nf4'")
    dense.append(k)
  return Scan(states, dense)


def _checked(files: Files, key: str, shape: tuple[int, ...], dtype: str, state: State
             ) -> np.ndarray:
  got_shape, got_dtype = files.info(key)
  if got_shape != shape or got_dtype != dtype:
    raise LoraFileError(f"'{files.file_of[key]}': '{key}' is {got_dtype} {got_shape}, but "
                        f"{state.describe()} needs {dtype} {shape}")
  return files.get(key)


def arrays(files: Files, state: State) -> dict[str, np.ndarray]:
  """The NF4Array arrays of one quantized weight, each checked."""
  key, n = state.key, state.size
  nb = -(-n // state.block_size)
  w = files.get(key)
  codes = np.ascontiguousarray(w).reshape(-1).view(np.uint8)
  if codes.size != -(-n // 2):
    raise LoraFileError(f"'{files.file_of[key]}': '{key}' holds {codes.size} bytes of codes "
                        f"({w.dtype} {w.shape}), but {state.describe()} needs {-(-n // 2)}")
  out = {"codes": codes}
  if state.double_quant:
    out["absmax"] = _checked(files, key + ".absmax", (nb,), "U8", state)
    out["nested_absmax"] = _checked(files, key + ".nested_absmax",
                                    (-(-nb // nf4.NESTED_BLOCK_SIZE),), "F32", state)
    out["offset"] = np.float32(state.offset)
    table = _checked(files, key + ".nested_quant_map", (256,), "F32", state)
    if table.view(np.uint32).tolist() != nf4.DYNAMIC_CODE.view(np.uint32).tolist():
      raise LoraFileError(f"'{files.file_of[key]}': '{key}.nested_quant_map' is not "
                          f"bitsandbytes' signed dynamic 8-bit map, which jlora dequantizes "
                          f"with")
  else:
    out["absmax"] = _checked(files, key + ".absmax", (nb,), "F32", state)
  if not files.checksummed(key):   # jlora's own: verified, read back as it was written
    _check_absmax(files, state, out)
  table = _checked(files, key + ".quant_map", (16,), "F32", state)
  if table.view(np.uint32).tolist() != nf4.NF4_CODE.view(np.uint32).tolist():
    raise LoraFileError(f"'{files.file_of[key]}': '{key}.quant_map' is not the NF4 code "
                        f"table, which jlora dequantizes with")
  return out


# Half the widest gap of the dynamic 8-bit map: the most that double
# quantization moves a block's absmax, in units of its nested absmax.
_NESTED_ERROR = 0.5 * float(np.max(np.diff(nf4.DYNAMIC_CODE))) * 1.001


def _check_absmax(files: Files, state: State, out: dict[str, np.ndarray]) -> None:
  """Every block's absmax must be finite and not negative (a block's largest
  magnitude); with double quantization, once the nested offset is added back,
  allowing for the nested quantization's rounding. For files others wrote.

  A bitsandbytes file carries no checksum, so an edit that keeps these true
  (a larger ``nested_offset``, other codes) cannot be seen; this catches what
  can be, in reductions over the (small) absmax arrays only: the dynamic map
  is increasing, so each nested block's smallest code gives its smallest
  absmax.
  """
  key = state.key
  if not state.double_quant:
    absmax = out["absmax"]
    low, high = (absmax.min(), absmax.max()) if absmax.size else (0.0, 0.0)
    if not (low >= 0 and high < np.inf):      # NaN fails both
      bad = int(np.flatnonzero(~(np.isfinite(absmax) & (absmax >= 0)))[0])
      raise LoraFileError(f"'{files.file_of[key + '.absmax']}': '{key}.absmax' gives block "
                          f"{bad} the absmax {absmax[bad]}; a block's absmax is its largest "
                          f"magnitude, finite and not negative: the file is damaged")
    return
  nested = out["nested_absmax"]
  if nested.size and not (nested.min() >= 0 and nested.max() < np.inf):
    bad = int(np.flatnonzero(~(np.isfinite(nested) & (nested >= 0)))[0])
    raise LoraFileError(f"'{files.file_of[key + '.nested_absmax']}': '{key}.nested_absmax' "
                        f"gives nested block {bad} the absmax {nested[bad]}; it must be finite "
                        f"and not negative: the file is damaged")
  codes = out["absmax"]
  if not codes.size:
    return
  starts = np.arange(0, codes.size, nf4.NESTED_BLOCK_SIZE)
  lowest = nf4.DYNAMIC_CODE[np.minimum.reduceat(codes, starts)] * nested + state.offset
  short = lowest < -_NESTED_ERROR * nested
  if np.any(short):
    g = int(np.flatnonzero(short)[0])
    group = codes[starts[g]:starts[g] + nf4.NESTED_BLOCK_SIZE]
    block = int(starts[g] + np.argmin(group))
    raise LoraFileError(
        f"'{files.file_of[key + '.absmax']}': '{key}.absmax' gives block {block} the absmax "
        f"{float(lowest[g]):.6g} once the quant state's nested_offset {state.offset:.6g} is "
        f"added back; a block's absmax is its largest magnitude, not negative: the "
        f"nested_offset does not fit the tensors (edited?)")


def state_json(q: NF4Array, out_in: tuple[int, int], offset: float | None) -> bytes:
  """The quant state as bitsandbytes' ``pack_dict_to_tensor`` writes it."""
  state = {"quant_type": "nf4", "blocksize": int(q.block_size),
           "dtype": jnp.dtype(q.dtype).name, "shape": list(out_in)}
  if offset is not None:
    state.update(nested_blocksize=nf4.NESTED_BLOCK_SIZE, nested_dtype="float32",
                 nested_offset=offset)
  return json.dumps(state).encode("utf-8")
