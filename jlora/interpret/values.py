"""The value the interpreter carries wherever an adapted weight flows.

An ``AdaptedValue`` stands for the weight ``W`` that the model would have
seen, in two parts that are each open to new kinds:

* a frozen **base weight** (``BaseWeight``): W0 seen through lazy view ops.
  ``DenseWeight`` is the plain array; a quantized W0 is another kind.
* a tuple of **adapter terms** (``AdapterTerm``): each knows how to add its
  contribution to a dot with W and its delta to a merge. ``LoraTerm`` is
  the pair ``s B A``; a bank of adapters or a DoRA term are other kinds.

Rules (``jlora.interpret.rules``) only call ``AdaptedValue`` methods, which
dispatch to the parts. A view op (transpose, reshape, slice, ...) returns a
new value, or None when it cannot stay lazy, and the rule then forms the
dense weight for that use. A base kind that cannot apply a view op lazily
returns None too, and is replaced by its dense form for that view only: the
adapter terms stay low-rank.

Values are pytrees (their arrays are the leaves; shapes, scales and layouts
are static), so ``lax.scan``, ``lax.cond``, ``jax.checkpoint`` and custom
derivative rules carry them in and out like any other argument.

Adding a value kind: subclass ``BaseWeight`` or ``AdapterTerm`` as a frozen
dataclass registered with ``jax.tree_util.register_dataclass``, implement
the abstract methods, and turn the user-facing leaf into it with
``register_base`` or ``register_term``. No rule changes.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jlora.errors import LoraError
from jlora.interpret import axes as axes_lib
from jlora.interpret import dot as dot_lib
from jlora.interpret import factors

# slicer(array, {array axis: weight axis}) slices ``array`` along each axis
# named in the map as the op slices that weight axis.
Slicer = Callable[[jax.Array, dict[int, int]], jax.Array]


class BaseWeight(abc.ABC):
  """The frozen weight W0, seen through the view ops applied so far.

  Every method but ``materialize`` may return None: "not lazily", and the
  caller then uses ``DenseWeight(self.materialize())`` instead.
  """

  #: Whether an op that uses the dense view (a dot, a convolution) should
  #: form it again in the backward pass rather than keep it: a stored form
  #: much smaller than the dense one (NF4) would otherwise be saved as the
  #: dense residual of every use, and ``lax.scan`` would stack those.
  recompute_in_backward: bool = False

  @property
  @abc.abstractmethod
  def shape(self) -> tuple[int, ...]:
    """The shape of the current view."""

  @property
  @abc.abstractmethod
  def dtype(self) -> Any:
    """The dtype of the current view (what ``materialize`` returns)."""

  @abc.abstractmethod
  def materialize(self) -> jax.Array:
    """The dense W0 of the current view, in ``dtype``."""

  @abc.abstractmethod
  def astype(self, dtype: Any) -> "BaseWeight | None":
    """A floating-point cast, applied where it happens: a narrowing cast
    rounds W0 as the model's own cast would."""

  @abc.abstractmethod
  def transpose(self, perm: Sequence[int]) -> "BaseWeight | None": ...

  @abc.abstractmethod
  def reshape(self, shape: Sequence[int], groups: axes_lib.ReshapeGroups
              ) -> "BaseWeight | None": ...

  @abc.abstractmethod
  def squeeze(self, dims: Sequence[int]) -> "BaseWeight | None": ...

  @abc.abstractmethod
  def slice_axes(self, slicer: Slicer) -> "BaseWeight | None": ...

  @abc.abstractmethod
  def map_dense(self, fn: Callable[[jax.Array], jax.Array]) -> "BaseWeight | None":
    """An elementwise op on W0 that changes its values (``reduce_precision``)."""

  @abc.abstractmethod
  def constrain(self, fn: Callable[[jax.Array], jax.Array]) -> "BaseWeight | None":
    """A placement hint for W0 (``with_sharding_constraint``); a kind whose
    storage the hint does not describe may ignore it."""

  @abc.abstractmethod
  def scan_over_axis0(self) -> "BaseWeight | None":
    """A base whose leaves all lead with the scanned axis and whose metadata
    describes one slice: ``lax.scan`` slices the leaves, the metadata stays."""

  @abc.abstractmethod
  def stacked_on_axis0(self) -> "BaseWeight":
    """The inverse: this base's metadata for leaves that ``lax.scan`` stacked
    along a new axis 0 (a weight returned as a scan output)."""

  def shard_specs(self, spec: Any) -> Any:
    """This base with a ``PartitionSpec`` in place of each array, for a
    ``shard_map`` that slices the weight by ``spec``; None if it cannot."""
    return None


class AdapterTerm(abc.ABC):
  """One adapter's share of W: its contribution to a dot and to a merge.

  View ops mirror ``BaseWeight``'s and return None when the term cannot
  follow the view lazily (the whole weight is then formed for that use).
  """

  #: Whether forming the dense weight is worth a LoraMaterializeWarning.
  warns: bool = True

  @abc.abstractmethod
  def check_dot(self, ctx: Any, path: str, shape: tuple[int, ...], dot: dot_lib.Dot) -> None:
    """Raises a LoraError naming ``path`` when the term cannot serve this use."""

  def note_dense_dot(self, dot: dot_lib.Dot) -> None:
    """Told when the weight is contracted as a dense operand (a product of
    two adapted weights); only the layout probe listens."""

  @abc.abstractmethod
  def add_flat(self, ctx: Any, y: jax.Array, x: jax.Array, plan: dot_lib.FlatPlan
               ) -> jax.Array:
    """``y`` (the (M, N) result so far) plus this term's share of ``x @ W``
    for the (M, K) input ``x``."""

  @abc.abstractmethod
  def add_labelled(self, ctx: Any, y: jax.Array, x: jax.Array,
                   plan: dot_lib.LabelledPlan) -> jax.Array:
    """Likewise for a dot with batch axes; ``y`` is in ``plan.out_labels``."""

  def shard_specs(self, spec: Any) -> Any:
    """This term with a ``PartitionSpec`` in place of each array, slicing it as
    ``spec`` slices the weight (in a ``shard_map``); None if it cannot."""
    return None

  def add_take(self, ctx: Any, y: jax.Array, indices: jax.Array, take: dot_lib.Take
                ) -> jax.Array | None:
    """``y`` (the slices of the weight so far) plus this term's share of the
    slices ``take`` picks; None when the term cannot (the weight is formed)."""
    return None

  def add_conv(self, ctx: Any, y: jax.Array, x: jax.Array, conv: dot_lib.Conv
               ) -> jax.Array | None:
    """``y`` plus this term's share of a convolution of ``x`` with the
    kernel; None when the term cannot (the weight is formed)."""
    return None

  def add_ragged(self, ctx: Any, y: jax.Array, x: jax.Array, ragged: dot_lib.RaggedDot
                 ) -> jax.Array | None:
    """``y`` plus this term's share of a ragged dot of ``x`` with the weight;
    None when the term cannot (the weight is formed)."""
    return None

  @abc.abstractmethod
  def merge_into(self, w: jax.Array) -> jax.Array:
    """``w`` (the dense weight so far, float32 or wider) with this term applied."""

  @abc.abstractmethod
  def transpose(self, perm: Sequence[int]) -> "AdapterTerm | None": ...

  @abc.abstractmethod
  def reshape(self, shape: Sequence[int], groups: axes_lib.ReshapeGroups,
              old_shape: Sequence[int]) -> "AdapterTerm | None": ...

  @abc.abstractmethod
  def squeeze(self, dims: Sequence[int]) -> "AdapterTerm | None": ...

  @abc.abstractmethod
  def slice_axes(self, slicer: Slicer) -> "AdapterTerm | None": ...

  @abc.abstractmethod
  def scan_over_axis0(self) -> "AdapterTerm | None": ...

  @abc.abstractmethod
  def stacked_on_axis0(self) -> "AdapterTerm": ...


_BASE_KINDS: dict[type, Callable[[Any], BaseWeight]] = {}
_TERM_KINDS: dict[type, Callable[[Any], AdapterTerm]] = {}


def register_base(leaf_type: type, to_base: Callable[[Any], BaseWeight]) -> None:
  """Frozen leaves of ``leaf_type`` enter the interpreter as ``to_base(leaf)``."""
  _BASE_KINDS[leaf_type] = to_base


def register_term(leaf_type: type, to_term: Callable[[Any], AdapterTerm]) -> None:
  """Trainable leaves of ``leaf_type`` enter the interpreter as ``to_term(leaf)``."""
  _TERM_KINDS[leaf_type] = to_term


def _lookup(kinds: dict[type, Callable], leaf: Any, what: str) -> Callable:
  # isinstance, not the MRO: jax.Array is an ABC that tracers register with.
  for leaf_type, convert in reversed(list(kinds.items())):
    if isinstance(leaf, leaf_type):
      return convert
  raise TypeError(f"no {what} kind is registered for {type(leaf).__name__}")


def as_base(leaf: Any) -> BaseWeight:
  if isinstance(leaf, BaseWeight):
    return leaf
  return _lookup(_BASE_KINDS, leaf, "base weight")(leaf)


def as_term(leaf: Any) -> AdapterTerm:
  return _lookup(_TERM_KINDS, leaf, "adapter term")(leaf)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaptedValue:
  """``W = base + terms``, carried lazily in place of an adapted weight.

  Attributes:
    base: the frozen weight's view.
    terms: the adapters' shares, applied in order.
    path: the parameter's path, for messages.
    origin: the weight's shape as stored and each adapter's layout (None for
      a kind without one), for messages about a view of it; None if unknown.
  """

  base: Any
  terms: tuple[Any, ...]
  path: str = dataclasses.field(metadata=dict(static=True))
  origin: Any = dataclasses.field(default=None, metadata=dict(static=True))

  @classmethod
  def of(cls, path: str, w0: Any, adapters: Sequence[Any]) -> "AdaptedValue":
    origin = (tuple(w0.shape), tuple(getattr(t, "layout", None) for t in adapters))
    return cls(as_base(w0), tuple(as_term(t) for t in adapters), path, origin)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.base.shape)

  @property
  def ndim(self) -> int:
    return len(self.base.shape)

  @property
  def dtype(self) -> Any:
    return self.base.dtype

  @property
  def warns(self) -> bool:
    return any(t.warns for t in self.terms)

  # -- forming the dense weight ------------------------------------------------

  def materialize(self) -> jax.Array:
    """The dense ``W``, accumulated in float32 (or wider), in the view dtype."""
    acc = jnp.promote_types(jnp.float32, self.dtype)
    w = self.base.materialize().astype(acc)
    for term in self.terms:
      try:
        w = term.merge_into(w)
      except LoraError as e:
        raise type(e)(f"'{self.path}': {e}") from None
    return w.astype(self.dtype)

  # -- lazy view ops -------------------------------------------------------------

  def _view(self, base_op: Callable[[BaseWeight], Any],
            term_op: Callable[[AdapterTerm], Any]) -> "AdaptedValue | None":
    base = base_op(self.base)
    if base is None:
      base = base_op(dense_base(self.base.materialize()))
    terms = []
    for term in self.terms:
      new = term_op(term)
      if new is None:
        return None
      terms.append(new)
    return AdaptedValue(base, tuple(terms), self.path, self.origin)

  def astype(self, dtype: Any) -> "AdaptedValue | None":
    dtype = jnp.dtype(dtype)
    return self._view(lambda b: b.astype(dtype), lambda t: t)

  def transpose(self, perm: Sequence[int]) -> "AdaptedValue | None":
    perm = tuple(int(p) for p in perm)
    return self._view(lambda b: b.transpose(perm), lambda t: t.transpose(perm))

  def reshape(self, shape: Sequence[int]) -> "AdaptedValue | None":
    shape = tuple(int(d) for d in shape)
    groups = axes_lib.reshape_groups(self.shape, shape)
    if groups is None:
      return None
    old = self.shape
    return self._view(lambda b: b.reshape(shape, groups),
                      lambda t: t.reshape(shape, groups, old))

  def squeeze(self, dims: Sequence[int]) -> "AdaptedValue | None":
    dims = tuple(sorted(int(d) for d in dims))
    return self._view(lambda b: b.squeeze(dims), lambda t: t.squeeze(dims))

  def slice_axes(self, slicer: Slicer) -> "AdaptedValue | None":
    return self._view(lambda b: b.slice_axes(slicer), lambda t: t.slice_axes(slicer))

  def map_base(self, fn: Callable[[jax.Array], jax.Array]) -> "AdaptedValue | None":
    return self._view(lambda b: b.map_dense(fn), lambda t: t)

  def constrain(self, fn: Callable[[jax.Array], jax.Array]) -> "AdaptedValue | None":
    return self._view(lambda b: b.constrain(fn), lambda t: t)

  def scan_over_axis0(self) -> "AdaptedValue | None":
    """The value ``lax.scan`` should carry to scan over axis 0: its leaves all
    lead with that axis, its metadata describes one slice. None when an
    adapter term has no separate factors per slice (axis 0 is not a stack
    axis)."""
    if self.ndim == 0:
      return None
    return self._view(lambda b: b.scan_over_axis0(), lambda t: t.scan_over_axis0())

  def shard_specs(self, spec: Any) -> "AdaptedValue | None":
    """This value with a ``PartitionSpec`` in place of each array: W0's is
    ``spec``, each factor's follows the weight axes it holds. None when a part
    cannot be sliced so."""
    base = self.base.shard_specs(spec)
    terms = tuple(t.shard_specs(spec) for t in self.terms)
    if base is None or any(t is None for t in terms):
      return None
    return AdaptedValue(base, terms, self.path, self.origin)

  def stacked_on_axis0(self) -> "AdaptedValue":
    """This value's metadata for leaves that ``lax.scan`` stacked along a new
    axis 0: a weight a scan returns per iteration stays low-rank, each
    iteration's adapter a slice of the stack."""
    return AdaptedValue(self.base.stacked_on_axis0(),
                        tuple(t.stacked_on_axis0() for t in self.terms), self.path,
                        self.origin)

  # -- dot_general ----------------------------------------------------------------

  def _recomputed(self, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(self, *args)``, under ``jax.checkpoint`` (nothing saved but its
    inputs) when the base asks to be formed again in the backward pass."""
    if self.base.recompute_in_backward:
      return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)(self, *args)
    return fn(self, *args)

  def dot_general(self, ctx: Any, x: jax.Array, dot: dot_lib.Dot) -> jax.Array:
    """The model's ``dot_general`` of W with ``x``, with W never formed."""
    for k, term in enumerate(self.terms):
      try:
        term.check_dot(ctx, self.path, self.shape, dot)
      except factors.LayoutMismatchError as e:
        given = self.origin[1][k] if self.origin is not None else None
        if given is None:
          raise
        raise e.restated(self.origin[0], given) from None

    def compute(value, x):
      y = value._dot_flat(ctx, x, dot) if not dot.w_batch else value._dot_labelled(ctx, x, dot)
      return y.astype(dot.out_dtype)

    return self._recomputed(compute, x)

  def note_dense_dot(self, dot: dot_lib.Dot) -> None:
    for term in self.terms:
      term.note_dense_dot(dot)

  def conv(self, ctx: Any, x: jax.Array, conv: dot_lib.Conv) -> jax.Array | None:
    """The model's convolution of ``x`` with W as the kernel, W never formed;
    None when a term cannot."""
    return self._recomputed(lambda value, x: value._each_term(
        conv.apply(x, value.base.materialize()),
        lambda term, y: term.add_conv(ctx, y, x, conv)), x)

  def ragged_dot(self, ctx: Any, x: jax.Array, ragged: dot_lib.RaggedDot) -> jax.Array | None:
    """The model's ragged dot of ``x`` with W (one matrix per group), W never
    formed; None when a term cannot."""
    return self._recomputed(lambda value, x: value._each_term(
        ragged.apply(x, value.base.materialize()),
        lambda term, y: term.add_ragged(ctx, y, x, ragged)), x)

  def _each_term(self, y: jax.Array, add: Callable[[Any, jax.Array], Any]) -> jax.Array | None:
    for term in self.terms:
      y = add(term, y)
      if y is None:
        return None
    return y

  def take(self, ctx: Any, indices: jax.Array, take: dot_lib.Take,
           gather: Callable[[jax.Array], jax.Array]) -> jax.Array | None:
    """Whole slices of W (an embedding lookup): the slices of W0, by
    ``gather``, plus each term's; None when a term cannot take them."""
    return self._each_term(gather(self.base.materialize()),
                           lambda term, y: term.add_take(ctx, y, indices, take))

  def _dot_flat(self, ctx: Any, x: jax.Array, dot: dot_lib.Dot) -> jax.Array:
    plan = dot_lib.flat_plan(dot, x.shape)
    m, k = math.prod(plan.m_shape), math.prod(x.shape[i] for i in dot.x_contract)
    n_shape = tuple(self.shape[i] for i in plan.n_axes)
    x2 = axes_lib.reshape(axes_lib.transpose(x, dot.x_free + dot.x_contract), (m, k))
    w2 = axes_lib.transpose(self.base.materialize(), plan.k_axes + plan.n_axes)
    w2 = axes_lib.reshape(w2, (k, math.prod(n_shape)))
    plan = dataclasses.replace(plan, w0=w2)
    pet = dot.preferred_element_type or dot.out_dtype
    y = dot_lib.matmul(x2, w2, dot.precision, pet)
    for term in self.terms:
      y = term.add_flat(ctx, y, x2, plan)
    y = axes_lib.reshape(y, plan.m_shape + n_shape)
    if not dot.w_is_rhs:   # W x: W's free axes come first
      nm = len(plan.m_shape)
      y = axes_lib.transpose(y, list(range(nm, y.ndim)) + list(range(nm)))
    return y

  def _dot_labelled(self, ctx: Any, x: jax.Array, dot: dot_lib.Dot) -> jax.Array:
    plan = dot_lib.labelled_plan(dot)
    y = dot.base_dot(x, self.base.materialize())
    for term in self.terms:
      y = term.add_labelled(ctx, y, x, plan)
    return y


def dense_base(w: jax.Array) -> BaseWeight:
  """The plain-array base kind (``DenseWeight``), for a fallback."""
  return as_base(w)


def is_value(x: Any) -> bool:
  return isinstance(x, AdaptedValue)
