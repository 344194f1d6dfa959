"""Axis bookkeeping shared by the value kinds: reshape groups and transposes."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax.numpy as jnp

# A reshape split into groups: (old axes, new axes) of equal total size.
ReshapeGroups = list[tuple[tuple[int, ...], tuple[int, ...]]]


def reshape_groups(old: Sequence[int], new: Sequence[int]) -> ReshapeGroups | None:
  """Splits a reshape into (old axes, new axes) groups of equal size.

  Unit axes join the group before them. Returns None when the sizes do not
  line up (or an axis has size 0).

  Example:
    >>> reshape_groups((4, 6), (4, 2, 3))
    [((0,), (0,)), ((1,), (1, 2))]
  """
  old, new = tuple(old), tuple(new)
  if math.prod(old) != math.prod(new) or 0 in old:
    return None
  groups, i, j = [], 0, 0
  while i < len(old) or j < len(new):
    og, ng = [], []
    po = pn = 1
    while True:
      if po == pn and og and ng:
        break
      if (po <= pn or j >= len(new)) and i < len(old):
        po *= old[i]
        og.append(i)
        i += 1
      elif j < len(new):
        pn *= new[j]
        ng.append(j)
        j += 1
      else:
        return None
    while i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
      og.append(i)
      i += 1
    while j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
      ng.append(j)
      j += 1
    groups.append((tuple(og), tuple(ng)))
  return groups


def transpose(x: Any, perm: Sequence[int]) -> Any:
  """``jnp.transpose`` that emits nothing for the identity permutation."""
  perm = list(perm)
  return x if perm == list(range(len(perm))) else jnp.transpose(x, perm)


def reshape(x: Any, shape: Sequence[int]) -> Any:
  """``jnp.reshape`` that emits nothing when the shape does not change."""
  shape = tuple(int(d) for d in shape)
  return x if tuple(x.shape) == shape else jnp.reshape(x, shape)
