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

The package holds a module per command (``inspect``, ``merge``, ``convert``,
``quantize``: each adds its subparser with ``add_parser`` and runs with
``run``), the options and loaders they share (``_options``), the text
``inspect`` prints (``_render``) and the handling of Ctrl-C
(``_interrupt``); this module assembles the parser and runs
``main``. The commands only parse arguments and render what the formats
(``jlora.orbax``, ``jlora.peft``, ``jlora.base``, ``jlora.bnb``) describe.
Only JSON, orbax and safetensors are read: nothing is unpickled and no code
from a file runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Sequence

from jlora.cli import _interrupt, convert, inspect, merge, quantize
from jlora.cli._render import _one_line
from jlora.errors import LoraError

__all__ = ["console", "main"]

# The status after Ctrl-C, as a shell reports a process that SIGINT ended.
_INTERRUPTED = 130

# In the order `jlora --help` lists them.
_COMMANDS = (inspect, merge, convert, quantize)


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # argparse prints usage + message; one line instead
    print(f"jlora: error: {' '.join(message.split())} (see '{self.prog} --help')",
          file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help="show the full traceback of an error")

  parser = _Parser(prog="jlora", description="Inspect, merge and convert LoRA adapters "
                   "(jlora orbax adapters and PEFT folders), and quantize bases to NF4.")
  parser.add_argument("--debug", action="store_true", default=False,
                      help="show the full traceback of an error")
  from jlora import __version__
  parser.add_argument("--version", action="version", version=f"jlora {__version__}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
  sub.required = True

  for command in _COMMANDS:
    command.add_parser(sub, common)
  return parser


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
  with warnings.catch_warnings(), _interrupt.delivered() as interrupt_caught:
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
    except KeyboardInterrupt:   # staged files are gone: every writer cleans up as it unwinds
      interrupt_caught()
      print("jlora: error: interrupted", file=sys.stderr)
      return _INTERRUPTED
    except Exception as e:  # a bug: one line, the traceback with --debug
      if debug:
        raise
      print(f"jlora: error: unexpected {type(e).__name__}: {_one_line(e)} (run with "
            f"--debug for the traceback)", file=sys.stderr)
      return 1
    finally:
      for lg, level in zip(loggers, levels):
        lg.setLevel(level)


def console() -> None:
  """The ``jlora`` console script: ``main`` on ``sys.argv``, then exit.

  After Ctrl-C the process ends at once (``_interrupt.exit_after_interrupt``)
  rather than through the interpreter's shutdown, which would print the
  failures of objects the interrupt left half-built.
  """
  status = main()
  if status == _INTERRUPTED:
    _interrupt.exit_after_interrupt(status)
  sys.exit(status)
