"""Hugging Face bitsandbytes 4-bit checkpoints (``*-bnb-4bit``): ``jlora.bnb``.

transformers saves a model loaded with ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")`` as safetensors in which each quantized
``nn.Linear`` (PyTorch module ``M``) has these entries, written by
bitsandbytes' ``QuantState.as_dict(packed=True)``:

* ``M.weight``: the 4-bit codes of the ``(out, in)`` weight flattened
  row-major, two per byte, ``(ceil(n / 2), 1)`` uint8 (the same bytes in
  another dtype with ``bnb_4bit_quant_storage``);
* ``M.weight.absmax``: one value per block of ``blocksize``: float32, or with
  double quantization uint8 codes of ``absmax - offset``;
* ``M.weight.quant_map``: the 16 NF4 values (float32);
* with double quantization, ``M.weight.nested_absmax`` (float32, one per 256
  absmax codes) and ``M.weight.nested_quant_map`` (the 256 values of
  bitsandbytes' signed dynamic map);
* ``M.weight.quant_state.bitsandbytes__nf4``: JSON as uint8 bytes:
  ``quant_type``, ``blocksize``, ``dtype``, ``shape`` (``[out, in]``), and
  with double quantization ``nested_blocksize`` (256), ``nested_dtype`` and
  ``nested_offset`` (the float32 offset).

Every other tensor (embeddings, norms, an unquantized ``lm_head``, biases) is
stored as PyTorch holds it. A large checkpoint is split into shards listed by
``model.safetensors.index.json``.

These are the arrays of a ``jlora.NF4Array`` (see ``jlora.quant.nf4``): a
Flax ``(in, out)`` kernel of layout ``Layout((0,), (1,))`` is stored exactly
as bitsandbytes stores the transposed PyTorch weight, and an ``nn.scan``
stack holds the per-layer arrays stacked on its stack axis. So ``load`` uses
the file's bytes as they are, and ``save`` writes a file transformers loads
as it loads its own.

Names: a ``jlora.peft.Rules`` maps each parameter path to a PyTorch module
(``Rules.llama()``: ``model/layers/0/self_attn/q_proj/kernel`` <->
``model.layers.0.self_attn.q_proj``), its leaf names to PyTorch parameter
names (``kernel`` -> ``weight``), and says how Flax stores its 2-D kernels;
stacked weights are one module per stack index (``Rules.scanned``).

Only JSON and safetensors are read: nothing is unpickled and no code from a
file runs. What jlora cannot read faithfully is refused with one line naming
the entry: FP4 or 8-bit weights, a quant state it does not know, tables that
are not NF4's, shapes that do not fit, missing or unexpected entries.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _atomic, _multihost
from jlora._param_table import summarize
from jlora._paths import flatten_with_paths
from jlora.errors import LoraFileError, LoraSpecError
from jlora.layout import Layout
from jlora.peft import axes, names
from jlora.peft.rules import Rules, RulesLike, as_rules
from jlora.quant import nf4
from jlora.quant.nf4 import NF4Array, is_quant_state_key

__all__ = ["describe", "is_checkpoint", "is_owned", "is_quant_state_key", "load", "save"]

PathLike = str | os.PathLike

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
STATE = nf4.BNB_STATE
# The entries beside a quantized weight, by its key's suffix.
_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
# Entries of bitsandbytes' 8-bit (LLM.int8) weights.
_INT8 = (".SCB", ".weight_format")
# The dtypes a quant state may name (torch's names, as bitsandbytes writes them).
_DTYPES = ("float32", "bfloat16", "float16")
_STATE_KEYS = {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize",
               "nested_dtype", "nested_offset"}
_NESTED_KEYS = ("nested_blocksize", "nested_dtype", "nested_offset")
# jlora's mark in the safetensors metadata, beside transformers' {"format": "pt"}.
MARK = "jlora"
FORMAT = "jlora.bnb-4bit"
VERSION = 1


# -- the files ---------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())


def _sha256(x: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data).hexdigest()


class _Files:
  """The safetensors file(s) of a checkpoint: one file, or a folder with
  ``model.safetensors`` or the shards ``model.safetensors.index.json`` lists."""

  def __init__(self, path: PathLike):
    from safetensors import safe_open
    p = _atomic.resolve(path)
    self.where = str(p)
    if not p.exists():
      raise LoraFileError(f"no bitsandbytes checkpoint at '{p}': it does not exist")
    if p.is_dir():
      paths = self._folder(p)
    elif p.name.endswith(".safetensors"):
      paths = [p]
    else:
      raise LoraFileError(f"'{p}' is not a safetensors file (a bitsandbytes checkpoint is a "
                          f".safetensors file or a folder holding {WEIGHTS_NAME})")
    self.file_of: dict[str, pathlib.Path] = {}
    self.handles: dict[pathlib.Path, Any] = {}
    self.marks: dict[pathlib.Path, dict[str, str] | None] = {}
    for f in paths:
      try:
        handle = safe_open(os.fspath(f), "numpy")
        keys, meta = list(handle.keys()), handle.metadata() or {}
      except Exception as e:  # safetensors raises its own (non-OSError) types
        raise LoraFileError(f"'{f}' is not a readable safetensors file ({_one_line(e)})"
                            ) from None
      self.handles[f] = handle
      self.marks[f] = _read_mark(meta, keys, f)
      for k in keys:
        if k in self.file_of:
          raise LoraFileError(f"'{f}': entry '{k}' is also in '{self.file_of[k]}'")
        self.file_of[k] = f

  @staticmethod
  def _folder(p: pathlib.Path) -> list[pathlib.Path]:
    if (p / WEIGHTS_NAME).is_file():
      return [p / WEIGHTS_NAME]
    index = p / INDEX_NAME
    if not index.is_file():
      pickled = [n for n in ("pytorch_model.bin", "model.bin") if (p / n).exists()]
      hint = (f"; jlora does not read pickled weights ({pickled[0]}): save with "
              f"safe_serialization=True") if pickled else ""
      raise LoraFileError(f"'{p}' holds no {WEIGHTS_NAME} and no {INDEX_NAME}{hint}")
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
      if not all(isinstance(n, str) and n.endswith(".safetensors")
                 and os.path.basename(n) == n and n not in (".", "..") for n in files):
        raise ValueError("shard names must be .safetensors files in the folder")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise LoraFileError(f"'{index}' is not a valid index of shards ({_one_line(e)})"
                          ) from None
    missing = [n for n in files if not (p / n).is_file()]
    if missing:
      raise LoraFileError(f"'{index}' lists shard '{missing[0]}', which '{p}' lacks")
    return [p / n for n in files]

  def keys(self) -> list[str]:
    return list(self.file_of)

  def info(self, key: str) -> tuple[tuple[int, ...], str]:
    """(shape, safetensors dtype name such as "U8", "F32") from the header."""
    s = self.handles[self.file_of[key]].get_slice(key)
    return tuple(int(d) for d in s.get_shape()), s.get_dtype()

  def get(self, key: str) -> np.ndarray:
    f = self.file_of[key]
    try:
      x = self.handles[f].get_tensor(key)
    except Exception as e:  # truncated or damaged data
      raise LoraFileError(f"'{f}': cannot read entry '{key}' ({_one_line(e)})") from None
    mark = self.marks[f]
    if mark is not None and _sha256(x) != mark[key]:
      raise LoraFileError(f"'{f}' is damaged: entry '{key}' fails its checksum (its SHA-256 "
                          f"differs from the one jlora recorded when writing it)")
    return x


def _read_mark(meta: Mapping[str, str], keys: list[str], f: pathlib.Path
               ) -> dict[str, str] | None:
  """The checksums of a file jlora wrote (verified as entries are read); None
  for a file others wrote."""
  raw = meta.get(MARK)
  if raw is None:
    return None
  try:
    mark = json.loads(raw)
    sums = mark["tensors_sha256"]
    ok = mark["format"] == FORMAT and isinstance(sums, dict)
  except (ValueError, KeyError, TypeError, RecursionError):
    ok = False
  if not ok:
    raise LoraFileError(f"'{f}' is damaged: jlora's metadata in it is not valid")
  if mark.get("version") != VERSION:
    raise LoraFileError(f"'{f}': written with mark version {mark.get('version')!r}; this "
                        f"jlora reads version {VERSION}")
  if sorted(sums) != sorted(keys):
    raise LoraFileError(f"'{f}' is damaged: it does not hold the entries jlora wrote")
  return sums


# -- quant states -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _State:
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
    out = [self.key] + [self.key + s for s in _PARTS[:2]]
    if self.double_quant:
      out += [self.key + s for s in _PARTS[2:]]
    return out + [self.key + STATE + "nf4"]

  def same_format(self, other: "_State") -> bool:
    return (self.out_in, self.dtype, self.block_size, self.double_quant) == (
        other.out_in, other.dtype, other.block_size, other.double_quant)

  def describe(self) -> str:
    dq = ", double quantization" if self.double_quant else ""
    return (f"NF4 {self.dtype} (out, in) {self.out_in}, block size {self.block_size}{dq}")


def _no_constant(name: str):
  raise ValueError(f"{name} is not a number")


def _parse_state(files: _Files, state_key: str) -> _State:
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
    if state.get("dtype") not in _DTYPES:
      raise ValueError(f"dtype {state.get('dtype')!r} is not one of {_DTYPES}")
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
                        f"({_one_line(e)})") from None
  return _State(key, (shape[0], shape[1]), state["dtype"], block_size, offset)


@dataclasses.dataclass
class _Scan:
  states: dict[str, _State]     # weight key -> state
  dense: list[str]              # every other entry


def _scan(files: _Files) -> _Scan:
  """The quantized weights and the dense entries of a checkpoint, with every
  entry accounted for."""
  keys = files.keys()
  states: dict[str, _State] = {}
  for k in keys:
    if STATE not in k:
      continue
    kind = k.rpartition(STATE)[2]
    if kind != "nf4":
      why = ("FP4 codes have other values than NF4's" if kind == "fp4"
             else "jlora knows only 'nf4'")
      raise LoraFileError(f"'{files.file_of[k]}': '{k}' is a 4-bit '{kind}' quant state; "
                          f"jlora reads NF4 weights only (bnb_4bit_quant_type='nf4'): {why}")
    state = _parse_state(files, k)
    states[state.key] = state
  owned = set()
  for state in states.values():
    want = state.entries()
    missing = [e for e in want if e not in files.file_of]
    if missing:
      raise LoraFileError(f"'{files.where}': '{missing[0]}' is missing (the quantized weight "
                          f"'{state.key}' needs it)")
    extra = [state.key + s for s in _PARTS if state.key + s not in want
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
    if k.endswith(_PARTS):
      raise LoraFileError(f"'{files.file_of[k]}': '{k}' belongs to a quantized weight without "
                          f"its quant state '{k.rsplit('.', 1)[0]}{STATE}nf4'")
    dense.append(k)
  return _Scan(states, dense)


_DT = {"U8": np.uint8, "F32": np.float32}


def _checked(files: _Files, key: str, shape: tuple[int, ...], dtype: str, state: _State
             ) -> np.ndarray:
  got_shape, got_dtype = files.info(key)
  if got_shape != shape or got_dtype != dtype:
    raise LoraFileError(f"'{files.file_of[key]}': '{key}' is {got_dtype} {got_shape}, but "
                        f"{state.describe()} needs {dtype} {shape}")
  return files.get(key)


def _arrays(files: _Files, state: _State) -> dict[str, np.ndarray]:
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
  table = _checked(files, key + ".quant_map", (16,), "F32", state)
  if table.view(np.uint32).tolist() != nf4.NF4_CODE.view(np.uint32).tolist():
    raise LoraFileError(f"'{files.file_of[key]}': '{key}.quant_map' is not the NF4 code "
                        f"table, which jlora dequantizes with")
  return out


# -- names and layouts --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Name:
  template: str          # the module, with "{0}"... for stack indices
  param: str             # the PyTorch parameter name ("weight")
  is_kernel: bool

  def key(self, index: tuple[int, ...]) -> str:
    return f"{names.fill(self.template, index)}.{self.param}"


def _name(path: str, rules: Rules, where: str) -> _Name:
  template = rules(path)
  if template is None:
    raise LoraFileError(f"{where}: the rules name no PyTorch module for '{path}'")
  leaf = path.rpartition("/")[2]
  param = rules.leaf_names.get(leaf)
  if param is None:
    raise LoraFileError(f"{where}: '{path}': leaf name '{leaf}' has no PyTorch name in the "
                        f"rules' leaf_names {dict(rules.leaf_names)}")
  return _Name(template, param, leaf in rules.kernel_leaves)


def _check_layout(path: str, layout: Layout, shape: tuple[int, ...], n_stack: int,
                  where: str) -> None:
  try:
    layout.check(shape, path)
  except LoraSpecError as e:
    raise LoraFileError(f"{where}: {e}") from None
  if len(layout.stack_axes) != n_stack:
    raise LoraFileError(f"{where}: '{path}' has {len(layout.stack_axes)} stack axes in its "
                        f"layout {layout}, but the rules give its module "
                        f"{n_stack} stack indices")
  for axs in (layout.in_axes, layout.out_axes, layout.stack_axes):
    if list(axs) != sorted(axs):
      raise LoraFileError(f"{where}: '{path}': layout {layout} lists axes out of order; a "
                          f"PyTorch (out, in) weight flattens its in and out axes in the "
                          f"weight's own order")


def _kernel_layout(path: str, shape: tuple[int, ...], n_stack: int, out_in: tuple[int, int],
                   explicit: Layout | None, rules: Rules, key: str, where: str) -> Layout:
  """The layout under which a PyTorch (out, in) weight is the Flax kernel."""
  out_, in_ = out_in
  if explicit is not None:
    _check_layout(path, explicit, shape, n_stack, where)
    if explicit.fan_in(shape) != in_ or explicit.fan_out(shape) != out_:
      raise LoraFileError(f"{where}: '{key}' is (out, in) {out_in}, which does not fit "
                          f"'{path}' {shape} with layout {explicit}")
    return explicit
  fits = axes.splits(shape, n_stack, in_, rules.kernel_order, out_)
  if len(fits) == 1:
    return fits[0]
  if fits:
    raise LoraFileError(f"{where}: '{path}' {shape}: cannot tell whether this square kernel is "
                        f"stored (in, out) or (out, in); jlora does not guess: "
                        f"{axes.kernel_order_hint(path)}")
  raise LoraFileError(f"{where}: '{key}' is (out, in) {out_in}, which does not fit '{path}' "
                      f"{shape} (kernel_order {rules.kernel_order!r}, {n_stack} stack axes)")


def _to_flax(stacked: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
  """An array whose axes are the weight's axes ``order`` -> the weight's order."""
  perm = [order.index(a) for a in range(len(order))]
  return stacked if perm == list(range(len(perm))) else np.transpose(stacked, perm)


# -- load ---------------------------------------------------------------------------


def load(path: PathLike, like: Any, rules: RulesLike, *,
         layouts: Mapping[str, Layout] | None = None) -> Any:
  """Reads a Hugging Face bitsandbytes 4-bit checkpoint into Flax parameters.

  Each quantized PyTorch weight becomes a ``jlora.NF4Array`` holding the
  file's bytes as they are (the codes, absmax codes, nested scales and
  offset); every other entry becomes a plain array, a kernel transposed
  (and reshaped, for a multi-axis kernel) to the Flax layout. Run the model
  with ``jlora.lora``: each NF4 weight is dequantized where it is used.

  Args:
    path: a ``.safetensors`` file, or a folder with ``model.safetensors`` or
      ``model.safetensors.index.json`` and its shards (what
      ``save_pretrained`` writes).
    like: the Flax parameters (``jax.ShapeDtypeStruct`` leaves will do, e.g.
      ``FlaxLlamaForCausalLM(config, _do_init=False).params_shape_tree``):
      the result has its structure, and every leaf must be in the file with
      its shape. Leaves come back in the file's dtype (a quantized weight's
      ``dtype`` is the one its quant state names: what dequantizing gives).
      A leaf that is an ``NF4Array`` lends its layout.
    rules: how parameter paths name PyTorch modules (``jlora.peft.Rules``,
      e.g. ``Rules.llama()``, or a function), as for ``jlora.peft.load``.
    layouts: path -> ``jlora.Layout`` for kernels that are not plain 2-D
      ``(in, out)`` or ``(out, in)`` kernels as the rules' ``kernel_order``
      says (multi-axis kernels; the file's shapes are checked against it).

  Returns:
    The parameter tree, with ``NF4Array`` leaves for the quantized weights.

  Raises:
    LoraFileError: the file is not a 4-bit NF4 checkpoint jlora reads
      faithfully (FP4 or 8-bit weights, another quant map, a malformed
      quant state), an entry is missing or left over, or a shape does not
      fit ``like``; the message names the entry.

  Example:
    >>> import jax, jax.numpy as jnp, tempfile, jlora
    >>> params = jlora.quantize({"fc": {"kernel": jnp.ones((128, 64)), "bias": jnp.ones(64)}})
    >>> f = jlora.bnb.save(f"{tempfile.mkdtemp()}/model.safetensors", params,
    ...                    jlora.peft.Rules.generic())
    >>> back = jlora.bnb.load(f, params, jlora.peft.Rules.generic())
    >>> back["fc"]["kernel"]
    NF4Array(shape=(128, 64), dtype=float32, double_quant, block_size=64, layout=Layout(in_axes=(0,), out_axes=(1,), stack_axes=()))
  """
  files = _Files(path)
  rules = as_rules(rules)
  scan = _scan(files)
  dense = set(scan.dense)
  pairs, treedef = flatten_with_paths(like)
  used: dict[str, str] = {}
  leaves = []
  for p, leaf in pairs:
    if leaf is None:
      leaves.append(None)
      continue
    leaves.append(_load_leaf(files, scan, dense, p, leaf, rules, layouts or {}, used))
  unused = [k for k in list(scan.states) + scan.dense if k not in used]
  if unused:
    raise LoraFileError(f"'{files.where}' has entries no parameter of `like` maps to under "
                        f"these rules: {unused[:3]}{' ...' if len(unused) > 3 else ''}")
  return treedef.unflatten(leaves)


def _load_leaf(files: _Files, scan: _Scan, dense: set, p: str, leaf: Any, rules: Rules,
               layouts: Mapping[str, Layout], used: dict[str, str]) -> Any:
  where = f"'{files.where}'"
  shape = tuple(int(d) for d in leaf.shape)
  name = _name(p, rules, where)
  n = names.n_stack(name.template)
  explicit = layouts.get(p) or (leaf.layout if isinstance(leaf, NF4Array) else None)
  stack_axes = explicit.stack_axes if explicit is not None else tuple(range(n))
  if len(stack_axes) != n or n > len(shape):
    raise LoraFileError(f"{where}: '{p}' {shape} has {len(stack_axes)} stack axes, but the "
                        f"rules name its module '{name.template}' with {n} stack indices")
  lead = tuple(shape[a] for a in stack_axes)
  index = list(np.ndindex(*lead))
  keys = [name.key(i) for i in index]
  for k in keys:
    if k in used:
      raise LoraFileError(f"{where}: '{k}' is mapped to both '{used[k]}' and '{p}'")
    if k not in scan.states and k not in dense:
      near = difflib.get_close_matches(k, list(scan.states) + scan.dense, n=3, cutoff=0.0)
      raise LoraFileError(f"{where} has no '{k}' for '{p}' (nearest entries: {near})")
    used[k] = p
  quantized = [k in scan.states for k in keys]
  if any(quantized) and not all(quantized):
    k = keys[quantized.index(not quantized[0])]
    raise LoraFileError(f"{where}: '{k}' is {'quantized' if k in scan.states else 'dense'}, "
                        f"unlike '{keys[0]}' in the same stack '{p}'")
  if quantized[0]:
    return _load_quantized(files, [scan.states[k] for k in keys], p, shape, n, lead, name,
                           explicit, rules, where)
  values = [files.get(k) for k in keys]
  rest = tuple(a for a in range(len(shape)) if a not in stack_axes)
  if name.is_kernel and len(rest) >= 2:
    return jnp.asarray(_dense_kernel(values, keys, index, p, shape, n, lead, name, explicit,
                                     rules, where))
  want = tuple(shape[a] for a in rest)
  for k, v in zip(keys, values):
    if tuple(v.shape) != want:
      raise LoraFileError(f"{where}: '{k}' has shape {tuple(v.shape)}, but '{p}' {shape} "
                          f"needs {want}")
  stacked = np.stack(values).reshape(lead + want) if n else values[0]
  return jnp.asarray(_to_flax(stacked, tuple(stack_axes) + rest))


def _load_quantized(files, states: list[_State], p, shape, n, lead, name: _Name, explicit,
                    rules: Rules, where) -> NF4Array:
  first = states[0]
  if not name.is_kernel:
    raise LoraFileError(f"{where}: '{first.key}' is quantized, but '{p}' is not a kernel (the "
                        f"rules' kernel_leaves {list(rules.kernel_leaves)})")
  for s in states[1:]:
    if not s.same_format(first):
      raise LoraFileError(f"{where}: '{s.key}' is {s.describe()}, unlike '{first.key}' "
                          f"({first.describe()}) in the same stack '{p}'")
  layout = _kernel_layout(p, shape, n, first.out_in, explicit, rules, first.key, where)
  _check_layout(p, layout, shape, n, where)
  parts = [_arrays(files, s) for s in states]
  stacked = {k: (np.stack([x[k] for x in parts]).reshape(lead + parts[0][k].shape) if n
                 else parts[0][k]) for k in parts[0]}
  return nf4.from_file({k: jnp.asarray(v) for k, v in stacked.items()}, shape, first.dtype,
                       {"quant": "nf4", "block_size": first.block_size,
                        "double_quant": first.double_quant,
                        "layout": {"in_axes": layout.in_axes, "out_axes": layout.out_axes,
                                   "stack_axes": layout.stack_axes}},
                       f"{where}: '{first.key}'", error=LoraFileError)


def _dense_kernel(values, keys, index, p, shape, n, lead, name: _Name, explicit, rules: Rules,
                  where):
  out_in = []
  for k, i, v in zip(keys, index, values):
    if v.ndim != 2:
      raise LoraFileError(f"{where}: '{k}' has shape {tuple(v.shape)}, not the 2-D weight of "
                          f"a linear layer, for kernel '{p}' {shape}")
    out_in.append(v.T if rules.is_in_out(names.fill(name.template, i)) else v)
  layout = _kernel_layout(p, shape, n, tuple(out_in[0].shape), explicit, rules, keys[0], where)
  _check_layout(p, layout, shape, n, where)
  for k, v in zip(keys, out_in):
    if tuple(v.shape) != tuple(out_in[0].shape):
      raise LoraFileError(f"{where}: '{k}' has shape {tuple(v.shape)}, unlike '{keys[0]}' in "
                          f"the same stack '{p}'")
  dims = tuple(shape[a] for a in layout.out_axes + layout.in_axes)
  stacked = np.stack(out_in).reshape(lead + dims) if n else out_in[0].reshape(dims)
  return _to_flax(stacked, layout.stack_axes + layout.out_axes + layout.in_axes)


# -- save ---------------------------------------------------------------------------


def _state_json(q: NF4Array, out_in: tuple[int, int], offset: float | None) -> bytes:
  """The quant state as bitsandbytes' ``pack_dict_to_tensor`` writes it."""
  state = {"quant_type": "nf4", "blocksize": int(q.block_size),
           "dtype": jnp.dtype(q.dtype).name, "shape": list(out_in)}
  if offset is not None:
    state.update(nested_blocksize=nf4.NESTED_BLOCK_SIZE, nested_dtype="float32",
                 nested_offset=offset)
  return json.dumps(state).encode("utf-8")


def save(path: PathLike, params: Any, rules: RulesLike, *,
         layouts: Mapping[str, Layout] | None = None, overwrite: bool = False) -> pathlib.Path:
  """Writes Flax parameters as a Hugging Face bitsandbytes 4-bit safetensors file.

  Each ``NF4Array`` leaf is written as bitsandbytes stores a quantized
  ``nn.Linear`` (its entries listed in the module docstring, one module per
  slice of a stacked weight), every other leaf under its PyTorch name and
  layout (a kernel as the PyTorch ``(out, in)`` weight). Put the file in a
  folder with the model's ``config.json`` (with its ``quantization_config``)
  and transformers loads it with ``from_pretrained``. The metadata is
  transformers' (``{"format": "pt"}``) plus jlora's mark (a SHA-256 of every
  entry, checked by ``load``); the write is atomic, and ``overwrite``
  replaces only a file jlora wrote.

  Args:
    path: the file to write, ending in ``.safetensors``.
    params: the parameters, with ``NF4Array`` leaves for quantized weights.
    rules: how parameter paths name PyTorch modules (``jlora.peft.Rules``).
    layouts: path -> ``jlora.Layout`` of dense multi-axis kernels (an
      ``NF4Array`` carries its own).
    overwrite: replace an existing file jlora wrote.

  Returns:
    The absolute path written.

  Raises:
    LoraFileError: a leaf cannot be named or laid out as a PyTorch weight,
      two leaves name one entry, a quantized weight's dtype is not one
      bitsandbytes knows, or the file cannot be written.

  Example:
    See ``load``.
  """
  path = pathlib.Path(path).absolute()
  if not path.name.endswith(".safetensors"):
    raise LoraFileError(f"'{path}': a bitsandbytes checkpoint is written as a .safetensors "
                        f"file (model.safetensors in a model folder)")
  rules = as_rules(rules)
  where = f"'{path}'"
  tensors: dict[str, np.ndarray] = {}
  owner: dict[str, str] = {}

  def put(key: str, value: np.ndarray, p: str) -> None:
    if key in tensors:
      raise LoraFileError(f"{where}: '{p}' and '{owner[key]}' are both named '{key}'")
    tensors[key], owner[key] = np.ascontiguousarray(value), p

  if _multihost.process_count() > 1:
    # One file: the arrays are gathered to every process (a collective) and
    # process 0 alone writes it.
    params = _multihost.gather_to_host(params)
  pairs = [(p, leaf) for p, leaf in flatten_with_paths(params)[0] if leaf is not None]
  if not pairs:
    raise LoraFileError("params holds no arrays; nothing to save")
  for p, leaf in pairs:
    name = _name(p, rules, where)
    n = names.n_stack(name.template)
    if isinstance(leaf, NF4Array):
      _save_quantized(put, p, leaf, name, n, where)
    else:
      _save_dense(put, p, leaf, name, n, rules, (layouts or {}).get(p), where)
  sums = {k: _sha256(v) for k, v in sorted(tensors.items())}
  metadata = {"format": "pt", MARK: json.dumps({"format": FORMAT, "version": VERSION,
                                                "tensors_sha256": sums}, sort_keys=True)}

  def write(tmp: pathlib.Path) -> None:
    from safetensors.numpy import save_file
    save_file(tensors, os.fspath(tmp), metadata=metadata)

  return _atomic.replace_collective(path, write_primary=write, overwrite=overwrite,
                                    owned=is_owned, what="bitsandbytes checkpoint",
                                    op="jlora.bnb.save")


def _host(p: str, x: Any, where: str) -> np.ndarray:
  if not hasattr(x, "shape") or not hasattr(x, "dtype") or isinstance(x, jax.ShapeDtypeStruct):
    raise LoraFileError(f"{where}: '{p}': expected an array, got {type(x).__name__}")
  try:
    return np.asarray(x)
  except Exception as e:  # a tracer, an abstract value
    raise LoraFileError(f"{where}: '{p}': cannot read its values ({_one_line(e)})") from None


def _save_quantized(put, p: str, q: NF4Array, name: _Name, n: int, where: str) -> None:
  layout = q.layout
  _check_layout(p, layout, q.shape, n, where)
  dtype = jnp.dtype(q.dtype).name
  if dtype not in _DTYPES:
    raise LoraFileError(f"{where}: '{p}' is an NF4 weight of dtype {dtype}; bitsandbytes "
                        f"quant states name one of {_DTYPES}")
  out_in = (math.prod(q.shape[a] for a in layout.out_axes),
            math.prod(q.shape[a] for a in layout.in_axes))
  arrays = {k: _host(f"{p}.{k}", getattr(q, k), where) for k in nf4.PARTS
            if getattr(q, k) is not None}
  lead = tuple(q.shape[a] for a in layout.stack_axes)
  for index in np.ndindex(*lead):
    key = name.key(index)
    offset = float(arrays["offset"][index]) if q.double_quant else None
    put(key, arrays["codes"][index].reshape(-1, 1), p)
    put(key + ".absmax", arrays["absmax"][index], p)
    put(key + ".quant_map", nf4.NF4_CODE.copy(), p)
    if q.double_quant:
      put(key + ".nested_absmax", arrays["nested_absmax"][index], p)
      put(key + ".nested_quant_map", nf4.DYNAMIC_CODE.copy(), p)
    put(key + STATE + "nf4", np.frombuffer(_state_json(q, out_in, offset), np.uint8), p)


def _save_dense(put, p: str, leaf: Any, name: _Name, n: int, rules: Rules,
                explicit: Layout | None, where: str) -> None:
  x = _host(p, leaf, where)
  shape = tuple(x.shape)
  if n > x.ndim:
    raise LoraFileError(f"{where}: '{p}' {shape} has fewer axes than the {n} stack indices of "
                        f"its module '{name.template}'")
  if name.is_kernel and x.ndim - n >= 2:
    layout = explicit
    if layout is None:
      if x.ndim - n != 2:
        raise LoraFileError(f"{where}: '{p}' {shape}: a multi-axis kernel needs its layout "
                            f"(layouts={{'{p}': jlora.Layout(...)}}) to be written as a "
                            f"PyTorch (out, in) weight")
      if rules.kernel_order is None:
        raise LoraFileError(f"{where}: '{p}' {shape}: the rules do not say whether Flax stores "
                            f"it (in, out) or (out, in); {axes.kernel_order_hint(p)}")
      flat = axes.kernel_layout(rules.kernel_order)
      layout = Layout(tuple(a + n for a in flat.in_axes), tuple(a + n for a in flat.out_axes),
                      tuple(range(n)))
    _check_layout(p, layout, shape, n, where)
    order = layout.stack_axes + layout.out_axes + layout.in_axes
    lead = tuple(shape[a] for a in layout.stack_axes)
    w = np.transpose(x, order).reshape(lead + (layout.fan_out(shape), layout.fan_in(shape)))
    for index in np.ndindex(*lead):
      module = names.fill(name.template, index)
      v = w[index]
      put(name.key(index), v.T if rules.is_in_out(module) else v, p)
    return
  lead = shape[:n]
  for index in np.ndindex(*lead):
    put(name.key(index), x[index], p)


# -- describe -----------------------------------------------------------------------


def is_checkpoint(path: PathLike) -> bool:
  """Whether ``path`` is a bitsandbytes 4-bit checkpoint (a safetensors file,
  or a folder of them, with at least one 4-bit quant state); reads headers only.

  Example:
    >>> import tempfile, jax.numpy as jnp, jlora
    >>> d = tempfile.mkdtemp()
    >>> f = jlora.bnb.save(f"{d}/model.safetensors",
    ...                    jlora.quantize({"kernel": jnp.ones((64, 64))}), lambda p: "fc")
    >>> is_checkpoint(f), is_checkpoint(d), is_checkpoint(jlora.base.save(f"{d}/b.safetensors",
    ...                                                    {"w": jnp.ones(2)}))
    (True, True, False)
  """
  p = pathlib.Path(path)
  try:
    if p.is_dir():
      if (p / WEIGHTS_NAME).is_file():
        p = p / WEIGHTS_NAME
      elif (p / INDEX_NAME).is_file():
        weight_map = json.loads((p / INDEX_NAME).read_text())["weight_map"]
        return any(is_quant_state_key(k) for k in weight_map)
      else:
        return False
    if not p.is_file() or not p.name.endswith(".safetensors"):
      return False
    from safetensors import safe_open
    with safe_open(os.fspath(p), "numpy") as f:
      return any(is_quant_state_key(k) for k in f.keys())
  except Exception:  # unreadable: not one we can call a checkpoint
    return False


def is_owned(path: PathLike) -> bool:
  """Whether ``path`` is a bitsandbytes checkpoint jlora wrote (it carries
  jlora's mark): the only kind of file ``save(..., overwrite=True)`` replaces."""
  p = pathlib.Path(path)
  if not p.is_file():
    return False
  try:
    from safetensors import safe_open
    with safe_open(os.fspath(p), "numpy") as f:
      raw = (f.metadata() or {}).get(MARK)
    return raw is not None and json.loads(raw).get("format") == FORMAT
  except Exception:  # unreadable: not ours
    return False


def describe(path: PathLike) -> dict[str, Any]:
  """What a bitsandbytes 4-bit checkpoint holds: each entry by its PyTorch
  name, the quantized weights with their format and bytes (those an
  ``NF4Array`` holds), and the totals of quantized and dense parameters.
  Reads the headers and the quant states only.

  Example:
    >>> import tempfile, jax.numpy as jnp, jlora
    >>> q = jlora.quantize({"fc": {"kernel": jnp.ones((128, 64)), "bias": jnp.ones(64)}})
    >>> f = jlora.bnb.save(f"{tempfile.mkdtemp()}/model.safetensors", q, jlora.peft.Rules())
    >>> info = jlora.bnb.describe(f)
    >>> [(t["path"], t["shape"], "quant" in t) for t in info["tensors"]]
    [('fc.bias', [64], False), ('fc.weight', [64, 128], True)]
    >>> info["quantized"]["bits_per_param"]
    4.1328125
  """
  files = _Files(path)
  scan = _scan(files)
  entries = []
  for key in sorted(list(scan.states) + scan.dense):
    if key in scan.states:
      s = scan.states[key]
      nb = -(-s.size // s.block_size)
      nbytes = -(-s.size // 2) + (nb + 4 * -(-nb // nf4.NESTED_BLOCK_SIZE) + 4
                                  if s.double_quant else 4 * nb)
      entries.append((key, s.out_in, s.dtype, nbytes,
                      {"quant": "nf4", "block_size": s.block_size,
                       "double_quant": s.double_quant}))
    else:
      shape, dtype = files.info(key)
      x_dtype = _ST_DTYPES.get(dtype)
      if x_dtype is None:
        raise LoraFileError(f"'{files.file_of[key]}': '{key}' has dtype {dtype}, which jlora "
                            f"does not read")
      entries.append((key, shape, x_dtype, math.prod(shape) * jnp.dtype(x_dtype).itemsize,
                      None))
  p = pathlib.Path(files.where)
  info = {"path": str(p), "format": "bnb-4bit",
          "format_detail": "Hugging Face bitsandbytes 4-bit (NF4) checkpoint: " +
                           ("safetensors file" if p.is_file()
                            else f"folder of {len(files.handles)} safetensors file(s)"),
          "files": [str(f) for f in files.handles],
          "file_bytes": sum(f.stat().st_size for f in files.handles)}
  info.update(summarize(entries))
  return info


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}
