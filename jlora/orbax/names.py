"""The names of jlora's orbax checkpoints: formats, item folders, markers.

Example:
  >>> FORMAT, TRAIN_FORMAT, (ADAPTER, ADAPTER_META, OPT, TRAIN_META)
  ('jlora.adapter', 'jlora.train_state', ('adapter', 'adapter_meta', 'opt_state', 'train_meta'))
"""

from __future__ import annotations

FORMAT = "jlora.adapter"
TRAIN_FORMAT = "jlora.train_state"
VERSION = 1
# Orbax item names: subdirectories of a checkpoint directory.
ADAPTER, ADAPTER_META = "adapter", "adapter_meta"
OPT, TRAIN_META = "opt_state", "train_meta"
TAG = "__jlora__"
# Fields of LoraSpec that select parameters (regex, names or a callable).
SELECTORS = ("targets", "exclude", "extra_trainable")


def ocp():
  # Imported on first use: orbax takes a third of `import jlora`'s time.
  import orbax.checkpoint as ocp
  return ocp
