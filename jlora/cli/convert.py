"""``jlora convert SRC DST --to peft|orbax``: a jlora orbax adapter as a PEFT
folder, or a PEFT folder as a jlora orbax adapter.

``jlora.orbax.load`` and ``jlora.peft.save`` one way, ``jlora.peft.load``
and ``jlora.orbax.save`` the other; PEFT module names come from the
``--rules`` options (``jlora.cli._options``).
"""

from __future__ import annotations

import argparse

import jax

from jlora import base as base_files
from jlora import orbax as jorbax
from jlora import peft
from jlora.adapters.adapter import is_adapter
from jlora.cli._options import (_adapter_kind, _check_out, _load_jlora, _load_peft, _rules,
                                _rules_hint, _rules_parser)
from jlora.errors import LoraFileError, LoraPeftError


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
  """Adds ``convert`` to the ``jlora`` parser's subcommands."""
  p = sub.add_parser("convert", parents=[common, _rules_parser()],
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
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  """Writes ``args.src`` in the other format to ``args.dst``; returns the exit status."""
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
