"""``jlora merge --base BASE --adapter ADAPTER --out OUT``: a merged model, again
a base.

Every adapted weight becomes ``W0 + s B A`` (``jlora.merge``: float32
accumulation, the base's dtypes), the adapter's fully trained weights replace
the base's, and NF4 weights without an adapter are dequantized: the output
holds all the parameters of the merged model, written by ``jlora.base.save``.
"""

from __future__ import annotations

import argparse
import collections
import sys
from typing import Any

import jax

from jlora import base as base_files
from jlora._paths import flatten_with_paths
from jlora.adapters.adapter import is_adapter
from jlora.cli._options import (_adapter_kind, _check_out, _load_jlora, _load_peft,
                                _out_format, _rules_parser)
from jlora.errors import LoraFileError
from jlora.quant.nf4 import NF4Array


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
  """Adds ``merge`` to the ``jlora`` parser's subcommands."""
  p = sub.add_parser("merge", parents=[common, _rules_parser()],
                     help="merge an adapter into a base",
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
  p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
  """Writes the merged model to ``args.out``; returns the exit status."""
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
