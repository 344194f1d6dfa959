"""``jlora quantize BASE OUT``: a base with its selected weights stored in NF4.

``jlora.quantize`` does the work (the bytes bitsandbytes writes); this
command checks the options first, so that a weight whose input axes a 2-D
rule cannot tell is refused by name with the ``--layout`` to pass, and
writes the result with ``jlora.base.save``.
"""

from __future__ import annotations

import argparse
import re

from jlora import base as base_files
from jlora.cli._options import _check_out, _out_format, _parse_layouts
from jlora.errors import LoraFileError
from jlora.quant.nf4 import NF4Array


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
  """Adds ``quantize`` to the ``jlora`` parser's subcommands."""
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
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  """Writes the quantized base to ``args.out``; returns the exit status."""
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
