"""Layout: which axes of a weight each LoRA factor covers."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from jlora.errors import LoraSpecError


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a weight's axes split between the two LoRA factors.

  ``A`` covers the input axes (those the model contracts the weight over)
  and ``B`` the output axes (those that appear in the result). Stack axes
  (such as the layer axis that Flax ``nn.scan`` adds at position 0) carry a
  separate low-rank pair per slice and lead in both factors::

    A: (*stack, *in, r)      B: (*stack, r, *out)

  Attributes:
    in_axes: weight axes covered by A, in A's order.
    out_axes: weight axes covered by B, in B's order.
    stack_axes: weight axes shared by A and B, leading in both.

  Example:
    >>> Layout(in_axes=(0,), out_axes=(1, 2))    # DenseGeneral (d, heads, head_dim)
    Layout(in_axes=(0,), out_axes=(1, 2), stack_axes=())
  """

  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  stack_axes: tuple[int, ...] = ()

  def __post_init__(self):
    for name in ("in_axes", "out_axes", "stack_axes"):
      object.__setattr__(self, name, tuple(int(a) for a in getattr(self, name)))
    if not self.in_axes or not self.out_axes:
      raise LoraSpecError(f"Layout needs at least one input and one output axis, got {self}")

  @property
  def ndim(self) -> int:
    return len(self.in_axes) + len(self.out_axes) + len(self.stack_axes)

  def check(self, shape: Sequence[int], path: str) -> None:
    """Raises LoraSpecError unless the axes are a permutation of the weight's."""
    axes = sorted(self.in_axes + self.out_axes + self.stack_axes)
    if axes != list(range(len(shape))):
      raise LoraSpecError(
          f"'{path}': layout {self} does not partition the {len(shape)} axes "
          f"of a weight of shape {tuple(shape)}")

  def fan_in(self, shape: Sequence[int]) -> int:
    return math.prod(shape[i] for i in self.in_axes)

  def fan_out(self, shape: Sequence[int]) -> int:
    return math.prod(shape[i] for i in self.out_axes)

  def a_shape(self, shape: Sequence[int], rank: int) -> tuple[int, ...]:
    return tuple(shape[i] for i in self.stack_axes + self.in_axes) + (rank,)

  def b_shape(self, shape: Sequence[int], rank: int) -> tuple[int, ...]:
    return (tuple(shape[i] for i in self.stack_axes) + (rank,)
            + tuple(shape[i] for i in self.out_axes))

  @classmethod
  def default(cls, ndim: int) -> "Layout | None":
    """The layout of a plain (in, out) kernel; None when ndim is not 2."""
    return cls(in_axes=(0,), out_axes=(1,)) if ndim == 2 else None
