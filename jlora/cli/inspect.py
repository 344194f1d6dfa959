"""``jlora inspect PATH [--json]``: describe an adapter, a base or a
bitsandbytes 4-bit checkpoint.

The format's own ``describe`` (``jlora.orbax``, ``jlora.peft``,
``jlora.base``, ``jlora.bnb``) says what the file holds; this command picks
it by what the path is and prints its result, as text or as JSON.
"""

from __future__ import annotations

import argparse
import json

from jlora import base as base_files
from jlora import bnb
from jlora import orbax as jorbax
from jlora import peft
from jlora.cli._options import _kind
from jlora.cli._render import _format_inspect


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
  """Adds ``inspect`` to the ``jlora`` parser's subcommands."""
  p = sub.add_parser("inspect", parents=[common], help="describe an adapter (or a base)",
                     description="Describe an adapter: its format, spec, targets with ranks "
                     "and shapes, trainable count, bytes and (jlora adapters) the base "
                     "fingerprint. Also reads a params checkpoint or .safetensors base "
                     "(quantized weights: NF4 format, bytes and bits per parameter) and a "
                     "Hugging Face bitsandbytes 4-bit checkpoint.")
  p.add_argument("path", help="a jlora adapter directory, a PEFT folder, a base, or a "
                 "bitsandbytes 4-bit checkpoint (file or folder)")
  p.add_argument("--json", action="store_true", help="print JSON")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  """Prints the description of ``args.path``; returns the exit status."""
  kind = _kind(args.path)
  # Looked up per call, not bound at import: a format's describe may be replaced (tests do).
  info = {"jlora": jorbax.describe, "peft": peft.describe, "peft-bank": peft.describe_bank,
          "params": base_files.describe, "bnb": bnb.describe}[kind](args.path)
  print(json.dumps(info, indent=2) if args.json else _format_inspect(info))
  return 0
