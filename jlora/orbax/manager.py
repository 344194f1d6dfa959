"""Training checkpoints: ``jlora.orbax.CheckpointManager``.

Each step is a directory ``directory/<step>`` holding the adapter (as
``jlora.orbax.save`` writes it), the optimizer state and the step, never
the base.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, NamedTuple

from jlora.errors import LoraCheckpointError
from jlora.spec import LoraSpec
from jlora.orbax import names, payload, validation
from jlora.orbax import restore as restore_lib

PathLike = str | os.PathLike


class TrainCheckpoint(NamedTuple):
  """What ``CheckpointManager.restore`` returns."""
  step: int
  trainable: Any
  opt_state: Any
  extra: Any


class CheckpointManager:
  """Training checkpoints of an adapter: A, B, extras, optimizer state, step.

  A thin layer over ``orbax.checkpoint.CheckpointManager``: each step is a
  directory ``directory/<step>`` holding the adapter (as ``jlora.orbax.save``
  writes it) and the optimizer state, never the base. The last
  ``max_to_keep`` steps are kept. Saves are atomic (an interrupted save
  leaves the previous steps intact and is cleaned up when a manager is next
  created) and, with ``async_save``, written in the background once the
  arrays are on the host. Restoring verifies the base fingerprint and every
  array's checksum, and places the arrays on the shardings of ``base`` and of
  the templates, whatever the sharding they were saved with.

  Args:
    directory: the root directory (created if missing).
    base: the frozen part (or the parameters) being fine-tuned; its
      fingerprint is stored and checked on restore, and its shardings place
      the restored factors.
    spec: the spec, stored with each step.
    max_to_keep: keep the last N steps (None: keep all).
    save_interval_steps: ``save`` writes only at multiples of N unless forced
      (or when JAX has received a preemption notice).
    async_save: write in a background thread (call ``wait_until_finished``
      or ``close``, or use ``with``, before the process ends).

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, optax, jlora
    >>> params = {"w": jnp.ones((8, 4))}
    >>> frozen, trainable = jlora.lora_transform(
    ...     params, jlora.LoraSpec(rank=2, targets=["w"]), key=jax.random.key(0))
    >>> tx = jlora.optimizer(optax.adam(1e-3), trainable)
    >>> opt_state = tx.init(trainable)
    >>> with jlora.orbax.CheckpointManager(tempfile.mkdtemp(), base=frozen, max_to_keep=2) as mngr:
    ...   _ = mngr.save(5, trainable, opt_state)
    ...   restored = mngr.restore(opt_state=opt_state)
    >>> restored.step
    5
  """

  def __init__(self, directory: PathLike, *, base: Any, spec: LoraSpec | None = None,
               max_to_keep: int | None = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    if max_to_keep is not None and (isinstance(max_to_keep, bool) or max_to_keep < 1):
      raise LoraCheckpointError(f"max_to_keep must be None or >= 1, got {max_to_keep!r}")
    ocp = names.ocp()
    self._directory = pathlib.Path(directory).absolute()
    self._base = base
    self._spec = spec
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        # Orbax's default also saves the first step it sees; every N steps is
        # easier to reason about. A preemption notice still forces a save.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_interval_steps),
            policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=policies.LatestN(n=max_to_keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True)
    self._mngr = ocp.CheckpointManager(self._directory, options=options)

  @property
  def directory(self) -> pathlib.Path:
    return self._directory

  def all_steps(self) -> list[int]:
    """The steps with a complete checkpoint, ascending."""
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_path(self, step: int) -> pathlib.Path:
    """The directory of ``step``: ``jlora.orbax.load`` reads the adapter there."""
    ocp = names.ocp()
    return pathlib.Path(ocp.step.build_step_path(
        self._directory, ocp.step.standard_name_format(), step))

  def save(self, step: int, trainable: Any, opt_state: Any, *,
           extra: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Saves the adapter and optimizer state at ``step``.

    Args:
      step: the training step (the number of updates applied).
      trainable: the trainable part.
      opt_state: the optimizer state (any pytree of arrays, such as optax's).
      extra: JSON-serialisable metadata saved with the step (e.g. a data
        loader's position), returned by ``restore``.
      force: save even if ``save_interval_steps`` says not to.

    Returns:
      Whether a checkpoint was written (or started, with ``async_save``).
    """
    ocp = names.ocp()
    if not force and not self._mngr.should_save(step):
      return False
    saved, meta = payload.adapter_payload(trainable, self._spec, self._base)
    opt_arrays, opt_rows = payload.opt_payload(opt_state)
    try:
      json.dumps(extra)
    except (TypeError, ValueError) as e:
      raise LoraCheckpointError(f"extra must be JSON-serialisable: {e}") from None
    train_meta = {"format": names.TRAIN_FORMAT, "version": names.VERSION, "step": int(step),
                  "opt_state": opt_rows, "extra": extra}
    items = {names.ADAPTER: ocp.args.StandardSave(saved),
             names.ADAPTER_META: ocp.args.JsonSave(meta),
             names.TRAIN_META: ocp.args.JsonSave(train_meta)}
    if opt_arrays:  # orbax refuses an empty item (e.g. plain SGD's state)
      items[names.OPT] = ocp.args.StandardSave(opt_arrays)
    if step in self._mngr.all_steps():
      raise LoraCheckpointError(f"step {step} already exists in '{self._directory}'")
    return self._mngr.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int | None = None, *, opt_state: Any,
              trainable: Any = None) -> TrainCheckpoint:
    """Restores a step (the latest by default).

    Args:
      step: the step to restore; None for the latest complete one.
      opt_state: a template of the optimizer state (``tx.init(trainable)``,
        or abstract leaves from ``jax.eval_shape``): its structure, and its
        leaves' shardings if they have any, are those of the restored state.
      trainable: optional template of the trainable part, whose shardings
        override those derived from ``base``.

    Returns:
      ``TrainCheckpoint(step, trainable, opt_state, extra)``.

    Raises:
      LoraCheckpointError: no checkpoint, a step that does not exist, a
        different base or optimizer structure, or an unreadable or corrupted
        checkpoint (the message names its directory).
    """
    self._mngr.wait_until_finished()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise LoraCheckpointError(f"no complete checkpoint in '{self._directory}'")
      step = steps[-1]
    elif step not in steps:
      raise LoraCheckpointError(
          f"no checkpoint for step {step} in '{self._directory}' (steps: {steps})")
    path = self.step_path(step)
    restore = lambda args: self._mngr.restore(step, args=args)
    meta = validation.read_json(restore, names.ADAPTER_META, path, names.FORMAT)
    train_meta = validation.read_json(restore, names.TRAIN_META, path, names.TRAIN_FORMAT)
    restored_trainable = restore_lib.restore_trainable(restore, meta, self._base, path,
                                                      template=trainable)
    restored_opt = restore_lib.restore_opt_state(restore, train_meta, opt_state, path)
    return TrainCheckpoint(int(train_meta["step"]), restored_trainable, restored_opt,
                           train_meta.get("extra"))

  def wait_until_finished(self) -> None:
    """Blocks until a background save has been written."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
