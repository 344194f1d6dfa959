"""``python -m jlora.cli``: the same command line as ``jlora`` and ``python -m jlora``."""

from jlora.cli import console

if __name__ == "__main__":  # not when imported (e.g. by doctest collection)
  console()
