"""What the commands share: what a path is, the PEFT name-rule and layout
options, loading adapters of either kind, and checks of an output path.

Each function turns a command-line option or path into what a format's own
``load``/``save`` takes (``jlora.orbax``, ``jlora.peft``, ``jlora.base``,
``jlora.bnb``), or refuses it with a one-line ``LoraFileError`` naming the
option.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
from typing import Sequence

from jlora import base as base_files
from jlora import bnb
from jlora import orbax as jorbax
from jlora import peft
from jlora.cli._render import _one_line
from jlora.errors import LoraError, LoraFileError, LoraPeftError
from jlora.layout import Layout
from jlora.orbax import fingerprint
from jlora.peft import axes as peft_axes

PathLike = str | os.PathLike


# -- what a path is -----------------------------------------------------------------


def _kind(path: PathLike) -> str:
  """'jlora' (orbax adapter), 'peft' (folder), 'peft-bank' (a folder of PEFT
  adapters), 'params' (a base) or 'bnb' (a bitsandbytes 4-bit checkpoint);
  else a LoraFileError."""
  p = pathlib.Path(path)
  if not p.exists():
    raise LoraFileError(f"'{path}' does not exist")
  if p.is_file():
    if base_files.is_safetensors(p):
      return "bnb" if bnb.is_checkpoint(p) else "params"
    if peft.is_adapter(p.parent):
      raise LoraFileError(f"'{path}' is a file of a PEFT folder; pass the folder '{p.parent}'")
    raise LoraFileError(f"'{path}' is a file, not an adapter: expected a jlora adapter "
                        f"directory or a PEFT folder")
  if jorbax.is_adapter(p):
    return "jlora"
  if peft.is_adapter(p) and not peft.is_bank(p):
    return "peft"
  if peft.is_bank(p):
    return "peft-bank"
  if base_files.is_base(p):
    return "params"
  if bnb.is_checkpoint(p):
    return "bnb"
  if any(c.name.isdigit() and jorbax.is_adapter(c) for c in p.iterdir()):
    raise LoraFileError(f"'{path}' is a CheckpointManager directory, not an adapter: pass "
                        f"one of its steps ('{p / 'STEP'}')")
  raise LoraFileError(f"'{path}' is not an adapter: it is neither a jlora adapter nor a "
                      f"PEFT folder")


def _adapter_kind(path: PathLike) -> str:
  """'jlora' or 'peft'; a LoraFileError for a base or a folder of several adapters."""
  kind = _kind(path)
  if kind == "params":
    raise LoraFileError(f"'{path}' is a params checkpoint (a base), not an adapter")
  if kind == "bnb":
    raise LoraFileError(f"'{path}' is a bitsandbytes 4-bit checkpoint (a base), not an adapter")
  if kind == "peft-bank":
    names = ", ".join(a["name"] for a in peft.describe_bank(path)["adapters"])
    raise LoraFileError(f"'{path}' holds several PEFT adapters ({names}); pass one adapter's "
                        f"folder")
  return kind


# -- PEFT name rules and layouts ----------------------------------------------------


_KERNEL_ORDERS = {"in-out": "in_out", "out-in": "out_in", "unknown": None}


def _rules_parser() -> argparse.ArgumentParser:
  """The options ``_rules`` and ``_parse_layouts`` read, as a parent parser of
  the commands that read or write PEFT names (merge, convert)."""
  rules = argparse.ArgumentParser(add_help=False)
  rules.add_argument("--rules", choices=["generic", "gpt2", "llama", "bert", "scanned"],
                     default="generic",
                     help="how Flax parameter paths name PyTorch modules (PEFT): generic "
                          "('/' -> '.', leaf and a leading 'params' dropped), gpt2, llama "
                          "(also Mistral), bert (transformers' own Flax models), scanned (an "
                          "nn.scan stack, one module per layer)")
  rules.add_argument("--stack", help="scanned: the stacked Flax path (default params/layers)")
  rules.add_argument("--prefix", help="scanned: the PyTorch layer list (default model.layers)")
  rules.add_argument("--rename", action="append", metavar="FLAX=TORCH",
                     help="scanned: a module inside the stack named otherwise in PyTorch "
                          "(e.g. query=self_attn.q_proj); repeatable")
  rules.add_argument("--fan-in-fan-out", action="store_true",
                     help="generic/scanned: the PyTorch modules store weights (in, out) "
                          "(Conv1D)")
  rules.add_argument("--kernel-order", choices=list(_KERNEL_ORDERS),
                     help="how the base stores its 2-D kernels: in-out (Flax's Dense; the "
                          "default of generic and scanned), out-in (PyTorch-style: Equinox, "
                          "transformers' Flax GPT-2; the default of gpt2), or unknown (the "
                          "adapter's shapes must tell; a square kernel is refused)")
  rules.add_argument("--layout", action="append", metavar="REGEX=IN:OUT[:STACK]",
                     help="reading a PEFT folder: the layout of the weights whose path "
                          "matches REGEX, axes comma-separated (e.g. "
                          "'params/layers/out/kernel=1,2:3:0'); by default inferred from "
                          "the tensors' shapes (stack axes first, then in, then out)")
  return rules


def _rules(args: argparse.Namespace):
  """The ``jlora.peft.Rules`` that --rules and its options name."""
  name = args.rules
  renames = {}
  for item in args.rename or ():
    flax, sep, torch = item.partition("=")
    if not sep or not flax or not torch:
      raise LoraFileError(f"--rename expects FLAX=TORCH (e.g. query=self_attn.q_proj), got "
                          f"{item!r}")
    renames[flax] = torch
  scanned_only = {"--stack": args.stack, "--prefix": args.prefix,
                  "--rename": renames or None}
  if name != "scanned":
    for flag, value in scanned_only.items():
      if value is not None:
        raise LoraFileError(f"{flag} goes with --rules scanned, not --rules {name}")
  if name != "generic" and name != "scanned" and args.fan_in_fan_out:
    raise LoraFileError(f"--fan-in-fan-out: --rules {name} already knows which modules "
                        f"store (in, out) weights")
  order = {} if args.kernel_order is None else {"kernel_order": _KERNEL_ORDERS[args.kernel_order]}
  if name == "gpt2":
    return peft.Rules.gpt2(**order)
  if name in ("llama", "bert"):
    if order:
      raise LoraFileError(f"--kernel-order: --rules {name} knows its kernels are (in, out)")
    return getattr(peft.Rules, name)()
  if name == "scanned":
    return peft.Rules.scanned(
        stack=args.stack or "params/layers", prefix=args.prefix or "model.layers",
        renames=renames, fan_in_fan_out=bool(args.fan_in_fan_out), **order)
  return peft.Rules.generic(fan_in_fan_out=bool(args.fan_in_fan_out), **order)


def _parse_layouts(items: Sequence[str] | None) -> dict[str, Layout]:
  """--layout REGEX=IN:OUT[:STACK] flags -> {regex: Layout}.

  Example:
    >>> _parse_layouts(["params/layers/out/kernel=1,2:3:0"])
    {'params/layers/out/kernel': Layout(in_axes=(1, 2), out_axes=(3,), stack_axes=(0,))}
  """
  out = {}
  for item in items or ():
    regex, sep, axes = item.rpartition("=")
    parts = axes.split(":")
    try:
      if not sep or not regex or len(parts) not in (2, 3):
        raise ValueError
      nums = [tuple(int(a) for a in part.split(",") if a.strip()) for part in parts]
      re.compile(regex)
      out[regex] = Layout(*nums)
    except (ValueError, LoraError, re.error) as e:
      detail = f": {e}" if str(e) else ""
      raise LoraFileError(f"--layout expects REGEX=IN:OUT[:STACK] with comma-separated axes "
                     f"(e.g. 'params/layers/out/kernel=1,2:3:0'), got {item!r}{detail}"
                     ) from None
  return out


def _rules_hint(e: Exception, args: argparse.Namespace) -> LoraFileError:
  """A name-mapping error, with the options that set the mapping."""
  return LoraFileError(f"{_one_line(e)} [names mapped by --rules {args.rules}; see "
                       f"--stack/--prefix/--rename/--layout in 'jlora {args.command} --help']")


def _load_peft(folder: PathLike, base: collections.OrderedDict, args: argparse.Namespace):
  rules = _rules(args)
  layouts = peft_axes.layouts_from_shapes(folder, base, rules, _parse_layouts(args.layout))
  try:
    return peft.load(folder, base, rules, layouts=layouts)
  except LoraPeftError as e:
    if "rules" in str(e) or "stack" in str(e):
      raise _rules_hint(e, args) from e
    raise


# -- orbax adapters -----------------------------------------------------------------


def _load_jlora(path: PathLike, base: collections.OrderedDict | None):
  """(trainable, spec, base used): checked against ``base`` if given, else
  against the abstract base the adapter's fingerprint describes."""
  meta = jorbax.metadata(path)
  tree = (fingerprint.abstract_base(meta) if base is None
          else fingerprint.in_adapter_order(base, meta))
  trainable, spec = jorbax.load(path, base=tree)
  return trainable, spec, tree


# -- outputs ---------------------------------------------------------------------------


def _check_out(path: PathLike, overwrite: bool, inputs: dict[str, PathLike | None]
               ) -> pathlib.Path:
  """The output path, refused if it exists (without --overwrite) or if it is,
  holds, or lies inside one of the inputs: --overwrite never replaces an input."""
  p = pathlib.Path(path).absolute()
  real = p.resolve()
  for flag, value in inputs.items():
    if value is None:
      continue
    inp = pathlib.Path(value).absolute().resolve()
    if real == inp or real in inp.parents or inp in real.parents:
      rel = ("is" if real == inp else "contains" if real in inp.parents else "lies inside")
      raise LoraFileError(f"'{p}' {rel} the input {flag} '{value}'; write the output "
                          f"elsewhere (jlora never replaces an input)")
  if p.exists() and not overwrite:
    raise LoraFileError(f"'{p}' already exists; pass --overwrite to replace it")
  return p


def _out_format(out: PathLike, fmt: str | None, flag: str) -> str:
  """The format of a base to write: --format, or by the path's suffix."""
  is_st = base_files.is_safetensors
  fmt = fmt or ("safetensors" if is_st(out) else "orbax")
  if fmt == "safetensors" and not is_st(out):
    raise LoraFileError(f"--format safetensors: {flag} must end in .safetensors, got '{out}'")
  if fmt == "orbax" and is_st(out):
    raise LoraFileError(f"--format orbax: {flag} '{out}' ends in .safetensors; name the "
                        f"checkpoint directory otherwise")
  return fmt

