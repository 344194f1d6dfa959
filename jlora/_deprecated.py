"""0.1's names, forwarded to their 0.2 places until 0.3.

jlora 0.2 moved the file functions into namespaces (``jlora.orbax``,
``jlora.peft``, ``jlora.base``). A 0.1 name still resolves through the
module-level ``__getattr__`` of ``jlora`` and ``jlora.peft``, with a
``DeprecationWarning`` that names its new place. The names are not module
globals, so they stay out of ``__all__``, ``dir()`` and completion.

Most names forward to the new object itself: the signatures are the same.
Two are 0.1-compatible adapters of the new one, where 0.2 changed a default:

* ``PeftRules``: ``jlora.peft.Rules`` with 0.1's positional fields, and a
  ``gpt2()`` whose kernels are ``(in, out)`` as every 0.1 rule assumed
  (0.2's ``Rules.gpt2()`` reads transformers' Flax GPT-2, ``(out, in)``);
* ``save_peft``: ``jlora.peft.save`` replacing a folder jlora wrote, as 0.1
  replaced its two files in place (0.2 refuses without ``overwrite=True``).

Example:
  >>> import warnings, jlora
  >>> with warnings.catch_warnings(record=True) as caught:
  ...   warnings.simplefilter("always")
  ...   jlora.save_adapter is jlora.orbax.save
  True
  >>> print(caught[0].message)
  jlora.save_adapter is deprecated since 0.2 and will be removed in 0.3: use jlora.orbax.save
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any, Callable, Mapping, NamedTuple

from jlora.peft.rules import Rules

SINCE = "0.2"
REMOVED_IN = "0.3"


class Moved(NamedTuple):
  """Where a 0.1 name lives now.

  Attributes:
    new: the new place, dotted (``"jlora.orbax.save"``), named in the warning.
    note: said after it in the warning (what changed beyond the name).
    adapter: a 0.1-compatible wrapper of the new object to return instead of
      it, where 0.2 changed a default.
  """

  new: str
  note: str = ""
  adapter: Callable[[], Any] | None = None


# -- 0.1-compatible adapters ----------------------------------------------------------

# The regex of 0.1's PeftRules.gpt2 (and of 0.2's Rules.gpt2): GPT-2's Conv1D modules.
_GPT2_CONV1D = r"(?:.*\.)?(?:c_attn|q_attn|c_proj|c_fc)"


class PeftRules(Rules):
  """0.1's ``jlora.PeftRules``: a ``jlora.peft.Rules`` with 0.1's defaults.

  0.1's fields were ``(patterns, fan_in_fan_out, leaf_names, kernel_leaves,
  function)`` in that order; 0.2 put ``kernel_order`` before ``function``,
  so the positional order is kept here. Every 0.1 rule read Flax kernels as
  ``(in, out)`` (``kernel_order="in_out"``), ``gpt2()`` included.
  """

  def __init__(self, patterns: Any = Rules.__dataclass_fields__["patterns"].default,
               fan_in_fan_out: bool | str = False, leaf_names: Mapping[str, str] | None = None,
               kernel_leaves: Any = ("kernel",), function: Callable[[str], str | None] | None = None,
               **fields: Any):
    if leaf_names is not None:
      fields["leaf_names"] = leaf_names
    super().__init__(patterns=patterns, fan_in_fan_out=fan_in_fan_out,
                     kernel_leaves=kernel_leaves, function=function, **fields)

  @classmethod
  def gpt2(cls, **fields: Any) -> "PeftRules":
    """0.1's GPT-2 rules: Conv1D modules ``fan_in_fan_out``, Flax kernels ``(in, out)``."""
    return cls(fan_in_fan_out=_GPT2_CONV1D, **fields)


def save_peft(path: Any, trainable: Any, rules: Any, *, overwrite: bool = True,
              **options: Any) -> dict[str, Any]:
  """0.1's ``jlora.save_peft``: ``jlora.peft.save`` that replaces an earlier folder.

  0.1 wrote into an existing folder, replacing its two files; 0.2 refuses an
  existing folder unless ``overwrite=True``, and then replaces only a folder
  jlora wrote. ``overwrite`` defaults to True here so that 0.1 code that
  saves to the same folder again keeps working.
  """
  from jlora import peft
  return peft.save(path, trainable, rules, overwrite=overwrite, **options)


# -- the tables ---------------------------------------------------------------------

_RULES_NOTE = (" (Rules.gpt2() now reads (out, in) kernels, as transformers' Flax GPT-2 "
               "stores them; pass kernel_order='in_out' for 0.1's)")
_SAVE_NOTE = " (it refuses an existing folder unless overwrite=True, which 0.1 implied)"

# 0.1's names of jlora.peft (then one module, now a package), also exported by jlora.
PEFT: dict[str, Moved] = {
    "save_peft": Moved("jlora.peft.save", _SAVE_NOTE, lambda: save_peft),
    "load_peft": Moved("jlora.peft.load"),
    "PeftRules": Moved("jlora.peft.Rules", _RULES_NOTE, lambda: PeftRules),
    "PeftAdapter": Moved("jlora.peft.Adapter"),
    "RulesLike": Moved("jlora.peft.rules.RulesLike"),
    "CONFIG_NAME": Moved("jlora.peft.names.CONFIG_NAME"),
    "WEIGHTS_NAME": Moved("jlora.peft.names.WEIGHTS_NAME"),
    "KEY_PREFIX": Moved("jlora.peft.names.KEY_PREFIX"),
    "DEFAULT_LEAF_NAMES": Moved("jlora.peft.names.DEFAULT_LEAF_NAMES"),
}

# 0.1's top-level names that 0.2 removed (every other 0.1 name is still there).
TOP_LEVEL: dict[str, Moved] = {
    "save_adapter": Moved("jlora.orbax.save"),
    "load_adapter": Moved("jlora.orbax.load"),
    "adapter_metadata": Moved("jlora.orbax.metadata"),
    "CheckpointManager": Moved("jlora.orbax.CheckpointManager"),
    "save_params": Moved("jlora.base.save"),
    "load_params": Moved("jlora.base.load"),
    **{name: PEFT[name] for name in ("save_peft", "load_peft", "PeftRules", "PeftAdapter")},
}


def resolve(moved: Moved) -> Any:
  """The object a 0.1 name stands for now (no warning)."""
  if moved.adapter is not None:
    return moved.adapter()
  module, _, attr = moved.new.rpartition(".")
  return getattr(importlib.import_module(module), attr)


def module_getattr(module: str, table: Mapping[str, Moved],
                   lazy: tuple[str, ...] = ()) -> Callable[[str], Any]:
  """A module-level ``__getattr__`` (PEP 562) that forwards ``table``'s names.

  Args:
    module: the module's ``__name__``.
    table: 0.1 name -> where it lives now.
    lazy: submodules imported on first use, not with the module (no warning).

  Returns:
    The function to assign to the module's ``__getattr__``.
  """

  def __getattr__(name: str) -> Any:
    if name in lazy:
      return importlib.import_module(f"{module}.{name}")
    moved = table.get(name)
    if moved is None:
      # The message (and the attributes that let Python suggest a near name)
      # of a module without __getattr__.
      raise AttributeError(f"module {module!r} has no attribute {name!r}", name=name,
                           obj=sys.modules.get(module))
    warnings.warn(f"{module}.{name} is deprecated since {SINCE} and will be removed in "
                  f"{REMOVED_IN}: use {moved.new}{moved.note}", DeprecationWarning,
                  stacklevel=2)
    return resolve(moved)

  return __getattr__
