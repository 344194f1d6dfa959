"""``python -m jlora``: the ``jlora`` command line (see ``jlora.cli``)."""

import sys

from jlora.cli import main

if __name__ == "__main__":  # not when imported (e.g. by doctest collection)
  sys.exit(main())
