"""``python -m jlora``: the ``jlora`` command line (see ``jlora.cli``)."""

from jlora.cli import console

if __name__ == "__main__":  # not when imported (e.g. by doctest collection)
  console()
