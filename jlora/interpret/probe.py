"""LayoutProbe: the adapter term ``infer_layouts`` sends through a model.

``infer_layouts`` runs the interpreter itself, abstractly, with a probe in
place of each weight's adapter. The probe follows every view op as a LoRA
pair would (so each rule tells layout inference exactly what it does to an
adapted weight) and, at each dot, records which of the weight's original
axes are contracted (input axes), batched or scanned over (stack axes), or
free (output axes). It contributes nothing to any result.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax

from jlora.errors import LoraLayoutError
from jlora.interpret import axes as axes_lib
from jlora.interpret import dot as dot_lib
from jlora.interpret import values


class LayoutRecorder:
  """The roles seen for each weight axis: ``{path: {axis: (role, where)}}``."""

  def __init__(self):
    self.roles: dict[str, dict[int, tuple[str, str]]] = {}

  def record(self, path: str, axis_sets, role: str, where: str) -> None:
    seen = self.roles.setdefault(path, {})
    for axes in axis_sets:
      for ax in axes:
        prev = seen.get(ax)
        if prev is not None and prev[0] != role:
          raise LoraLayoutError(
              f"'{path}': axis {ax} is used as an {prev[0]} axis by {prev[1]} and as an "
              f"{role} axis by {where}; one LoRA layout cannot serve both uses. Give "
              f"LoraSpec(layouts={{...}}) for this path or exclude it.")
        seen[ax] = (role, where)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ProbeTerm(values.AdapterTerm):
  """For each axis of the current view, the set of original weight axes it
  holds (a merging reshape makes that set larger than one)."""

  path: str = dataclasses.field(metadata=dict(static=True))
  axes: tuple[frozenset, ...] = dataclasses.field(metadata=dict(static=True))
  recorder: LayoutRecorder = dataclasses.field(metadata=dict(static=True), compare=False)

  warns = False

  def _note(self, dot: dot_lib.Dot, where: str) -> None:
    rec, axes = self.recorder, self.axes
    rec.record(self.path, [axes[i] for i in dot.w_contract], "in", where)
    rec.record(self.path, [axes[i] for i in dot.w_batch], "stack", where)
    rec.record(self.path, [axes[i] for i in dot.w_free], "out", where)

  def check_dot(self, ctx: Any, path: str, shape: tuple[int, ...], dot: dot_lib.Dot) -> None:
    self._note(dot, f"a dot_general of its view of shape {shape}")

  def note_dense_dot(self, dot: dot_lib.Dot) -> None:
    self._note(dot, "a dot_general with another weight")

  def add_flat(self, ctx: Any, y: jax.Array, x: jax.Array, plan: dot_lib.FlatPlan
               ) -> jax.Array:
    return y

  def add_labelled(self, ctx: Any, y: jax.Array, x: jax.Array,
                   plan: dot_lib.LabelledPlan) -> jax.Array:
    return y

  def add_take(self, ctx: Any, y: jax.Array, indices: jax.Array, take: dot_lib.Take
               ) -> jax.Array:
    return y

  def add_conv(self, ctx: Any, y: jax.Array, x: jax.Array, conv: dot_lib.Conv) -> jax.Array:
    out_ch, in_ch, *spatial = conv.rhs_spec
    where = "a convolution"
    self.recorder.record(self.path, [self.axes[i] for i in (in_ch, *spatial)], "in", where)
    self.recorder.record(self.path, [self.axes[out_ch]], "out", where)
    return y

  def add_ragged(self, ctx: Any, y: jax.Array, x: jax.Array, ragged: dot_lib.RaggedDot
                 ) -> jax.Array:
    if ragged.standard and len(self.axes) == 3:
      where = "a ragged dot (one matrix per group)"
      self.recorder.record(self.path, [self.axes[0]], "stack", where)
      self.recorder.record(self.path, [self.axes[1]], "in", where)
      self.recorder.record(self.path, [self.axes[2]], "out", where)
    return y

  def merge_into(self, w: jax.Array) -> jax.Array:
    return w

  def transpose(self, perm: Sequence[int]) -> "ProbeTerm":
    return dataclasses.replace(self, axes=tuple(self.axes[i] for i in perm))

  def reshape(self, shape: Sequence[int], groups: axes_lib.ReshapeGroups,
              old_shape: Sequence[int]) -> "ProbeTerm":
    axes = [frozenset()] * len(shape)
    for old, new in groups:
      merged = frozenset().union(*(self.axes[i] for i in old))
      for j in new:
        axes[j] = merged
    return dataclasses.replace(self, axes=tuple(axes))

  def squeeze(self, dims: Sequence[int]) -> "ProbeTerm":
    drop = set(dims)
    return dataclasses.replace(self, axes=tuple(s for i, s in enumerate(self.axes)
                                                if i not in drop))

  def slice_axes(self, slicer: values.Slicer) -> "ProbeTerm":
    return self

  def scan_over_axis0(self) -> "ProbeTerm":
    self.recorder.record(self.path, [self.axes[0]], "stack", "a scan over its axis 0")
    return dataclasses.replace(self, axes=self.axes[1:])

  def shard_specs(self, spec: Any) -> "ProbeTerm":
    return self

  def stacked_on_axis0(self) -> "ProbeTerm":
    return dataclasses.replace(self, axes=(frozenset(),) + self.axes)


def probe(recorder: LayoutRecorder, path: str, ndim: int) -> ProbeTerm:
  return ProbeTerm(path, tuple(frozenset([ax]) for ax in range(ndim)), recorder)
