"""Adapters as orbax checkpoints: one adapter, or training checkpoints.

Two entry points share one on-disk layout (an orbax composite checkpoint,
see ``jlora.orbax.adapter``):

* ``save`` / ``load`` / ``metadata``: one adapter in one directory, for
  export and for loading onto a base model;
* ``CheckpointManager``: training checkpoints (adapter, optimizer state and
  step) under ``directory/<step>``, keeping the last N, restorable onto any
  sharding;
* ``describe``: what an adapter holds, as a dict (``jlora inspect``).

Only the trainable part is written, with JSON metadata: the spec, each
factor's scale, layout and dropout, a SHA-256 per array and a fingerprint
of the base (every parameter's path, shape and dtype). Nothing is pickled.

The modules: ``names`` (formats and item folders), ``encoding`` (spec and
LoRA metadata as JSON), ``fingerprint`` (the base's), ``payload`` (what a
save writes), ``validation`` (reading metadata), ``arrays`` (checksums,
shardings, array restore), ``restore`` (the trainable tree and optimizer
state), ``adapter``, ``manager`` and ``describe``.

Example:
  >>> import tempfile, jax, jax.numpy as jnp, jlora
  >>> params = {"w": jnp.ones((8, 4))}
  >>> spec = jlora.LoraSpec(rank=2, targets=["w"])
  >>> frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  >>> d = jlora.orbax.save(f"{tempfile.mkdtemp()}/a", trainable, spec, base=frozen)
  >>> jlora.orbax.load(d, base=frozen)[1] == spec
  True
"""

from jlora.orbax.adapter import is_adapter, load, metadata, save
from jlora.orbax.describe import describe
from jlora.orbax.manager import CheckpointManager, TrainCheckpoint

__all__ = ["CheckpointManager", "TrainCheckpoint", "describe", "is_adapter", "load",
           "metadata", "save"]
