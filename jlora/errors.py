"""Every exception and warning jlora raises.

Each error names the parameter path (or the file) it is about and what was
expected, so that a mistake surfaces as one readable line instead of an XLA
trace. All errors derive from ``LoraError``, a ``ValueError``.
"""

from __future__ import annotations

__all__ = [
    "LoraCheckpointError",
    "LoraError",
    "LoraFileError",
    "LoraLayoutError",
    "LoraMaterializeWarning",
    "LoraPeftError",
    "LoraSpecError",
    "LoraTreeError",
]


class LoraError(ValueError):
  """Base class of jlora's errors."""


class LoraSpecError(LoraError):
  """A LoraSpec (or a selector, a rank, an alpha) does not fit the parameters."""


class LoraLayoutError(LoraError):
  """The LoRA factors of a parameter do not fit how the model uses it."""


class LoraTreeError(LoraError):
  """Frozen and trainable trees (or an optimizer's tree) do not belong together."""


class LoraFileError(LoraError):
  """A file or directory that cannot be read or written as asked."""


class LoraCheckpointError(LoraFileError):
  """An orbax adapter or checkpoint is missing, unreadable, corrupted, or made
  for another base."""


class LoraPeftError(LoraFileError):
  """A PEFT adapter folder cannot be written or read faithfully."""


class LoraMaterializeWarning(UserWarning):
  """An adapted weight reached an op that needs the dense ``W0 + s B A``."""


def one_line(e: BaseException) -> str:
  """An exception's message with its whitespace collapsed, for a one-line error
  that quotes a library's own message (not public: the file readers share it).

  Example:
    >>> one_line(ValueError("bad\\n  value"))
    'bad value'
  """
  return " ".join(str(e).split())
