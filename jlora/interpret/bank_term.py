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
  examples on accelerators. Where JAX emulates ``ragged_dot`` densely
  (CPU), the ``"masked"`` form runs instead (see ``_runs_grouped``).
* ``"masked"``: every row through every adapter's A (one matmul over the
  n * r columns of all adapters), each row's own adapter's columns selected,
  then one matmul with all B's stacked: n times the low-rank FLOPs, but two
  plain matmuls and no copies; for few adapters and few tokens per example
  (decoding on a CPU). Its gradient (a custom VJP, so reverse mode only) sums
  each example's share into its own adapter. Without a gradient it does not
  sanitise the factors: it checks its output (or, for long batches, the
  factors) and only a non-finite value reruns the layer in the isolating
  form (see the note above ``_masked_checked``).

Every way isolates adapters, forward and backward: a row's output, and an
adapter's gradient, never depend on the values of adapters the row (or, for
the gradient, the batch) does not use; a NaN in one adapter stays in its own
rows (see the note above ``_masked``).

``"auto"`` picks one from the shapes; ``benchmarks/bench_bank.py`` measures
them (the numbers and the rule are in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import dataclasses
import functools
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
      found = ctx.examples
      key = (dot.w_is_rhs, dot.w_contract, dot.x_contract, dot.x_ndim)
      if found is not None and found.probe_size is not None:
        found.record(path, key, lead == found.probe_size)   # probing: note, never refuse
        return
      if lead != ids.shape[0]:
        raise LoraLayoutError(
            f"'{path}': lora_adapter_ids has {ids.shape[0]} entries, one per example, but "
            f"this weight's input (shape {dot.x_shape}) does not lead with {ids.shape[0]} "
            f"examples; a bank needs the examples on the leading axis")
      if found is None or not found.proven(path, key):
        why = (f"tracing with another number of examples failed ({found.failure})"
               if found is not None and found.failure else
               "its leading axis does not follow the number of examples (a dot inside "
               "lax.map or a scan over the examples sees one example's tokens)")
        raise LoraLayoutError(
            f"'{path}': cannot tell that the leading axis of this weight's input (shape "
            f"{dot.x_shape}) holds the {ids.shape[0]} examples of lora_adapter_ids: {why}; "
            f"apply the bank where every dot's input leads with the examples, or pass one "
            f"scalar id per call")

  def add_flat(self, ctx: Any, y: jax.Array, x: jax.Array, plan: dot_lib.FlatPlan
               ) -> jax.Array:
    dot, ids = plan.dot, ctx.adapter_ids
    if ctx.examples is not None and ctx.examples.probe_size is not None:
      return y   # the probe of which axis holds the examples needs shapes only
    a, b = factors.flat_factors(self.a, self.b, self.layout, 1, plan.k_axes, plan.n_axes)
    n, r = a.shape[0], a.shape[-1]
    pet = dot.low_rank_type(a.dtype)
    x = ctx.lora_dropout(x, self.dropout).astype(a.dtype)
    index, weight, valid = _selection(ids, jnp.asarray(self.scales, a.dtype))
    if ids.ndim == 0:
      # One adapter for every row: selecting its factors (zeros for -1 or an id
      # out of range) keeps every other adapter out, forward and backward.
      a1 = jnp.where(valid, a[index], jnp.zeros((), a.dtype))
      b1 = jnp.where(valid, b[index], jnp.zeros((), b.dtype))
      xa = dot_lib.matmul(x, a1, dot.precision, pet)
      low = dot_lib.matmul(xa, b1, dot.precision, pet) * weight
      return y + _nan_out_of_range(low, ids, n).astype(y.dtype)
    examples, rows = ids.shape[0], x.shape[0]
    how = choose(ctx.bank_dot, examples=examples, rows=rows, adapters=n, rank=r,
                 platform=jax.default_backend())
    per_row = rows // examples
    if how == "segment" and not _runs_grouped(jax.default_backend()):
      how = "masked"
    if how == "gather":
      # Each example's own factors; an example with no adapter (-1, or an id
      # out of range) gets zeros, never adapter 0's (clipped) values.
      x3 = x.reshape(examples, per_row, x.shape[1])
      keep = valid[:, None, None]
      a_ex = jnp.where(keep, jnp.take(a, index, axis=0), jnp.zeros((), a.dtype))
      b_ex = jnp.where(keep, jnp.take(b, index, axis=0), jnp.zeros((), b.dtype))
      xa = lax.dot_general(x3, a_ex, _BATCHED, dot.precision, pet)
      low = lax.dot_general(xa, b_ex, _BATCHED, dot.precision, pet)
      low = (low * weight[:, None, None].astype(low.dtype)).reshape(rows, -1)
    elif how == "masked":
      bad = jnp.repeat((ids < -1) | (ids >= n), per_row)
      low = _masked(x, a, b, jnp.repeat(index, per_row), jnp.repeat(valid, per_row), bad,
                    jnp.asarray(self.scales, a.dtype), examples, dot.precision, pet)
      return y + low.astype(y.dtype)
    elif how == "segment":
      low = _grouped(x, a, b, jnp.repeat(index, per_row), jnp.repeat(valid, per_row),
                     dot.precision, pet)
      low = low * jnp.repeat(weight, per_row)[:, None].astype(low.dtype)
    else:
      raise ValueError(f"bank_dot must be one of {STRATEGIES}, got {how!r}")
    return y + _nan_out_of_range(low, ids, n, per_row).astype(y.dtype)

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


def _selection(ids: jax.Array, scales: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each id's adapter index (clipped into range), its weight (its scale; 0 for
  -1 or an id out of range) and whether it names an adapter at all."""
  n = scales.shape[0]
  index = jnp.clip(ids, 0, n - 1)
  valid = (ids >= 0) & (ids < n)
  return index, jnp.where(valid, scales[index], jnp.zeros((), scales.dtype)), valid


def _nan_out_of_range(low: jax.Array, ids: jax.Array, n: int, per_row: int = 0) -> jax.Array:
  """NaN rows for ids out of range, so a bad id under jit shows instead of
  silently running another adapter (outside jit, apply refuses it; under jit,
  ``jlora.lora(fn, check_ids=True)`` and checkify report it). A select, so
  no cotangent flows back from those rows."""
  bad = (ids < -1) | (ids >= n)
  if ids.ndim:
    bad = jnp.repeat(bad, per_row)[:, None]
  return jnp.where(bad, jnp.full((), jnp.nan, low.dtype), low)


# Isolation. Each row must get exactly its own adapter's product, and each
# adapter's gradient exactly its own rows' share, whatever values (NaN, Inf,
# 1e30) the other adapters hold, bit for bit as in a bank without them. A
# product masked by multiplication is not isolated (0 * NaN = NaN), and a
# matmul over several adapters' columns is only where every term of the
# others is an exact zero: finite factors times selected zeros. ``_masked``
# keeps the two plain matmuls of all adapters side by side (n * r columns):
# a non-finite adapter's factors enter as zeros, with a NaN scale so that its
# own rows are NaN, and each row's rank-r intermediate (forward) and its
# cotangent (backward) are selected (``jnp.where``) to its own adapter's
# columns. The factors' gradients, whose contraction runs over rows, are
# computed per example on its own adapter's columns and summed into that
# adapter (a custom VJP): a row never meets another adapter's terms there,
# so a NaN input or cotangent (an adapter broken at another weight) stays in
# its own adapter's gradient, and XLA:CPU, whose reduction order over rows
# depends on the matmul's other dimensions, sums each adapter's gradient
# alike whatever the number of adapters.


def _transposed(t: jax.Array) -> jax.Array:
  # A transposed copy the dot cannot fold back in: XLA:CPU then runs the
  # canonical kernel, whose order of summation does not move with n.
  return lax.optimization_barrier(t.T)


def _own_columns(t: jax.Array, row_index: jax.Array, n: int) -> jax.Array:
  """(rows, n * r) -> (rows, r): each row's own adapter's columns."""
  t = t.reshape(t.shape[0], n, -1)
  return jnp.take_along_axis(t, row_index[:, None, None], axis=1)[:, 0]


_PER_EXAMPLE = (((1,), (1,)), ((0,), (0,)))   # (E, T, P) x (E, T, Q) -> (E, P, Q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _masked_matmuls(x: jax.Array, a_all: jax.Array, b_all: jax.Array, sel: jax.Array,
                    col_scale: jax.Array, row_index: jax.Array, examples: int, n: int,
                    precision: Any, pet: Any) -> jax.Array:
  return _masked_fwd(x, a_all, b_all, sel, col_scale, row_index, examples, n, precision,
                     pet)[0]


def _own_matmuls(x: jax.Array, a_all: jax.Array, b_all: jax.Array, sel: jax.Array,
                 col_scale: jax.Array, precision: Any, pet: Any
                 ) -> tuple[jax.Array, jax.Array]:
  """x through all adapters' A, each row's own columns selected and scaled
  (the rank-r intermediate, returned too), then through all B's."""
  xa = dot_lib.matmul(x, a_all, precision, pet)
  xa = jnp.where(sel, xa * col_scale.astype(xa.dtype), jnp.zeros((), xa.dtype))
  return dot_lib.matmul(xa, b_all, precision, pet), xa


def _masked_fwd(x, a_all, b_all, sel, col_scale, row_index, examples, n, precision, pet):
  low, xa = _own_matmuls(x, a_all, b_all, sel, col_scale, precision, pet)
  return low, (x, a_all, b_all, sel, col_scale, row_index, xa)


def _masked_bwd(examples, n, precision, pet, res, g):
  x, a_all, b_all, sel, col_scale, row_index, xa = res
  rows, r = x.shape[0], b_all.shape[0] // n
  per = rows // examples
  # To x: both matmuls over all adapters, the cotangent selected to each row's
  # own adapter's columns (the others' terms: exact zeros times finite factors).
  dxa = dot_lib.matmul(g, _transposed(b_all), precision, pet)
  dxa = jnp.where(sel, dxa * col_scale.astype(dxa.dtype), jnp.zeros((), dxa.dtype))
  dx = dot_lib.matmul(dxa, _transposed(a_all), precision, pet).astype(x.dtype)
  # To the factors: per example, on its own adapter's columns, added into that
  # adapter (examples without one, -1 or out of range, are dropped).
  valid = jnp.any(sel, axis=1).reshape(examples, per)[:, 0]
  ex_index = jnp.where(valid, row_index.reshape(examples, per)[:, 0], n)
  dxa_own = _own_columns(dxa, row_index, n).reshape(examples, per, r)
  xa_own = _own_columns(xa, row_index, n).reshape(examples, per, r)
  da_ex = lax.dot_general(x.reshape(examples, per, -1), dxa_own, _PER_EXAMPLE, precision, pet)
  db_ex = lax.dot_general(xa_own, g.reshape(examples, per, -1), _PER_EXAMPLE, precision, pet)
  da = jnp.zeros((n,) + da_ex.shape[1:], da_ex.dtype).at[ex_index].add(da_ex, mode="drop")
  db = jnp.zeros((n,) + db_ex.shape[1:], db_ex.dtype).at[ex_index].add(db_ex, mode="drop")
  da = axes_lib.transpose(da, (1, 0, 2)).reshape(a_all.shape)
  return (dx, da.astype(a_all.dtype), db.reshape(b_all.shape).astype(b_all.dtype),
          None, None, None)


_masked_matmuls.defvjp(_masked_fwd, _masked_bwd)


def _masked(x: jax.Array, a: jax.Array, b: jax.Array, row_index: jax.Array,
            row_valid: jax.Array, row_bad: jax.Array, scales: jax.Array, examples: int,
            precision: Any, pet: Any) -> jax.Array:
  """Every row through every adapter's A (one matmul over n * r columns), its
  own adapter's columns selected and scaled, then one matmul with all B's
  stacked: n times the low-rank FLOPs, no copies (for short examples).

  An adapter whose factors are not all finite enters as zeros with a NaN
  scale (its own rows are NaN, its gradient zero); rows with ``row_bad`` (ids
  out of range) are NaN.
  """
  low = _masked_checked(x, a, b, row_index, row_valid, scales, examples, precision, pet)
  return jnp.where(row_bad[:, None], jnp.full((), jnp.nan, low.dtype), low)


# Decoding calls ``_masked`` on a few rows per weight, where sanitising every
# adapter's factors on every call costs as much as the matmuls (issue 17's
# bench: one-token batches 0.97 -> 1.62 of one adapter). Without a gradient,
# the plain matmuls (each row's own columns selected, no sanitising) are
# exact unless a product of another adapter's column met a non-finite
# factor, and that makes some output non-finite: so the isolating form only
# runs (``lax.cond``) when an output, or for long batches (cheaper to check)
# a factor, is not finite. With finite factors both forms compute the same
# matmuls on the same values, bit for bit. Under differentiation the
# isolating form always runs (its backward needs the sanitised factors).


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _masked_checked(x: jax.Array, a: jax.Array, b: jax.Array, row_index: jax.Array,
                    row_valid: jax.Array, scales: jax.Array, examples: int, precision: Any,
                    pet: Any) -> jax.Array:
  n, k, r = a.shape
  isolated = lambda: _isolated(x, a, b, row_index, row_valid, scales, examples,  # noqa: E731
                               precision, pet)

  def plain():
    a_all = axes_lib.transpose(a, (1, 0, 2)).reshape(k, n * r)
    sel, col_scale = _columns(row_index, row_valid, scales, r)
    return _own_matmuls(x, a_all, b.reshape(n * r, -1), sel, col_scale, precision, pet)[0]

  # sum(t * 0) is 0 exactly when every entry of t is finite, and never
  # overflows. Whichever is smaller is checked: the output (few rows,
  # decoding) or the factors (finite factors make the plain form exact too).
  all_finite = lambda t: jnp.sum(t * jnp.zeros((), t.dtype)) == 0  # noqa: E731
  if _checks_output(x.shape[0] * b.shape[-1], a.size + b.size):
    low = plain()
    return lax.cond(all_finite(low), lambda: low, isolated)
  return lax.cond(all_finite(a) & all_finite(b), plain, isolated)


def _checks_output(output_size: int, factors_size: int) -> bool:
  """Whether ``_masked_checked`` checks its output (else the factors)."""
  return output_size <= factors_size


def _masked_checked_fwd(x, a, b, row_index, row_valid, scales, examples, precision, pet):
  low, vjp = jax.vjp(
      lambda x, a, b: _isolated(x, a, b, row_index, row_valid, scales, examples, precision,
                                pet), x, a, b)
  return low, vjp


def _masked_checked_bwd(examples, precision, pet, vjp, g):
  return (*vjp(g), None, None, None)


_masked_checked.defvjp(_masked_checked_fwd, _masked_checked_bwd)


def _columns(row_index: jax.Array, row_valid: jax.Array, scales: jax.Array, r: int
             ) -> tuple[jax.Array, jax.Array]:
  """Which of the n * r columns are each row's own, and each column's scale."""
  n = scales.shape[0]
  col_adapter = jnp.repeat(jnp.arange(n, dtype=row_index.dtype), r)
  sel = (row_index[:, None] == col_adapter[None, :]) & row_valid[:, None]    # (rows, n * r)
  return sel, jnp.repeat(scales, r)


def _isolated(x: jax.Array, a: jax.Array, b: jax.Array, row_index: jax.Array,
              row_valid: jax.Array, scales: jax.Array, examples: int, precision: Any,
              pet: Any) -> jax.Array:
  """``_masked`` whatever the factors hold: non-finite adapters as zeros."""
  n, k, r = a.shape
  finite = lambda t: jnp.all(jnp.isfinite(t), axis=(1, 2))  # noqa: E731
  ok = finite(a) & finite(b)                                                  # (n,)
  zero = jnp.zeros((), a.dtype)
  a_all = axes_lib.transpose(jnp.where(ok[:, None, None], a, zero), (1, 0, 2)).reshape(k, n * r)
  b_all = jnp.where(ok[:, None, None], b, zero).reshape(n * r, -1)
  sel, _ = _columns(row_index, row_valid, scales, r)
  col_scale = jnp.repeat(jnp.where(ok, scales, jnp.full((), jnp.nan, scales.dtype)), r)
  return _masked_matmuls(x, a_all, b_all, sel, col_scale, row_index, examples, n, precision,
                         pet)


def _runs_grouped(platform: str) -> bool:
  """Whether ``"segment"`` runs ``lax.ragged_dot`` (``_grouped``) here.

  On a CPU, JAX lowers ``ragged_dot`` to a dense emulation: every group is
  computed on every row (the other groups' rows zeroed) and the groups are
  summed in one contraction (n times the FLOPs and an (n, rows, K) copy);
  there ``_masked`` (the same FLOPs, no copy, isolating) runs instead. GPUs and TPUs lower it to a grouped-matmul instruction whose
  padding is the backend's business; ``_grouped`` hands it finite
  values only, so that whatever it pads adds exact zeros.
  """
  return platform != "cpu"


def _grouped(x: jax.Array, a: jax.Array, b: jax.Array, row_index: jax.Array,
             row_valid: jax.Array, precision: Any, pet: Any) -> jax.Array:
  """Rows sorted by adapter and ``lax.ragged_dot`` (a grouped matmul), made
  isolating for a kernel that may compute a group on rows of another (zeroed
  or masked by multiplication): it is only ever handed finite values.

  An adapter whose factors are not all finite is replaced by zeros and its
  rows made NaN afterwards (by a select); a row whose input or rank-r
  intermediate is not finite (a broken adapter's rows, from an earlier layer)
  enters as zeros and is made NaN afterwards. Finite values times the zeros
  of another group's rows are exact zeros, so each row's sum, and each
  adapter's gradient, holds its own terms only. One thing no select here can
  reach: a cotangent that is not finite in a live row (an adapter broken at
  a later weight only) enters the kernel's gradient of the other groups; a
  kernel that masks rows by selection (JAX's own, tested on a CPU) drops it,
  one that masks by multiplication would not (unverified on GPU and TPU).
  """
  n = a.shape[0]
  zero = jnp.zeros((), a.dtype)
  finite = lambda t, axes: jnp.all(jnp.isfinite(t), axis=axes)  # noqa: E731
  ok = finite(a, (1, 2)) & finite(b, (1, 2))                                  # (n,)
  a = jnp.where(ok[:, None, None], a, zero)
  b = jnp.where(ok[:, None, None], b, zero)
  row_ok = row_valid & ok[row_index]
  live = (row_ok & finite(x, 1))[:, None]
  row_index = jnp.where(row_valid, row_index, n - 1)   # the base-only rows anywhere: zeros
  order = jnp.argsort(row_index, stable=True)
  inverse = jnp.argsort(order)
  sizes = jnp.bincount(row_index, length=n).astype(jnp.int32)
  xs = jnp.where(live, x, zero)[order]
  xa = lax.ragged_dot(xs, a, sizes, precision=precision, preferred_element_type=pet)
  xa_ok = finite(xa, 1)[:, None]
  xa = jnp.where(xa_ok, xa, jnp.zeros((), xa.dtype))
  low = lax.ragged_dot(xa, b, sizes, precision=precision, preferred_element_type=pet)
  low = jnp.where(xa_ok, low, jnp.full((), jnp.nan, low.dtype))[inverse]
  nan, zeros = jnp.full((), jnp.nan, low.dtype), jnp.zeros((), low.dtype)
  # A row of a broken adapter, or whose input is not finite, is NaN; base-only rows 0.
  return jnp.where(live, low, jnp.where(row_valid[:, None], nan, zeros))


values.register_term(LoraBank, BankTerm.of)
