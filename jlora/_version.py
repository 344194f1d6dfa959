"""jlora's version: the one place it is written.

``pyproject.toml`` reads it at build time (``[tool.setuptools.dynamic]``,
which parses this file without importing jlora), and ``jlora.__version__``
imports it, so a wheel, an sdist and a source tree all agree.
"""

__version__ = "0.2.0"
