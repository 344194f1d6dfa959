"""Exceptions raised by jlora.

Every error names the parameter path it is about, so that a mistake in a
spec or a tree surfaces as one readable line instead of an XLA trace.
"""

from __future__ import annotations


class LoraError(ValueError):
  """Base class of jlora's errors about specs, trees and layouts."""


class LoraSpecError(LoraError):
  """A LoraSpec does not fit the parameters it is applied to."""


class LoraLayoutError(LoraError):
  """The LoRA factors of a parameter do not fit how the model uses it."""


class LoraTreeError(LoraError):
  """Frozen and trainable trees do not belong together."""
