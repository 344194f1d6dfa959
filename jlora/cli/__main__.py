"""``python -m jlora.cli``: the same command line as ``jlora`` and ``python -m jlora``."""

import sys

from jlora.cli import main

if __name__ == "__main__":  # not when imported (e.g. by doctest collection)
  sys.exit(main())
