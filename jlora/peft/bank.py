"""Several adapters as one PEFT folder: ``save_bank`` and ``load_bank``.

PEFT saves a model with several adapters (``PeftModel.save_pretrained``) as
one folder with a subfolder per adapter name, each an ordinary adapter
folder; an adapter named ``default`` sits in the folder itself. PyTorch PEFT
loads them with ``PeftModel.from_pretrained(base, folder / name,
adapter_name=name)`` and ``load_adapter``, and serves a mixed batch with
``model(x, adapter_names=[...])``; jlora reads them into a bank
(``jlora.stack_adapters``) and serves the same batch with
``lora_adapter_ids``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping, NamedTuple

import jax

from jlora import _atomic
from jlora.adapters.bank import bank_names, select_adapter, stack_adapters
from jlora.errors import LoraPeftError, LoraSpecError
from jlora.layout import Layout
from jlora.adapters.lora_param import LoraParam
from jlora.peft import mark, names
from jlora.peft.describe import describe
from jlora.peft.export import save
from jlora.peft.load import load
from jlora.peft.rules import RulesLike
from jlora.spec import LoraSpec

DEFAULT = "default"   # PEFT's name for the adapter kept in the folder itself


class Bank(NamedTuple):
  """What ``load_bank`` returns.

  Attributes:
    frozen: the base parameters, ready for ``jlora.lora(fn)(frozen, bank, ...)``.
    bank: the adapters stacked (``jlora.LoraBank`` leaves), in ``names`` order.
    names: the adapter names; ``lora_adapter_ids`` index into them.
    specs: name -> the ``LoraSpec`` of each adapter.
    configs: name -> its ``adapter_config.json``.
  """

  frozen: Any
  bank: Any
  names: tuple[str, ...]
  specs: dict[str, LoraSpec]
  configs: dict[str, dict[str, Any]]


def adapter_folders(path: str | os.PathLike) -> dict[str, pathlib.Path]:
  """name -> folder of each adapter in a multi-adapter PEFT folder.

  Example:
    >>> import tempfile
    >>> adapter_folders(tempfile.mkdtemp())
    {}
  """
  root = pathlib.Path(path)
  _atomic.check_readable(root, LoraPeftError)
  out = {}
  if (root / names.CONFIG_NAME).is_file():
    out[DEFAULT] = root
  if root.is_dir():
    for child in sorted(root.iterdir(), key=lambda p: p.name):
      if child.is_dir() and (child / names.CONFIG_NAME).is_file():
        out[child.name] = child
  return out


def is_owned(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a multi-adapter folder jlora wrote: each adapter
  carries jlora's mark and nothing else is there."""
  root = pathlib.Path(path)
  folders = adapter_folders(root)
  if not folders or not all(mark.is_owned(f) for f in folders.values()):
    return False
  allowed = {names.CONFIG_NAME, names.WEIGHTS_NAME} if DEFAULT in folders else set()
  return all(child.name in folders or child.name in allowed for child in root.iterdir())


def save_bank(path: str | os.PathLike, bank: Any, rules: RulesLike, *,
              specs: Mapping[str, LoraSpec] | None = None, overwrite: bool = False,
              layouts: Mapping[str, Layout] | None = None,
              **options: Any) -> dict[str, dict[str, Any]]:
  """Writes a bank of adapters as PEFT's multi-adapter folder.

  Each adapter becomes ``path/<name>/`` (``path`` itself for one named
  ``default``), written as ``jlora.peft.save`` writes one adapter. The folder
  is written as a whole, atomically, and ``overwrite`` replaces only a
  multi-adapter folder jlora wrote.

  Args:
    path: the folder.
    bank: a bank tree (``jlora.stack_adapters``).
    rules: how parameter paths name PyTorch modules (``jlora.peft.Rules``).
    specs: name -> the spec an adapter was made with (see ``jlora.peft.save``).
    overwrite: replace a multi-adapter folder jlora wrote.
    layouts: as for ``jlora.peft.save``.
    **options: more ``jlora.peft.save`` options, for every adapter.

  Returns:
    name -> the ``adapter_config.json`` written.

  Raises:
    LoraPeftError: an adapter name that cannot be its subfolder's (not one
      plain path component, hidden, or the name of one of the files of the
      adapter ``default`` keeps in the folder itself), or ``path`` is
      something jlora did not write.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile
    >>> params = {"fc": {"kernel": jnp.ones((8, 4))}}
    >>> _, t = jlora.lora_transform(params, jlora.LoraSpec(rank=2, targets=["fc/kernel"]),
    ...                             key=jax.random.key(0))
    >>> bank = jlora.stack_adapters({"math": t, "code": t})
    >>> folder = tempfile.mkdtemp() + "/bank"
    >>> sorted(jlora.peft.save_bank(folder, bank, jlora.peft.Rules()))
    ['code', 'math']
    >>> jlora.peft.load_bank(folder, params, jlora.peft.Rules()).names
    ('code', 'math')
  """
  adapters = bank_names(bank)
  for name in adapters:
    _check_folder_name(name)
  specs = dict(specs or {})
  unknown = sorted(set(specs) - set(adapters))
  if unknown:
    raise LoraPeftError(f"specs for {unknown}, which the bank does not hold {list(adapters)}")
  configs: dict[str, dict[str, Any]] = {}

  def write(folder: pathlib.Path) -> None:
    order = sorted(adapters, key=lambda n: n != DEFAULT)   # the folder's own adapter first
    for name in order:
      target = folder if name == DEFAULT else folder / name
      configs[name] = save(target, select_adapter(bank, name), rules, spec=specs.get(name),
                           layouts=layouts, **options)
    folder.mkdir(exist_ok=True)

  _atomic.replace(path, write, overwrite=overwrite, owned=is_owned,
                  what="multi-adapter PEFT folder", error=LoraPeftError)
  return configs


def _check_folder_name(name: str) -> None:
  """Raises LoraPeftError unless adapter ``name`` can be its own subfolder:
  one plain path component, not hidden, and not a file name of the adapter
  that ``default`` keeps in the folder itself."""
  if name == DEFAULT:
    return
  seps = {"/", os.sep, os.altsep} - {None}
  if not name or name in (".", "..") or any(sep in name for sep in seps) or "\0" in name:
    why = "it must be one plain path component (no separator, not '.' or '..', not empty)"
  elif name.startswith("."):
    why = "a hidden name is where the folder's writes are staged"
  elif name in (names.CONFIG_NAME, names.WEIGHTS_NAME, names.PICKLE_NAME):
    why = (f"it is the name of a file of the folder's own adapter (PEFT's {DEFAULT!r}, "
           f"kept in the folder itself); rename the adapter")
  else:
    return
  raise LoraPeftError(f"save_bank: adapter name {name!r} cannot be a subfolder's name: {why}")


def load_bank(path: str | os.PathLike, params: Any, rules: RulesLike, *,
              layouts: Mapping[str, Layout] | None = None, dtype: Any = None,
              dropout: float | None = None) -> Bank:
  """Reads PEFT's multi-adapter folder into a bank for ``params``.

  Every adapter is read and checked as ``jlora.peft.load`` reads one; they
  are then stacked (ranks may differ; ``modules_to_save`` and DoRA adapters
  cannot be part of a bank and are refused).

  A bank has one dropout rate. PyTorch PEFT keeps one per adapter, and
  serves adapters with different ``lora_dropout`` in one batch, since
  dropout is off at inference. Such a folder is refused unless ``dropout``
  gives the bank its rate (``dropout=0.0`` to serve); ``specs`` keep each
  adapter's own.

  Args:
    path: the folder (its subfolders, and itself if it holds an adapter).
    params: the base parameters.
    rules: how parameter paths name PyTorch modules.
    layouts: as for ``jlora.peft.load``.
    dtype: as for ``jlora.peft.load``.
    dropout: the bank's dropout rate, in place of the adapters' own
      ``lora_dropout``; needed only where they differ.

  Returns:
    ``Bank(frozen, bank, names, specs, configs)``.

  Raises:
    LoraPeftError: an adapter cannot be loaded, or cannot be part of a bank.
    LoraSpecError: ``dropout`` is not a rate in [0, 1).

  Example:
    See ``save_bank``.
  """
  if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                              or not 0 <= dropout < 1):
    raise LoraSpecError(f"load_bank: dropout must be a rate in [0, 1), got {dropout!r}")
  folders = adapter_folders(path)
  if not folders:
    raise LoraPeftError(f"'{path}' holds no PEFT adapter (no {names.CONFIG_NAME} in it or "
                        f"in its subfolders)")
  loaded = {name: load(folder, params, rules, layouts=layouts, dtype=dtype)
            for name, folder in folders.items()}
  for name, adapter in loaded.items():
    if adapter.config.get("use_dora"):
      raise LoraPeftError(f"'{folders[name]}': adapter {name!r} is a DoRA adapter (use_dora); "
                          f"a bank holds plain LoRA pairs only: load it alone with "
                          f"jlora.peft.load")
    if adapter.config.get("modules_to_save"):
      raise LoraPeftError(f"'{folders[name]}': adapter {name!r} trains modules in full "
                          f"(modules_to_save {adapter.config['modules_to_save']!r}); a bank "
                          f"holds LoRA factors only")
  rates = {name: float(a.spec.dropout) for name, a in loaded.items()}
  if dropout is None and len(set(rates.values())) > 1:
    n1, r1 = next(iter(rates.items()))
    n2, r2 = next((n, r) for n, r in rates.items() if r != r1)
    raise LoraPeftError(
        f"'{path}': adapters {n1!r} and {n2!r} differ in lora_dropout ({r1} and {r2}), and "
        f"a bank has one rate; dropout is off at inference (PyTorch PEFT serves them in "
        f"one batch): pass load_bank(..., dropout=0.0) to serve them, or the rate to "
        f"train them with")
  trainables = {name: a.trainable for name, a in loaded.items()}
  if dropout is not None:
    trainables = {name: jax.tree.map(
        lambda x: dataclasses.replace(x, dropout=float(dropout))
        if isinstance(x, LoraParam) else x, t, is_leaf=lambda x: isinstance(x, LoraParam))
        for name, t in trainables.items()}
  first = next(iter(loaded.values()))
  bank = stack_adapters(trainables)
  return Bank(first.frozen, bank, tuple(loaded), {n: a.spec for n, a in loaded.items()},
              {n: a.config for n, a in loaded.items()})


def describe_bank(path: str | os.PathLike) -> dict[str, Any]:
  """What a multi-adapter PEFT folder holds: each adapter as
  ``jlora.peft.describe`` describes one, under ``adapters``.

  Example:
    >>> import tempfile
    >>> describe_bank(tempfile.mkdtemp())["adapters"]
    []
  """
  folders = adapter_folders(path)
  adapters = [{"name": name, **describe(folder)} for name, folder in folders.items()]
  return {"path": str(pathlib.Path(path).absolute()), "format": "peft-bank",
          "format_detail": f"PEFT folder with {len(adapters)} adapters "
                           f"({', '.join(folders)})",
          "adapters": adapters}


def is_bank(path: str | os.PathLike) -> bool:
  """Whether ``path`` holds adapters in subfolders (PEFT's multi-adapter layout)."""
  return any(name != DEFAULT for name in adapter_folders(path))
