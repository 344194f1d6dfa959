"""``summary``: what an adapter costs, before it is built."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jlora._paths import flatten_with_paths
from jlora.errors import LoraError
from jlora.adapters.adapter import is_adapter
from jlora.transform import lora_transform
from jlora.layout import Layout
from jlora.quant import default_target
from jlora.quant.nf4 import NF4Array, quantized_nbytes
from jlora.spec import LoraSpec, _compile_selector, _freeze_selector


@dataclasses.dataclass(frozen=True)
class TargetRow:
  path: str
  shape: tuple[int, ...]
  rank: int
  a_shape: tuple[int, ...]
  b_shape: tuple[int, ...]
  params: int


SETUPS = ("full", "lora", "qlora")
COMPONENTS = ("weights", "adapters", "gradients", "optimizer state", "activations")
_SETUP_NAMES = {"full": "full FT", "lora": "LoRA", "qlora": "QLoRA"}


@dataclasses.dataclass(frozen=True)
class MemoryTable:
  """Bytes a training setup holds, per component, for full fine-tuning, LoRA
  and QLoRA of one model (from shapes and dtypes only).

  Components:

  * ``weights``: the model's weights. Full fine-tuning trains them (in their
    dtype); LoRA keeps them frozen (in their dtype); QLoRA keeps the
    quantized weights in NF4 (4.127 bits per parameter with double
    quantization) and the others as they are.
  * ``adapters``: A and B (in the spec's dtype) and the extra trainable
    leaves.
  * ``gradients``: one per trained element, in its dtype.
  * ``optimizer state``: ``optimizer_slots`` values per trained element, in
    its dtype, as optax keeps them (Adam: 2, its two moments).
  * ``activations`` (when batch and sequence length are given): an estimate
    of what the backward pass keeps without rematerialization: the input and
    the output of every matmul against a weight, per token, in the
    activation dtype. Attention score matrices (batch x heads x seq^2) are
    not counted; rematerialization (``jax.checkpoint``) keeps far less.

  Attributes:
    rows: setup (``"full"``, ``"lora"``, ``"qlora"``) -> component -> bytes.
    tokens: batch x sequence length of the activation estimate, or None.
    device_memory: the device budget the table is read against, or None.
    activation_bytes_per_token: the activation estimate per token.
  """

  rows: dict[str, dict[str, int]]
  tokens: int | None = None
  device_memory: int | None = None
  activation_bytes_per_token: int = 0

  def total(self, setup: str) -> int:
    """Bytes of every component of ``setup`` (activations included when estimated)."""
    return sum(self.rows[setup].values())

  def headroom(self, setup: str, device_memory: int | None = None) -> int:
    """Bytes left on a device of ``device_memory`` bytes (default: the
    table's) after ``setup``'s total: what remains for activations when none
    were estimated, or spare room when they were. Negative: it does not fit."""
    budget = self.device_memory if device_memory is None else device_memory
    if budget is None:
      raise LoraError("headroom needs device_memory (bytes)")
    return int(budget) - self.total(setup)

  def fits(self, setup: str, device_memory: int | None = None) -> bool:
    return self.headroom(setup, device_memory) >= 0

  def tokens_that_fit(self, setup: str, device_memory: int | None = None) -> int:
    """Tokens (batch x sequence) whose estimated activations fit beside
    ``setup``'s weights, adapters, gradients and optimizer state, without
    rematerialization."""
    static = sum(v for k, v in self.rows[setup].items() if k != "activations")
    budget = self.device_memory if device_memory is None else device_memory
    if budget is None:
      raise LoraError("tokens_that_fit needs device_memory (bytes)")
    return max(int(budget) - static, 0) // max(self.activation_bytes_per_token, 1)

  def __str__(self) -> str:
    unit, div = _unit(max(self.total(s) for s in SETUPS))
    names = [c if c != "activations" or self.tokens is None else
             f"activations ({self.tokens:,} tokens)" for c in COMPONENTS]
    width = max(len(n) for n in names + ["room on device"]) + 2
    lines = [f"{'memory (' + unit + ')':<{width}}" + "".join(
        f"{_SETUP_NAMES[s]:>10}" for s in SETUPS)]
    for comp, name in zip(COMPONENTS, names):
      if comp == "activations" and self.tokens is None:
        continue
      lines.append(f"{name:<{width}}" + "".join(f"{self.rows[s][comp] / div:>10.2f}"
                                                 for s in SETUPS))
    lines.append(f"{'total':<{width}}" + "".join(f"{self.total(s) / div:>10.2f}" for s in SETUPS))
    if self.device_memory is not None:
      label = f"room on {_fmt(self.device_memory)}"
      lines.append(f"{label:<{width}}" + "".join(f"{self.headroom(s) / div:>10.2f}"
                                                  for s in SETUPS))
    return "\n".join(lines)


def _unit(n: float) -> tuple[str, float]:
  for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if n >= div:
      return unit, float(div)
  return "B", 1.0


def _fmt(n: float) -> str:
  unit, div = _unit(n)
  return f"{n / div:g} {unit}"


@dataclasses.dataclass(frozen=True)
class LoraSummary:
  """Parameter counts and bytes of a LoRA setup.

  Attributes:
    base_params: elements in the original parameters.
    lora_params: elements in all adapter arrays (A and B, and a DoRA magnitude).
    extra_params: elements of the extra trainable leaves.
    trainable_params: ``lora_params + extra_params``.
    total_params: ``base_params + lora_params`` (as PEFT counts "all params").
    trainable_bytes: bytes of the trainable part.
    frozen_bytes: bytes of the frozen part (as stored: an NF4 weight counts
      its packed bytes).
    rows: one row per adapted weight.
    memory: the memory table of full fine-tuning, LoRA and QLoRA for this
      model (``print(s.memory)``).
  """

  base_params: int
  lora_params: int
  extra_params: int
  trainable_bytes: int
  frozen_bytes: int
  rows: tuple[TargetRow, ...]
  memory: MemoryTable | None = None

  @property
  def trainable_params(self) -> int:
    return self.lora_params + self.extra_params

  @property
  def total_params(self) -> int:
    return self.base_params + self.lora_params

  @property
  def trainable_percent(self) -> float:
    return 100.0 * self.trainable_params / max(self.total_params, 1)

  def __str__(self) -> str:
    width = max([len(r.path) for r in self.rows] + [6])
    lines = [f"{'target':<{width}}  {'shape':>16}  {'r':>4}  {'A':>14}  {'B':>14}  {'params':>10}"]
    for r in self.rows:
      lines.append(f"{r.path:<{width}}  {str(r.shape):>16}  {r.rank:>4}  {str(r.a_shape):>14}  "
                   f"{str(r.b_shape):>14}  {r.params:>10,}")
    lines.append(
        f"trainable params: {self.trainable_params:,} (LoRA {self.lora_params:,} + extra "
        f"{self.extra_params:,}) || all params: {self.total_params:,} || trainable%: "
        f"{self.trainable_percent:.4f}")
    lines.append(f"trainable bytes: {_human(self.trainable_bytes)} || frozen bytes: "
                 f"{_human(self.frozen_bytes)}")
    return "\n".join(lines)


def _human(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
    n /= 1024
  return f"{n} B"


def _size(leaf: Any) -> int:
  return math.prod(leaf.shape)


def _bytes(leaf: Any) -> int:
  if isinstance(leaf, NF4Array):
    return leaf.nbytes
  return _dense_bytes(leaf)


def _dense_bytes(leaf: Any) -> int:
  return _size(leaf) * jnp.dtype(leaf.dtype).itemsize


def _layout_of(path: str, leaf: Any, spec: LoraSpec, layouts: Mapping[str, Layout] | None
               ) -> Layout:
  """The weight's layout for the estimate; a weight of unknown layout counts
  as one slice with axis 0 as input (its byte count does not depend on which)."""
  if isinstance(leaf, NF4Array):
    return leaf.layout
  layout = spec.layout_override(path)
  if layout is None and layouts is not None:
    layout = layouts.get(path)
  return layout or Layout.default(len(leaf.shape)) or Layout(
      (0,), tuple(range(1, len(leaf.shape))))


def memory_table(params: Any, frozen: Any, trainable: Any, spec: LoraSpec, *,
                 layouts: Mapping[str, Layout] | None = None, batch: int | None = None,
                 seq_len: int | None = None, device_memory: int | None = None,
                 quantize_targets: Any = None, block_size: int = 64, double_quant: bool = True,
                 activation_dtype: Any = None, optimizer_slots: int = 2) -> MemoryTable:
  """The ``MemoryTable`` of ``params`` (abstract or concrete) and the split
  ``lora_transform(params, spec)`` makes of it."""
  select = default_target if quantize_targets is None else _compile_selector(
      _freeze_selector(quantize_targets, "quantize_targets"), "quantize_targets")
  p_pairs, _ = flatten_with_paths(params)
  f_pairs, _ = flatten_with_paths(frozen)
  t_pairs, _ = flatten_with_paths(trainable, is_leaf=is_adapter)
  dense_all = sum(_dense_bytes(leaf) for _, leaf in p_pairs if leaf is not None)
  trained_b = 0
  for _, t in t_pairs:
    # An adapter's every array trains (a DoRA magnitude too).
    for x in jax.tree_util.tree_leaves(t):
      trained_b += _dense_bytes(x)
  frozen_dense = frozen_q = 0
  act_per_token = 0
  for path, leaf in f_pairs:
    if leaf is None:
      continue
    frozen_dense += _dense_bytes(leaf)
    is_weight = isinstance(leaf, NF4Array) or select(path, leaf)
    if isinstance(leaf, NF4Array):
      frozen_q += leaf.nbytes
    elif is_weight:
      frozen_q += quantized_nbytes(tuple(leaf.shape), _layout_of(path, leaf, spec, layouts),
                                   block_size, double_quant)
    else:
      frozen_q += _dense_bytes(leaf)
    if is_weight:
      lay = _layout_of(path, leaf, spec, layouts)
      slices = math.prod(leaf.shape[i] for i in lay.stack_axes)
      act = jnp.dtype(activation_dtype or leaf.dtype).itemsize
      act_per_token += slices * (lay.fan_in(leaf.shape) + lay.fan_out(leaf.shape)) * act
  tokens = batch * seq_len if batch is not None and seq_len is not None else None
  acts = act_per_token * tokens if tokens is not None else 0
  adapters = {"adapters": trained_b, "gradients": trained_b,
              "optimizer state": optimizer_slots * trained_b, "activations": acts}
  rows = {
      "full": {"weights": dense_all, "adapters": 0, "gradients": dense_all,
               "optimizer state": optimizer_slots * dense_all, "activations": acts},
      "lora": {"weights": frozen_dense, **adapters},
      "qlora": {"weights": frozen_q, **adapters},
  }
  return MemoryTable(rows, tokens, None if device_memory is None else int(device_memory),
                     act_per_token)


def summary(params: Any, spec: LoraSpec, *, layouts: Mapping[str, Layout] | None = None,
            batch: int | None = None, seq_len: int | None = None,
            device_memory: int | None = None, quantize_targets: Any = None,
            block_size: int = 64, double_quant: bool = True, activation_dtype: Any = None,
            optimizer_slots: int = 2) -> LoraSummary:
  """Counts what ``lora_transform(params, spec)`` would produce, without
  allocating it (``params`` may be abstract, e.g. from ``jax.eval_shape``).

  ``summary(...).memory`` is the memory table of this model for full
  fine-tuning, LoRA and QLoRA (see ``MemoryTable``), in bytes per component;
  ``params`` may already be quantized (``jlora.quantize``).

  Args:
    params: the parameters (concrete, abstract or quantized).
    spec: the LoRA spec.
    layouts: path -> Layout, as ``lora_transform`` takes.
    batch: the batch size; give it with ``seq_len`` to estimate activations.
    seq_len: the sequence length; give it with ``batch``.
    device_memory: a device's bytes, for ``memory.headroom`` and the table's
      "room" line.
    quantize_targets: what QLoRA quantizes, as ``jlora.quantize``'s
      ``targets`` (default: every floating kernel of 2 or more axes).
    block_size: the NF4 block size of the QLoRA column.
    double_quant: whether the QLoRA column quantizes the absmax too.
    activation_dtype: the activations' dtype (default: each weight's).
    optimizer_slots: optimizer values per trained element, each in the
      element's dtype (Adam: 2).

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> s = jlora.summary({"w": jnp.zeros((64, 64))}, jlora.LoraSpec(rank=4, targets=["w"]))
    >>> s.lora_params
    512
  """
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  frozen, trainable = lora_transform(abstract, spec, layouts=layouts)
  f_pairs, _ = flatten_with_paths(frozen)
  t_pairs, _ = flatten_with_paths(trainable, is_leaf=is_adapter)
  rows, lora_n, extra_n, t_bytes = [], 0, 0, 0
  base_n = sum(_size(leaf) for _, leaf in flatten_with_paths(abstract)[0] if leaf is not None)
  f_bytes = sum(_bytes(leaf) for _, leaf in f_pairs if leaf is not None)
  for (path, w0), (_, t) in zip(f_pairs, t_pairs):
    if is_adapter(t):
      arrays = jax.tree_util.tree_leaves(t)
      n = sum(_size(x) for x in arrays)
      lora_n += n
      t_bytes += sum(_bytes(x) for x in arrays)
      rows.append(TargetRow(path, tuple(w0.shape), t.a.shape[-1], tuple(t.a.shape),
                            tuple(t.b.shape), n))
    elif t is not None:
      extra_n += _size(t)
      t_bytes += _bytes(t)
  memory = memory_table(abstract, frozen, trainable, spec, layouts=layouts, batch=batch,
                        seq_len=seq_len, device_memory=device_memory,
                        quantize_targets=quantize_targets, block_size=block_size,
                        double_quant=double_quant, activation_dtype=activation_dtype,
                        optimizer_slots=optimizer_slots)
  return LoraSummary(base_n, lora_n, extra_n, t_bytes, f_bytes, tuple(rows), memory)
