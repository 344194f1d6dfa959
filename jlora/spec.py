"""LoraSpec: what to adapt, with which rank and scale, and how."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence, Union

import jax.numpy as jnp
import numpy as np

from jlora.errors import LoraSpecError
from jlora.adapters import inits
from jlora.layout import Layout

# A selection of parameter paths: a regex matched in full against the
# '/'-joined path, a list of names matched as path suffixes, or a predicate
# ``fn(path, leaf) -> bool``.
PathSelector = Union[str, Sequence[str], Callable[[str, Any], bool]]

_INITS = ("default", "gaussian", "pissa", "pissa_niter_<N>", "olora", "loftq", "loftq_iter_<N>")
_SELECTORS = ("targets", "exclude", "extra_trainable")


def _freeze_selector(sel: Any, what: str) -> Any:
  """A list or any other iterable of names becomes a tuple, once: a generator
  would be used up by the first look."""
  if sel is None or callable(sel) or isinstance(sel, str):
    return sel
  try:
    names = tuple(sel)
  except TypeError:
    raise LoraSpecError(f"{what}: expected a regex, a list of names or a callable "
                        f"fn(path, leaf) -> bool, got {sel!r}") from None
  if not all(isinstance(n, str) for n in names):
    raise LoraSpecError(f"{what}: expected a regex, a list of names or a callable, got {sel!r}")
  return names


def _plain_number(x: Any) -> Any:
  """A NumPy scalar as the Python number it holds (np.int64(8) -> 8)."""
  return x.item() if isinstance(x, np.generic) else x


def _compile_selector(sel: PathSelector | None, what: str) -> Callable[[str, Any], bool]:
  if sel is None:
    return lambda path, leaf: False
  if callable(sel):
    return sel
  if isinstance(sel, str):
    try:
      pattern = re.compile(sel)
    except re.error as e:
      raise LoraSpecError(f"{what}: invalid regex {sel!r}: {e}") from None
    return lambda path, leaf: pattern.fullmatch(path) is not None
  names = tuple(sel)
  if not all(isinstance(n, str) for n in names):
    raise LoraSpecError(f"{what}: expected a regex, a list of names or a callable, got {sel!r}")
  return lambda path, leaf: any(path == n or path.endswith("/" + n) for n in names)


def _check_pattern_key(key: Any, what: str) -> None:
  try:
    re.compile(f"(?:.*/)?(?:{key})")
  except (re.error, TypeError) as e:
    raise LoraSpecError(f"{what}: invalid regex {key!r}: {e}") from None


def _pattern_lookup(patterns: Mapping[str, Any], path: str) -> Any:
  # PEFT's rank_pattern keys are module-name suffixes; a regex that matches
  # the whole path or a '/'-aligned suffix of it covers both habits.
  for key, value in patterns.items():
    if re.fullmatch(f"(?:.*/)?(?:{key})", path):
      return value
  return None


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """What to adapt and how.

  Attributes:
    rank: rank r of the low-rank update.
    alpha: scaling numerator: the update is ``(alpha / r) * B A``
      (``alpha / sqrt(r)`` with ``use_rslora``).
    targets: which parameters get LoRA factors: a regex matched in full
      against the '/'-joined path (``"layers/0/attn/query/kernel"``), a list
      of names matched as path suffixes (``["query/kernel", "value/kernel"]``)
      or a predicate ``fn(path, leaf) -> bool``.
    exclude: parameters never adapted, in the same forms as ``targets``.
    rank_pattern: regex -> rank, overriding ``rank`` for matching paths (the
      regex may match the whole path or a '/'-aligned suffix; first match wins).
    alpha_pattern: regex -> alpha, likewise.
    use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
    use_dora: weight-decomposed LoRA (``jlora.DoraParam``): a trained magnitude
      per output column beside the pair (see ``jlora.adapters.dora``).
    init: ``"default"``: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as PEFT's
      kaiming-uniform; ``"gaussian"``: A ~ N(0, 1/r^2); B = 0 in both, so the
      adapted model starts equal to the base. ``"pissa"``
      (``"pissa_niter_N"``: by a randomized SVD) and ``"olora"`` start the
      adapter from W0's top singular directions or its QR factors and
      replace W0 in ``frozen`` by the residual; ``"loftq"``
      (``"loftq_iter_N"``) makes the frozen base NF4 and fits the adapter to
      what quantization lost (see ``jlora.adapters.inits``).
    dropout: dropout rate applied to the input of the LoRA path only,
      ``W0 x + s B(A drop(x))``; active only when a dropout key is passed.
    dtype: dtype of A and B (float32 by default, also for a bf16 base).
    extra_trainable: parameters trained in full beside the adapters
      (biases, norms, a classifier head: PEFT's ``modules_to_save``), in the
      same forms as ``targets``.
    layouts: regex -> Layout, the per-target override of how a weight's
      axes split between A and B (see ``jlora.infer_layouts``).

  Example:
    >>> spec = LoraSpec(rank=8, alpha=16, targets=r".*/(query|value)/kernel")
    >>> spec.scale_for("layers/0/query/kernel")
    2.0
  """

  rank: int = 8
  alpha: float = 16.0
  targets: PathSelector = r".*kernel"
  exclude: PathSelector | None = None
  rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
  alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
  use_rslora: bool = False
  use_dora: bool = False
  init: str = "default"
  dropout: float = 0.0
  dtype: Any = jnp.float32
  extra_trainable: PathSelector | None = None
  layouts: Mapping[str, Layout] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for name in ("rank", "alpha", "dropout"):
      object.__setattr__(self, name, _plain_number(getattr(self, name)))
    for name in ("rank_pattern", "alpha_pattern", "layouts"):
      value = getattr(self, name)
      if not isinstance(value, Mapping):
        raise LoraSpecError(f"{name} must be a dict of regex -> value, got {value!r}")
      object.__setattr__(self, name, {k: _plain_number(v) for k, v in value.items()})
    for name in _SELECTORS:
      object.__setattr__(self, name, _freeze_selector(getattr(self, name), name))
    _check_rank(self.rank, "rank")
    _check_alpha(self.alpha, "alpha")
    for key, r in self.rank_pattern.items():
      _check_pattern_key(key, f"rank_pattern[{key!r}]")
      _check_rank(r, f"rank_pattern[{key!r}]")
    for key, a in self.alpha_pattern.items():
      _check_pattern_key(key, f"alpha_pattern[{key!r}]")
      _check_alpha(a, f"alpha_pattern[{key!r}]")
    for key, layout in self.layouts.items():
      _check_pattern_key(key, f"layouts[{key!r}]")
      if not isinstance(layout, Layout):
        raise LoraSpecError(f"layouts[{key!r}]: expected a jlora.Layout, got {layout!r}")
    if not isinstance(self.init, str) or not inits.valid(self.init):
      raise LoraSpecError(f"init must be one of {_INITS}, got {self.init!r}")
    if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
        or not 0.0 <= self.dropout < 1.0):
      raise LoraSpecError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
    if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
      raise LoraSpecError(f"dtype must be a floating dtype, got {self.dtype}")
    # Compile eagerly so a bad regex fails at construction, not mid-transform.
    for name in _SELECTORS:
      _compile_selector(getattr(self, name), name)

  def is_target(self, path: str, leaf: Any) -> bool:
    return (_compile_selector(self.targets, "targets")(path, leaf)
            and not _compile_selector(self.exclude, "exclude")(path, leaf))

  def is_extra_trainable(self, path: str, leaf: Any) -> bool:
    return _compile_selector(self.extra_trainable, "extra_trainable")(path, leaf)

  def rank_for(self, path: str) -> int:
    r = _pattern_lookup(self.rank_pattern, path)
    return self.rank if r is None else int(r)

  def alpha_for(self, path: str) -> float:
    a = _pattern_lookup(self.alpha_pattern, path)
    return float(self.alpha if a is None else a)

  def scale_for(self, path: str) -> float:
    r, alpha = self.rank_for(path), self.alpha_for(path)
    return alpha / math.sqrt(r) if self.use_rslora else alpha / r

  def layout_override(self, path: str) -> Layout | None:
    return _pattern_lookup(self.layouts, path)

  def check_patterns_match(self, target_paths: Sequence[str]) -> None:
    """Raises LoraSpecError for a rank_pattern or alpha_pattern key that
    matches none of ``target_paths``: it would be silently ignored."""
    for name in ("rank_pattern", "alpha_pattern"):
      for key in getattr(self, name):
        if not any(_pattern_lookup({key: True}, p) for p in target_paths):
          shown = ", ".join(list(target_paths)[:5])
          raise LoraSpecError(
              f"{name}[{key!r}] matches no adapted parameter, so it would change nothing "
              f"(adapted: {shown}{', ...' if len(target_paths) > 5 else ''}); fix the key "
              f"or drop it")


def _check_rank(r: Any, what: str) -> None:
  if isinstance(r, bool) or not isinstance(r, int) or r < 1:
    raise LoraSpecError(f"{what} must be an integer >= 1, got {r!r}")


def _check_alpha(a: Any, what: str) -> None:
  if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0 or not math.isfinite(a):
    raise LoraSpecError(f"{what} must be a finite number > 0, got {a!r}")
