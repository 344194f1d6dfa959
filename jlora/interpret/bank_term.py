"""BankTerm: a bank of adapters, each example using its own.

The ids come from ``apply(..., lora_adapter_ids=ids)``: an int array with one
adapter per example (the input's leading axis), -1 for the base model alone,
or a scalar for the whole batch. Three ways compute the low-rank path of a
batch that mixes adapters; all give each row exactly its adapter's
``s_k (x A_k) B_k``:

* ``"gather"``: per-example copies of A and B (batch x width x rank), then a
  batched matmul. The FLOPs of a single adapter; the copies are cheap while
  each example has many tokens (training, prefill).
* ``"segment"``: rows sorted by adapter and ``jax.lax.ragged_dot`` (a grouped
  matmul, the SGMV of S-LoRA and Punica); no copies. For many short
  examples on accelerators.
* ``"masked"``: every row through every adapter's A, masked to its own,
  then one matmul with all B's stacked: n times the low-rank FLOPs, but
  two plain matmuls and no copies; for few adapters and few tokens per
  example (decoding on a CPU).

``"auto"`` picks one from the shapes; ``benchmarks/bench_bank.py`` measures
them (the numbers and the rule are in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jlora.adapters.bank import LoraBank
from jlora.errors import LoraLayoutError, LoraTreeError
from jlora.interpret import axes as axes_lib
from jlora.interpret import dot as dot_lib
from jlora.interpret import factors, values
from jlora.layout import Layout

STRATEGIES = ("auto", "gather", "segment", "masked")
_BATCHED = (((2,), (1,)), ((0,), (0,)))   # (B, T, K) @ (B, K, r)


def choose(strategy: str, *, examples: int, rows: int, adapters: int, rank: int,
           platform: str) -> str:
  """The strategy ``"auto"`` stands for, from static shapes.

  Per-example copies cost ``examples * rank * (K + N)`` against the
  ``rows * rank * (K + N)`` of the low-rank matmuls themselves, so they are
  cheap while an example has at least ``rank / 4`` tokens. Below that, XLA:CPU
  runs ``ragged_dot`` far slower than a plain matmul, so a CPU masks few
  adapters; an accelerator groups.
  """
  if strategy != "auto":
    return strategy
  if rows >= examples * max(1, rank // 4):
    return "gather"
  if platform == "cpu" and adapters * rank <= 512:
    return "masked"
  return "segment"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BankTerm(values.AdapterTerm):
  """``s_k B_k A_k`` for each example's adapter ``k``::

    a: (*stack, n, *in, r)      b: (*stack, n, r, *out)

  (the adapter axis after the stack axes, so a scan over a stack axis slices
  every adapter's factors alike).
  """

  a: Any
  b: Any
  scales: tuple[float, ...] = dataclasses.field(metadata=dict(static=True))
  layout: Layout = dataclasses.field(metadata=dict(static=True))
  dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

  @classmethod
  def of(cls, bank: LoraBank) -> "BankTerm":
    ns = len(bank.layout.stack_axes)
    return cls(jnp.moveaxis(bank.a, 0, ns), jnp.moveaxis(bank.b, 0, ns), bank.scales,
               bank.layout, bank.dropout)

  # -- the dot -------------------------------------------------------------------

  def check_dot(self, ctx: Any, path: str, shape: tuple[int, ...], dot: dot_lib.Dot) -> None:
    factors.check_layout(path, shape, self.layout, dot)
    if dot.w_batch:
      raise LoraLayoutError(
          f"'{path}': a bank of adapters on a weight the model contracts with batch axes "
          f"{dot.w_batch} (a per-expert einsum) is not supported; stack adapters that "
          f"leave this weight alone")
    ids = ctx.adapter_ids
    if ids is None:
      raise LoraTreeError(f"'{path}' holds a bank of adapters: pass lora_adapter_ids=... "
                          f"(one adapter per example, -1 for the base model, or a scalar)")
    if ids.ndim == 1:
      lead = dot.x_shape[dot.x_free[0]] if dot.x_free else None
      if lead != ids.shape[0]:
        raise LoraLayoutError(
            f"'{path}': lora_adapter_ids has {ids.shape[0]} entries, one per example, but "
            f"this weight's input (shape {dot.x_shape}) does not lead with {ids.shape[0]} "
            f"examples; a bank needs the examples on the leading axis")

  def add_flat(self, ctx: Any, y: jax.Array, x: jax.Array, plan: dot_lib.FlatPlan
               ) -> jax.Array:
    dot, ids = plan.dot, ctx.adapter_ids
    a, b = factors.flat_factors(self.a, self.b, self.layout, 1, plan.k_axes, plan.n_axes)
    n, r = a.shape[0], a.shape[-1]
    pet = dot.low_rank_type(a.dtype)
    x = ctx.lora_dropout(x, self.dropout).astype(a.dtype)
    index, weight = _selection(ids, jnp.asarray(self.scales, a.dtype))
    if ids.ndim == 0:
      xa = dot_lib.matmul(x, a[index], dot.precision, pet)
      low = dot_lib.matmul(xa, b[index], dot.precision, pet) * weight
      return y + low.astype(y.dtype)
    examples, rows = ids.shape[0], x.shape[0]
    how = choose(ctx.bank_dot, examples=examples, rows=rows, adapters=n, rank=r,
                 platform=jax.default_backend())
    if how == "gather":
      x3 = x.reshape(examples, rows // examples, x.shape[1])
      xa = lax.dot_general(x3, jnp.take(a, index, axis=0), _BATCHED, dot.precision, pet)
      low = lax.dot_general(xa, jnp.take(b, index, axis=0), _BATCHED, dot.precision, pet)
      low = (low * weight[:, None, None].astype(low.dtype)).reshape(rows, -1)
    elif how == "masked":
      row_index = jnp.repeat(index, rows // examples)
      row_weight = jnp.repeat(weight, rows // examples)
      mask = jax.nn.one_hot(row_index, n, dtype=a.dtype) * row_weight[:, None]
      a_all = axes_lib.transpose(a, (1, 0, 2)).reshape(a.shape[1], n * r)
      xa = dot_lib.matmul(x, a_all, dot.precision, pet)
      xa = xa * jnp.repeat(mask, r, axis=1).astype(xa.dtype)
      low = dot_lib.matmul(xa, b.reshape(n * r, -1), dot.precision, pet)
    elif how == "segment":
      row_index = jnp.repeat(index, rows // examples)
      order = jnp.argsort(row_index, stable=True)
      sizes = jnp.bincount(row_index, length=n).astype(jnp.int32)
      xa = lax.ragged_dot(x[order], a, sizes, precision=dot.precision,
                          preferred_element_type=pet)
      low_sorted = lax.ragged_dot(xa, b, sizes, precision=dot.precision,
                                  preferred_element_type=pet)
      low = jnp.zeros_like(low_sorted).at[order].set(low_sorted)
      low = low * jnp.repeat(weight, rows // examples)[:, None].astype(low.dtype)
    else:
      raise ValueError(f"bank_dot must be one of {STRATEGIES}, got {how!r}")
    return y + low.astype(y.dtype)

  def add_labelled(self, ctx: Any, y: jax.Array, x: jax.Array,
                   plan: dot_lib.LabelledPlan) -> jax.Array:
    raise AssertionError("check_dot refuses banks on weights with batch axes")

  def merge_into(self, w: jax.Array) -> jax.Array:
    raise LoraLayoutError(
        "a bank of adapters cannot be formed into one dense weight (each example uses its "
        "own adapter); this use of the weight has no low-rank rule, so leave the weight out "
        "of the bank, or select one adapter with jlora.select_adapter")

  # -- view ops ----------------------------------------------------------------------

  def transpose(self, perm: Sequence[int]) -> "BankTerm":
    return dataclasses.replace(self, layout=factors.transpose(self.layout, perm))

  def slice_axes(self, slicer: values.Slicer) -> "BankTerm":
    a, b = factors.slice_pair(self.a, self.b, self.layout, 1, slicer)
    return dataclasses.replace(self, a=a, b=b)

  def squeeze(self, dims: Sequence[int]) -> "BankTerm | None":
    out = factors.squeeze_pair(self.a, self.b, self.layout, 1, dims)
    return None if out is None else dataclasses.replace(self, a=out[0], b=out[1], layout=out[2])

  def reshape(self, shape: Sequence[int], groups: axes_lib.ReshapeGroups,
              old_shape: Sequence[int]) -> "BankTerm | None":
    out = factors.reshape_pair(self.a, self.b, self.layout, 1, shape, groups)
    return None if out is None else dataclasses.replace(self, a=out[0], b=out[1], layout=out[2])

  def scan_over_axis0(self) -> "BankTerm | None":
    layout = factors.unstack_layout(self.layout)
    return None if layout is None else dataclasses.replace(self, layout=layout)

  def stacked_on_axis0(self) -> "BankTerm":
    return dataclasses.replace(self, layout=factors.stack_layout(self.layout))


def _selection(ids: jax.Array, scales: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each id's adapter index and weight: its scale; 0 for -1 (the base model
  alone); NaN for an id out of range, so a bad id under jit shows instead of
  silently running another adapter (outside jit, apply refuses it)."""
  n = scales.shape[0]
  index = jnp.clip(ids, 0, n - 1)
  weight = jnp.where(ids >= 0, scales[index], jnp.zeros((), scales.dtype))
  return index, jnp.where((ids >= -1) & (ids < n), weight, jnp.full((), jnp.nan, scales.dtype))


values.register_term(LoraBank, BankTerm.of)
