"""The ``jlora`` command line: inspect, merge and convert adapters, quantize bases.

::

  jlora inspect PATH [--json]
  jlora merge --base BASE --adapter ADAPTER --out OUT [--format orbax|safetensors]
  jlora convert SRC DST --to peft|orbax [--rules generic|gpt2|scanned] [--base BASE]
  jlora quantize BASE OUT [--targets REGEX] [--block-size N] [--no-double-quant]

An *adapter* is either a jlora orbax adapter directory (``jlora.orbax.save``
or a ``CheckpointManager`` step) or a PEFT LoRA folder (``jlora.peft.save`` or
PyTorch PEFT's ``save_pretrained``).

A *base* (the parameters an adapter is applied to) is a file or directory
written by ``jlora.base.save``, quantized (NF4) or not; ``merge`` and
``quantize`` write their output in the same forms, so a merged or quantized
model is again a base. ``inspect`` also describes a Hugging Face
bitsandbytes 4-bit checkpoint (``jlora.bnb``).

This module only parses arguments and renders what the formats
(``jlora.orbax``, ``jlora.peft``, ``jlora.base``, ``jlora.bnb``) describe.
Only JSON, orbax and safetensors are read: nothing is unpickled and no code
from a file runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import pathlib
import re
import sys
import warnings
from typing import Any, Mapping, Sequence

import jax

from jlora import base as base_files
from jlora import bnb
from jlora import orbax as jorbax
from jlora import peft
from jlora.errors import LoraError, LoraFileError, LoraPeftError
from jlora._paths import flatten_with_paths
from jlora.layout import Layout
from jlora.adapter import is_adapter
from jlora.orbax import fingerprint
from jlora.peft import axes as peft_axes
from jlora.quant.nf4 import NF4Array

PathLike = str | os.PathLike


# -- what a path is -----------------------------------------------------------------


def _kind(path: PathLike) -> str:
  """'jlora' (orbax adapter), 'peft' (folder), 'params' or 'bnb' (a bitsandbytes
  4-bit checkpoint); else a LoraFileError."""
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


def _rules(args: argparse.Namespace):
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
  """--layout REGEX=IN:OUT[:STACK] flags -> {regex: Layout}."""
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


# -- inspect -------------------------------------------------------------------------


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _shape_str(shape: Any) -> str:
  return "-" if shape is None else "(" + ", ".join(str(d) for d in shape) + ")"


def _layout_str(layout: Mapping[str, Any]) -> str:
  s = f"in {tuple(layout['in_axes'])} out {tuple(layout['out_axes'])}"
  if layout["stack_axes"]:
    s += f" stack {tuple(layout['stack_axes'])}"
  return s


def _format_inspect(info: dict[str, Any]) -> str:
  lines = [f"{info['path']}", f"format: {info['format_detail']}"]
  if info["format"] == "peft-bank":
    for adapter in info["adapters"]:
      lines.append(f"adapter {adapter['name']!r}:")
      lines += ["  " + line for line in _format_inspect(adapter).splitlines()]
    return "\n".join(lines)
  if info["format"] in ("params", "bnb-4bit"):
    if info["format"] == "bnb-4bit":
      lines.append(f"on disk: {info['file_bytes']:,} bytes (with each weight's quant maps and "
                   f"quant state)")
    return "\n".join(lines + _format_params(info))
  spec = info["spec"]
  if spec is None:
    lines.append("spec: not stored")
  else:
    lines.append(f"spec: rank {spec['rank']}, alpha {spec['alpha']}, rslora "
                 f"{'yes' if spec['use_rslora'] else 'no'}, dropout {spec['dropout']}")
    names = ["targets", "exclude", "rank_pattern", "alpha_pattern"] + (
        ["extra_trainable", "layouts"] if info["format"] == "jlora" else
        ["modules_to_save", "fan_in_fan_out", "base_model_name_or_path"])
    for name in names:
      if spec.get(name) not in (None, {}, []):
        lines.append(f"  {name}: {json.dumps(spec[name])}")
    for note in info.get("spec_notes") or ():
      lines.append(f"  note: {note}")
  if info["format"] == "jlora":
    rows = [["path", "kind", "rank", "scale", "W0 shape", "dtype", "A", "B", "layout"]]
    rows += [[t["path"], t.get("kind", "lora") + (f" ({t['residual']})" if t.get("residual")
                                                  else ""),
              str(t["rank"]), "-" if t["scale"] is None else f"{t['scale']:g}",
              _shape_str(t["shape"]), t["dtype"], _shape_str(t["a_shape"]),
              _shape_str(t["b_shape"]), _layout_str(t["layout"])] for t in info["targets"]]
    lines.append(f"targets ({len(info['targets'])}):")
    lines += _table(rows)
    if info.get("adapters"):
      lines.append(f"adapters ({len(info['adapters'])}, a bank):")
      lines += _table([[repr(a["name"]), f"{a['targets']} weights",
                        "rank " + "/".join(str(r) for r in a["ranks"]),
                        "scale " + "/".join(f"{x:g}" for x in a["scales"])]
                       for a in info["adapters"]])
    if info["extra_trainable"]:
      lines.append(f"extra trainable ({len(info['extra_trainable'])}):")
      lines += _table([[e["path"], _shape_str(e["shape"]), e["dtype"]]
                       for e in info["extra_trainable"]])
  else:
    rows = [["module", "kind", "rank", "alpha", "scale", "in", "out", "dtype"]]
    rows += [[t["module"], t.get("kind", "linear") + ("+dora" if "magnitude_shape" in t else ""),
              str(t["rank"]), f"{t['alpha']}",
              "-" if t["scale"] is None else f"{t['scale']:g}", str(t["in"]), str(t["out"]),
              t["factor_dtype"]] for t in info["targets"]]
    lines.append(f"targets ({len(info['targets'])} modules):")
    lines += _table(rows)
    if info["modules_to_save"]:
      lines.append(f"trained in full ({len(info['modules_to_save'])} tensors):")
      lines += _table([[t["key"], _shape_str(t["shape"]), t["dtype"]]
                       for t in info["modules_to_save"]])
  lines.append(f"trainable: {info['trainable_params']:,} parameters, {info['bytes']:,} bytes")
  lines.append(f"checksums: {info['checksums']}")
  if info["format"] == "jlora":
    b = info["base"]
    lines.append(f"base: {b['params']} parameters, {b['elements']:,} elements, "
                 f"fingerprint sha256 {b['sha256']}")
  return "\n".join(lines)


def _format_params(info: dict[str, Any]) -> list[str]:
  """The lines of a base (or a bitsandbytes checkpoint): totals, then a table."""
  dtypes = ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items())
  lines = [f"parameters: {info['params']} tensors, {info['elements']:,} elements, "
           f"{info['bytes']:,} bytes ({dtypes})"]
  q, d = info["quantized"], info["dense"]
  if q:
    lines.append(f"quantized: {q['tensors']} tensors (NF4), {q['elements']:,} elements, "
                 f"{q['bytes']:,} bytes, {q['bits_per_param']:.3f} bits per parameter")
    lines.append(f"dense: {d['tensors']} tensors, {d['elements']:,} elements, {d['bytes']:,} "
                 f"bytes; {info['bits_per_param']:.3f} bits per parameter in all, "
                 f"{info['dequantized_bytes']:,} bytes dequantized")
  header = ["path", "shape", "dtype"] + (["stored"] if q else [])
  rows = [header]
  for t in info["tensors"]:
    row = [t["path"], _shape_str(t["shape"]), t["dtype"]]
    if q:
      qt = t.get("quant")
      row.append("dense" if qt is None else
                 f"nf4, block {qt['block_size']}{', double quant' if qt['double_quant'] else ''}"
                 f", {qt['bits_per_param']:.3f} bits")
    rows.append(row)
  return lines + _table(rows)


def _cmd_inspect(args: argparse.Namespace) -> int:
  kind = _kind(args.path)
  info = {"jlora": jorbax.describe, "peft": peft.describe, "peft-bank": peft.describe_bank,
          "params": base_files.describe, "bnb": bnb.describe}[kind](args.path)
  print(json.dumps(info, indent=2) if args.json else _format_inspect(info))
  return 0


# -- merge ---------------------------------------------------------------------------


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


def _merge_trees(frozen: Any, trainable: Any, quiet: bool, check_finite: bool
                 ) -> collections.OrderedDict:
  """``jlora.merge`` one parameter at a time, under a progress bar."""
  import jlora
  from tqdm import tqdm
  is_leaf = is_adapter
  f_pairs = flatten_with_paths(frozen)[0]
  t_pairs = dict(flatten_with_paths(trainable, is_leaf=is_leaf)[0])
  out = collections.OrderedDict()
  # disable=None: a bar on a terminal only, nothing in logs or pipes.
  for path, w0 in tqdm(f_pairs, desc="merging", unit="param", disable=True if quiet else None,
                       file=sys.stderr, leave=False):
    t = t_pairs.get(path)
    if is_adapter(t):     # any kind: LoRA, DoRA (a bank is refused by jlora.merge)
      out[path] = jlora.merge({path: w0}, {path: t}, check_finite=check_finite)[path]
    elif t is not None:
      out[path] = t  # trained in full
    elif isinstance(w0, NF4Array):
      out[path] = w0.dequantize()   # a merged model is dense, as jlora.merge makes it
    else:
      out[path] = w0
  return out


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


def _cmd_merge(args: argparse.Namespace) -> int:
  import jlora
  fmt = _out_format(args.out, args.format, "--out")
  out = _check_out(args.out, args.overwrite, {"--base": args.base, "--adapter": args.adapter})
  kind = _adapter_kind(args.adapter)
  if kind == "jlora" and (args.rules != "generic" or args.layout):
    raise LoraFileError("--rules/--layout are for PEFT folders; a jlora adapter stores its "
                        "names and layouts")
  base = base_files.read(args.base)
  if kind == "jlora":
    trainable, _, ordered = _load_jlora(args.adapter, base)
    frozen = jlora.frozen_like(ordered, trainable)
  else:
    adapter = _load_peft(args.adapter, base, args)
    frozen, trainable = adapter.frozen, adapter.trainable
  merged = _merge_trees(frozen, trainable, args.quiet, args.check_finite)
  merged = collections.OrderedDict((p, merged[p]) for p in base)  # the base's order
  written = base_files.save(out, merged, overwrite=args.overwrite)
  n_adapted = sum(is_adapter(x) for x in jax.tree.leaves(trainable, is_leaf=is_adapter))
  print(f"wrote {written} ({fmt}): {len(merged)} parameters, {n_adapted} merged with the "
        f"adapter")
  return 0


# -- convert -------------------------------------------------------------------------


def _cmd_convert(args: argparse.Namespace) -> int:
  kind = _adapter_kind(args.src)
  want = {"peft": "peft", "orbax": "jlora"}[args.to]
  if kind == want:
    what = "PEFT folder" if kind == "peft" else "jlora orbax adapter"
    raise LoraFileError(f"'{args.src}' is already a {what}; nothing to convert")
  dst = _check_out(args.dst, True, {"SRC": args.src, "--base": args.base})
  if args.to == "peft":
    if args.layout:
      raise LoraFileError("--layout is for reading PEFT folders; a jlora adapter stores its "
                          "layouts")
    if dst.exists() and (dst.is_file() or any(dst.iterdir())) and not args.overwrite:
      raise LoraFileError(f"'{dst}' already exists and is not empty; pass --overwrite to "
                          f"replace its files")
    base = base_files.read(args.base) if args.base else None
    trainable, spec, _ = _load_jlora(args.src, base)
    try:
      config = peft.save(dst, trainable, _rules(args), spec=spec,
                         base_model_name_or_path=args.base_model_name,
                         overwrite=args.overwrite)
    except LoraPeftError as e:
      raise _rules_hint(e, args) from e
    print(f"wrote {dst} (PEFT): r {config['r']}, lora_alpha {config['lora_alpha']}, "
          f"target_modules {config['target_modules']}")
    return 0
  if args.base is None:
    raise LoraFileError("--to orbax needs --base BASE: a jlora adapter records the base's "
                        "parameters (paths, shapes, dtypes), and PEFT's layouts come from "
                        "W0's shapes")
  if args.base_model_name is not None:
    raise LoraFileError("--base-model-name is for --to peft (adapter_config.json)")
  _check_out(dst, args.overwrite, {"SRC": args.src, "--base": args.base})
  base = base_files.read(args.base)
  adapter = _load_peft(args.src, base, args)
  jorbax.save(dst, adapter.trainable, adapter.spec, base=adapter.frozen,
              overwrite=args.overwrite)
  n = sum(is_adapter(x) for x in jax.tree.leaves(adapter.trainable, is_leaf=is_adapter))
  print(f"wrote {dst} (jlora orbax adapter): {n} adapted parameters")
  return 0


# -- quantize ------------------------------------------------------------------------


def _cmd_quantize(args: argparse.Namespace) -> int:
  import jlora
  fmt = _out_format(args.out, args.format, "OUT")
  out = _check_out(args.out, args.overwrite, {"BASE": args.base})
  if args.targets is not None:
    try:
      re.compile(args.targets)
    except re.error as e:
      raise LoraFileError(f"--targets {args.targets!r} is not a valid regex: {e}") from None
  base = base_files.read(args.base)
  layouts = {}
  for regex, layout in _parse_layouts(args.layout).items():
    hits = [p for p in base if re.fullmatch(regex, p)]
    if not hits:
      raise LoraFileError(f"--layout {regex!r} matches no parameter of '{args.base}'")
    for p in hits:
      layouts.setdefault(p, layout)
  from jlora.quant import default_target
  for p, x in base.items():
    chosen = (default_target(p, x) if args.targets is None
              else re.fullmatch(args.targets, p) is not None)
    if chosen and not isinstance(x, NF4Array) and x.ndim != 2 and p not in layouts:
      raise LoraFileError(f"'{p}' {tuple(x.shape)}: cannot tell its input axes (along which "
                          f"the quantization blocks run) from a {x.ndim}-D shape: pass "
                          f"--layout '{re.escape(p)}=IN:OUT[:STACK]' (e.g. a stacked Dense "
                          f"kernel (layers, in, out) is 1:2:0), or leave it out with --targets")
  quantized = jlora.quantize(base, args.targets, block_size=args.block_size,
                             double_quant=not args.no_double_quant, layouts=layouts)
  new = [p for p, x in quantized.items()
         if isinstance(x, NF4Array) and not isinstance(base[p], NF4Array)]
  if not new:
    raise LoraFileError(f"nothing to quantize in '{args.base}': no floating-point kernel of 2 "
                        f"or more axes that is not quantized already (choose with --targets)")
  written = base_files.save(out, quantized, overwrite=args.overwrite)

  def nbytes(tree):
    return sum(x.nbytes if isinstance(x, NF4Array) else x.size * x.dtype.itemsize
               for x in tree.values())
  dq = "" if args.no_double_quant else ", double quantization"
  print(f"wrote {written} ({fmt}): {len(new)} of {len(quantized)} parameters quantized to "
        f"NF4 (block size {args.block_size}{dq}); {nbytes(base):,} -> {nbytes(quantized):,} "
        f"bytes")
  return 0


# -- the parser ----------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # argparse prints usage + message; one line instead
    print(f"jlora: error: {' '.join(message.split())} (see '{self.prog} --help')",
          file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help="show the full traceback of an error")
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

  parser = _Parser(prog="jlora", description="Inspect, merge and convert LoRA adapters "
                   "(jlora orbax adapters and PEFT folders), and quantize bases to NF4.")
  parser.add_argument("--debug", action="store_true", default=False,
                      help="show the full traceback of an error")
  from jlora import __version__
  parser.add_argument("--version", action="version", version=f"jlora {__version__}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
  sub.required = True

  p = sub.add_parser("inspect", parents=[common], help="describe an adapter (or a base)",
                     description="Describe an adapter: its format, spec, targets with ranks "
                     "and shapes, trainable count, bytes and (jlora adapters) the base "
                     "fingerprint. Also reads a params checkpoint or .safetensors base "
                     "(quantized weights: NF4 format, bytes and bits per parameter) and a "
                     "Hugging Face bitsandbytes 4-bit checkpoint.")
  p.add_argument("path", help="a jlora adapter directory, a PEFT folder, a base, or a "
                 "bitsandbytes 4-bit checkpoint (file or folder)")
  p.add_argument("--json", action="store_true", help="print JSON")
  p.set_defaults(func=_cmd_inspect)

  p = sub.add_parser("merge", parents=[common, rules], help="merge an adapter into a base",
                     description="Write W0 + s B A for every adapted weight (float32 "
                     "accumulation, the base's dtypes) and the adapter's fully trained "
                     "weights: all the parameters of the merged model.")
  p.add_argument("--base", required=True, help="the base: an orbax params checkpoint "
                 "directory or a .safetensors file ('/'-joined keys); see jlora.base.save")
  p.add_argument("--adapter", required=True, help="a jlora adapter directory or a PEFT folder")
  p.add_argument("--out", required=True, help="the merged parameters: NAME.safetensors or "
                 "an orbax checkpoint directory")
  p.add_argument("--format", choices=["orbax", "safetensors"],
                 help="the output format (default: by --out's suffix)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  p.add_argument("--check-finite", action="store_true",
                 help="fail on a NaN or infinity in a merged weight")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(func=_cmd_merge)

  p = sub.add_parser("convert", parents=[common, rules],
                     help="convert between jlora orbax adapters and PEFT folders",
                     description="Convert a jlora orbax adapter to a PEFT folder (--to peft) "
                     "or a PEFT folder to a jlora orbax adapter (--to orbax, which needs "
                     "--base).")
  p.add_argument("src", help="the adapter to convert")
  p.add_argument("dst", help="the folder to write")
  p.add_argument("--to", required=True, choices=["peft", "orbax"], help="the output format")
  p.add_argument("--base", help="the base (needed for --to orbax; with --to peft, checked "
                 "against the adapter's fingerprint)")
  p.add_argument("--base-model-name", help="--to peft: base_model_name_or_path for "
                 "adapter_config.json")
  p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
  p.set_defaults(func=_cmd_convert)

  p = sub.add_parser("quantize", parents=[common], help="store a base's weights in NF4 (QLoRA)",
                     description="Store the selected weights of a base in 4-bit NormalFloat "
                     "(jlora.quantize): the bytes bitsandbytes writes, 4.127 bits per "
                     "parameter with double quantization. The output is again a base, with "
                     "the other parameters as they were.")
  p.add_argument("base", help="the base: an orbax params checkpoint directory or a "
                 ".safetensors file; see jlora.base.save")
  p.add_argument("out", help="the quantized base: NAME.safetensors or an orbax checkpoint "
                 "directory")
  p.add_argument("--targets", metavar="REGEX",
                 help="the weights to quantize, a regex matched against the whole path "
                      "(default: every floating-point kernel of 2 or more axes)")
  p.add_argument("--block-size", type=int, default=64, metavar="N",
                 help="values per absmax block (32, 64, ... 4096; default 64)")
  p.add_argument("--no-double-quant", action="store_true",
                 help="keep one float32 absmax per block (4.5 bits per parameter) instead of "
                      "quantizing them to 8 bits (4.127)")
  p.add_argument("--layout", action="append", metavar="REGEX=IN:OUT[:STACK]",
                 help="the layout of the weights whose path matches REGEX (needed for stacked "
                      "or multi-axis kernels; blocks run along the input axes), e.g. "
                      "'params/layers/.*/kernel=1:2:0'")
  p.add_argument("--format", choices=["orbax", "safetensors"],
                 help="the output format (default: by OUT's suffix)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
  p.set_defaults(func=_cmd_quantize)
  return parser


# -- main ----------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the ``jlora`` command line; returns the exit status.

  Errors (a missing file, a folder that is no adapter, an adapter made for
  another base, bad options) print one line, ``jlora: error: ...``, on
  stderr and return a non-zero status; ``--debug`` shows the traceback.

  Example:
    >>> import jlora.cli
    >>> jlora.cli.main(["inspect", "/no/such/adapter"])
    1
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    args = _parser().parse_args(argv)
  except SystemExit as e:  # --help, --version, or a usage error already reported
    return int(e.code or 0)
  debug = bool(getattr(args, "debug", False))
  loggers = [logging.getLogger(name) for name in ("absl", "jax", "orbax")]
  levels = [lg.level for lg in loggers]
  with warnings.catch_warnings():
    if not debug:
      # Orbax and JAX log warnings (missing sharding info, CPU fallback) that
      # say nothing about the user's files.
      warnings.simplefilter("ignore")
      for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
      return args.func(args)
    except BrokenPipeError:
      # stdout closed early (`jlora inspect ... | head`): nothing to report.
      try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      except (OSError, ValueError, AttributeError):
        pass
      return 1
    except (LoraError, OSError, ValueError) as e:
      if debug:
        raise
      print(f"jlora: error: {_one_line(e)}", file=sys.stderr)
      return 1
    except KeyboardInterrupt:
      print("jlora: error: interrupted", file=sys.stderr)
      return 130
    except Exception as e:  # a bug: one line, the traceback with --debug
      if debug:
        raise
      print(f"jlora: error: unexpected {type(e).__name__}: {_one_line(e)} (run with "
            f"--debug for the traceback)", file=sys.stderr)
      return 1
    finally:
      for lg, level in zip(loggers, levels):
        lg.setLevel(level)


if __name__ == "__main__":
  sys.exit(main())
