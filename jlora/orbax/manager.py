"""Training checkpoints: ``jlora.orbax.CheckpointManager``.

Each step is a directory ``directory/<step>`` holding the adapter (as
``jlora.orbax.save`` writes it), the optimizer state and the step, never
the base, plus jlora's manifest (``jlora.orbax.manifest``), written into
orbax's temporary directory before orbax renames it into place: a step
directory without a valid manifest is never listed nor restored.

Steps that ``max_to_keep`` drops are first renamed into ``directory/.jlora-deleted``
and deleted there, so a kill during the cleanup never leaves a half-deleted
step under a step's name; the next manager empties that folder.
"""

from __future__ import annotations

import atexit
import json
import os
import pathlib
import sys
import threading
import warnings
from typing import Any, Callable, Mapping, NamedTuple


from jlora import _atomic, _multihost
from jlora.errors import LoraCheckpointError, LoraFileError
from jlora.spec import LoraSpec
from jlora.orbax import encoding, manifest, names, payload, validation
from jlora.orbax import restore as restore_lib

PathLike = str | os.PathLike
# Where steps dropped by max_to_keep are moved before being deleted.
TRASH = ".jlora-deleted"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


class TrainCheckpoint(NamedTuple):
  """What ``CheckpointManager.restore`` returns."""
  step: int
  trainable: Any
  opt_state: Any
  extra: Any


def _write_pending_manifests(directory: pathlib.Path) -> None:
  """Called by orbax once a step is fully written in its temporary directory,
  before it renames it: the manifest makes the step complete."""
  if _multihost.process_index() != 0:
    return
  for tmp in directory.glob(f"*{_TMP_SUFFIX}*"):
    step = tmp.name.split(_TMP_SUFFIX)[0]
    if step.isdigit() and tmp.is_dir() and not (tmp / manifest.NAME).exists():
      manifest.write(tmp, names.TRAIN_FORMAT)


def _finish_at_exit(holder: list, directory: pathlib.Path) -> None:
  """At interpreter exit: writes out a background save the program did not
  wait for (``holder[0]``, the orbax manager, until ``close``), or says loudly
  that it could not."""
  mngr = holder[0]
  if mngr is None:
    return
  holder[0] = None
  try:
    with validation.quiet():
      mngr.wait_until_finished()
      mngr.close()
  except BaseException as e:  # noqa: BLE001 - reported, then the exit status says it
    print(f"jlora: error: a checkpoint save in '{directory}' did not finish at exit "
          f"({type(e).__name__}: {' '.join(str(e).split())})", file=sys.stderr, flush=True)
    os._exit(1)


def _at_exit(fn: Callable[[], None]) -> None:
  """Runs ``fn`` at interpreter exit before the thread pools orbax writes with
  are shut down (``threading``'s own exit hooks run before ``atexit``'s)."""
  register = getattr(threading, "_register_atexit", None)
  try:
    if register is not None:
      register(fn)
      return
  except RuntimeError:  # the interpreter is already shutting down
    pass
  atexit.register(fn)


class CheckpointManager:
  """Training checkpoints of an adapter: A, B, extras, optimizer state, step.

  A layer over ``orbax.checkpoint.CheckpointManager``: each step is a
  directory ``directory/<step>`` holding the adapter (as ``jlora.orbax.save``
  writes it) and the optimizer state, never the base. The last
  ``max_to_keep`` steps are kept. Saves are atomic (a step is listed only
  once complete and verified; an interrupted save or cleanup leaves the
  previous steps intact and is cleaned up when a manager is next created)
  and, with ``async_save``, written in the background once the arrays are on
  the host; a background save the program did not wait for is finished at
  interpreter exit. Restoring verifies every file, the base fingerprint and
  every array's checksum, and places the arrays on the shardings of ``base``
  and of the templates, whatever the sharding they were saved with.

  With several JAX processes (``jax.distributed``), every process creates
  the manager and calls ``save``, ``restore`` and ``close`` alike, as with
  orbax's own manager: each writes its shards of a step, process 0 writes
  the manifest that completes it and cleans up, and a step is listed only
  once every process has written its part, so a process killed during a
  save leaves the previous steps as the latest complete ones. A checkpoint
  restores onto any process and device count (the shardings of ``base``
  and of the templates decide). The directory must be one file system
  seen by every process.

  Args:
    directory: the root directory (created if missing).
    base: the frozen part (or the parameters) being fine-tuned; its
      fingerprint is stored and checked on restore, and its shardings place
      the restored factors.
    spec: the spec, stored with each step; on restore, the stored factors'
      ranks and scales must be the ones it gives.
    max_to_keep: keep the last N steps (None: keep all).
    save_interval_steps: ``save`` writes only at multiples of N unless forced
      (or when JAX has received a preemption notice).
    async_save: write in a background thread (call ``wait_until_finished``
      or ``close``, or use ``with``; at exit, a pending save is finished).

  Raises:
    LoraCheckpointError: ``directory`` cannot be created or read, or
      ``max_to_keep`` is not None or >= 1.

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
    # Checksums of the residual W0s that PiSSA-style adapters are relative to,
    # computed at the first save (the base does not change between steps).
    self._residual_sums: dict[str, str | None] = {}
    self._async = async_save
    self._lock = threading.Lock()
    try:
      self._directory.mkdir(parents=True, exist_ok=True)
      if not self._directory.is_dir():
        raise NotADirectoryError(20, "not a directory", os.fspath(self._directory))
      self._empty_trash()
    except OSError as e:
      raise LoraCheckpointError(
          _atomic.os_error(e, self._directory, "use checkpoint directory")) from None
    policies = ocp.checkpoint_managers
    directory_ = self._directory
    options = ocp.CheckpointManagerOptions(
        # Orbax's default also saves the first step it sees; every N steps is
        # easier to reason about. A preemption notice still forces a save.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_interval_steps),
            policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=policies.LatestN(n=max_to_keep),
        # Always orbax's asynchronous checkpointer: its post-finalization
        # callback writes jlora's manifest before the step is renamed into
        # place. A synchronous manager waits for each save.
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(
            post_finalization_callback=lambda: _write_pending_manifests(directory_)),
        todelete_subdir=TRASH,
        cleanup_tmp_directories=True,
        create=True)
    try:
      with validation.quiet():
        self._mngr = ocp.CheckpointManager(self._directory, options=options)
    except OSError as e:
      raise LoraCheckpointError(
          _atomic.os_error(e, self._directory, "use checkpoint directory")) from None
    # Until close(), a background save is finished at interpreter exit.
    self._pending: list | None = [self._mngr]
    _at_exit(lambda holder=self._pending, d=self._directory: _finish_at_exit(holder, d))

  @property
  def directory(self) -> pathlib.Path:
    return self._directory

  def _empty_trash(self) -> None:
    """Deletes the steps max_to_keep dropped (and what a killed deletion left);
    with several processes, process 0 alone touches the shared directory."""
    if _multihost.process_index() != 0:
      return
    trash = self._directory / TRASH
    for left in _atomic.leftovers(trash).values():
      for p in left:
        _atomic.remove(p)
    if _atomic.exists(trash):
      _atomic.remove(trash)

  def _check_open(self) -> None:
    if self._pending is None:
      raise LoraCheckpointError(f"the CheckpointManager of '{self._directory}' is closed")

  def _complete(self, step: int) -> bool:
    """Whether a step is listed: its manifest (written last) and every file
    it lists are there. A step whose manifest is damaged is listed, so that
    restoring it says so rather than silently restoring an older step."""
    d = self.step_path(step)
    try:
      body = manifest.read(d)
    except LoraFileError:
      return True
    if body is None:
      return False
    return all(os.path.exists(d / rel) for rel, _, _ in body["files"])

  def all_steps(self) -> list[int]:
    """The steps with a complete checkpoint, ascending: jlora's manifest and
    every file it lists are there (``restore`` verifies their contents).

    A step directory an interrupted save or cleanup left incomplete is not
    listed, nor is a background save still in flight (``wait_until_finished``)."""
    with validation.quiet():
      steps = sorted(self._mngr.all_steps())
    return [s for s in steps if self._complete(s)]

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_path(self, step: int) -> pathlib.Path:
    """The directory of ``step``: ``jlora.orbax.load`` reads the adapter there."""
    ocp = names.ocp()
    return pathlib.Path(ocp.step.build_step_path(
        self._directory, ocp.step.standard_name_format(), step))

  def save(self, step: int, trainable: Any, opt_state: Any, *,
           extra: Mapping[str, Any] | None = None, force: bool = False,
           overwrite: bool = False) -> bool:
    """Saves the adapter and optimizer state at ``step``.

    Args:
      step: the training step (the number of updates applied).
      trainable: the trainable part.
      opt_state: the optimizer state (any pytree of arrays, such as optax's).
      extra: JSON-serialisable metadata saved with the step (e.g. a data
        loader's position), returned by ``restore``.
      force: save even if ``save_interval_steps`` says not to.
      overwrite: allow a step that is not after the latest one (training
        resumed from an earlier step): the existing ``step`` and every later
        step are deleted first.

    Returns:
      Whether a checkpoint was written (or started, with ``async_save``);
      False only when ``save_interval_steps`` skips ``step``.

    Raises:
      LoraCheckpointError: ``step`` already exists or is older than the
        latest step (without ``overwrite``), ``extra`` is not JSON, or the
        write failed.
    """
    ocp = names.ocp()
    self._check_open()
    self._mngr.wait_until_finished()
    with validation.quiet():
      existing = sorted(self._mngr.all_steps())
    later = [s for s in existing if s >= step]
    if later:
      if not overwrite:
        what = (f"step {step} already exists" if step in existing else
                f"step {step} is older than the latest step {existing[-1]}")
        raise LoraCheckpointError(
            f"{what} in '{self._directory}' (steps: {existing}); pass overwrite=True to "
            f"replace step {step}, which deletes steps {later}")
      for s in later:
        with validation.quiet():
          self._mngr.delete(s)
      self._empty_trash()
    if not force and not self._mngr.should_save(step):
      return False
    saved, meta = payload.adapter_payload(trainable, self._spec, self._base,
                                          self._residual_sums)
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
    try:
      with validation.quiet():
        written = self._mngr.save(step, args=ocp.args.Composite(**items), force=force)
    except OSError as e:
      raise LoraCheckpointError(
          _atomic.os_error(e, self.step_path(step), "write checkpoint")) from None
    if not self._async:
      self.wait_until_finished()
    return written

  def restore(self, step: int | None = None, *, opt_state: Any,
              trainable: Any = None, fall_back: bool = False) -> TrainCheckpoint:
    """Restores a step (the latest by default).

    Args:
      step: the step to restore; None for the latest complete one.
      opt_state: a template of the optimizer state (``tx.init(trainable)``,
        or abstract leaves from ``jax.eval_shape``): its structure, and its
        leaves' shardings if they have any, are those of the restored state.
      trainable: optional template of the trainable part, whose shardings
        override those derived from ``base``.
      fall_back: with ``step=None``, restore the latest step whose files
        verify, skipping (with a warning naming them) later damaged ones.

    Returns:
      ``TrainCheckpoint(step, trainable, opt_state, extra)``.

    Raises:
      LoraCheckpointError: no checkpoint, a step that does not exist, a
        damaged step (naming the older steps that verify), a different base,
        spec or optimizer structure, or an unreadable checkpoint (the message
        names its directory).
    """
    self.wait_until_finished()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise LoraCheckpointError(f"no complete checkpoint in '{self._directory}'")
      step = self._latest_good(steps, fall_back)
    elif step not in steps:
      raise LoraCheckpointError(
          f"no checkpoint for step {step} in '{self._directory}' (steps: {steps})")
    else:
      manifest.verify(self.step_path(step), (names.TRAIN_FORMAT,))
    path = self.step_path(step)
    restore = validation.checkpointer_restore(path)
    meta = validation.read_json(restore, names.ADAPTER_META, path, names.FORMAT)
    train_meta = validation.read_json(restore, names.TRAIN_META, path, names.TRAIN_FORMAT)
    if self._spec is not None:
      callables = any(callable(getattr(self._spec, n)) for n in names.SELECTORS)
      problem = restore_lib.mismatch(meta, self._spec, selection=not callables)
      if problem is not None:
        raise LoraCheckpointError(
            f"checkpoint '{path}' was saved with another spec than this manager's: "
            f"{problem}; create the manager with the spec the run was saved with")
    stored_spec = encoding.spec_from_meta(meta, path)
    restored_trainable = restore_lib.restore_trainable(restore, meta, self._base, path,
                                                      template=trainable, spec=stored_spec)
    restored_opt = restore_lib.restore_opt_state(restore, train_meta, opt_state, path)
    return TrainCheckpoint(int(train_meta["step"]), restored_trainable, restored_opt,
                           train_meta.get("extra"))

  def _latest_good(self, steps: list[int], fall_back: bool) -> int:
    damaged: list[tuple[int, str]] = []
    for s in reversed(steps):
      try:
        manifest.verify(self.step_path(s), (names.TRAIN_FORMAT,))
      except LoraCheckpointError as e:
        damaged.append((s, str(e)))
        if not fall_back:
          good = [t for t in steps if t < s and self._verifies(t)]
          hint = (f"the older steps {good} verify: restore(step={good[-1]}, ...) or "
                  f"restore(..., fall_back=True) restores step {good[-1]}" if good
                  else "no older step verifies")
          raise LoraCheckpointError(f"{e}; {hint}") from None
        continue
      if damaged:
        warnings.warn(f"jlora: skipped damaged checkpoint steps {[d for d, _ in damaged]} "
                      f"in '{self._directory}' ({damaged[0][1]}); restoring step {s}",
                      stacklevel=3)
      return s
    raise LoraCheckpointError(f"no step in '{self._directory}' verifies: {damaged[0][1]}")

  def _verifies(self, step: int) -> bool:
    try:
      manifest.verify(self.step_path(step), (names.TRAIN_FORMAT,))
    except LoraCheckpointError:
      return False
    return True

  def wait_until_finished(self) -> None:
    """Blocks until a background save has been written.

    Raises:
      LoraCheckpointError: the background save failed (naming the directory).
    """
    try:
      with validation.quiet():
        self._mngr.wait_until_finished()
    except OSError as e:
      raise LoraCheckpointError(
          _atomic.os_error(e, self._directory, "write checkpoint")) from None
    except Exception as e:  # orbax re-raises what its background thread met
      raise LoraCheckpointError(
          _atomic.library_error(e, self._directory, "write checkpoint")) from e
    with self._lock:
      try:
        self._empty_trash()
      except OSError:
        pass  # emptied by the next manager

  def close(self) -> None:
    """Waits for a background save, then releases orbax's resources."""
    if self._pending is None:
      return
    try:
      self.wait_until_finished()
    finally:
      self._pending[0] = None
      self._pending = None
      with validation.quiet():
        self._mngr.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
