"""Failure injection for jlora's writers: a zygote that forks one child per case.

Run as a script, it imports jlora once (never touching the XLA backend, so
forking is safe), then reads JSON commands on stdin, one per line, and for
each forks a child and answers one JSON line on stdout:

  {"op": "prepare", "writer": W, "dir": D}     write W's inputs and old state in D
  {"op": "run", "writer": W, "dir": D, "template": T, "kill_at": K}
      copy T to D, then run W's write there, counting file-system events
      (renames, unlinks, mkdirs, writes, fsyncs...) and SIGKILLing itself at
      event K (none: run to the end and report the events)
  {"op": "verify", "writer": W, "dir": D}
      read D (a digest of what the reader finds, or the error), run W's write
      again (the next call must finish or clean up), read again, list the
      staging entries left behind
  {"op": "read", "writer": W, "dirs": [D...]}
      read each D (corrupted copies), reporting a digest or the error
  {"op": "script", "code": C, "argv": [...], "stdout": F}
      run the Python source C as ``__main__`` (what ``python -c C ARGV...``
      would do in a new interpreter, without its seconds of imports), its
      stdout in F

Each child's stderr goes to a file whose tracebacks the test counts as poor
messages. Everything is built from NumPy: no XLA compilation in a child.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import itertools
import json
import os
import pathlib
import shutil
import signal
import sys
import threading
import traceback

import numpy as np

import jax
import jlora
import jlora.cli
from jlora import _atomic
from jlora.quant import nf4
# What jlora imports lazily, imported once here rather than in every child.
import orbax.checkpoint  # noqa: F401,E402
import safetensors.flax  # noqa: F401,E402
import safetensors.numpy  # noqa: F401,E402
import tqdm  # noqa: F401,E402

SPEC = jlora.LoraSpec(rank=2, alpha=4, targets=r"l\d/kernel", extra_trainable=r"head/.*")
SHAPES = {"l1": {"kernel": (16, 24), "bias": (24,)}, "l2": {"kernel": (24, 8), "bias": (8,)},
          "head": {"kernel": (8, 4), "bias": (4,)}}


def is_lp(x):
  return isinstance(x, jlora.LoraParam)


def params(seed: int, scale: float = 1.0):
  rng = np.random.default_rng(seed)
  return {m: {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in leaves.items()}
          for m, leaves in SHAPES.items()}


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def adapter(seed: int):
  """(frozen, trainable, opt_state) of version ``seed``, as NumPy arrays."""
  base = params(0)
  _, trainable = jlora.lora_transform(abstract(base), SPEC)
  rng = np.random.default_rng(100 + seed)
  trainable = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), trainable)
  frozen = jlora.frozen_like(base, trainable)
  opt = {"mu": jax.tree.map(lambda x: np.asarray(x) * 0.5, trainable),
         "count": np.asarray(seed, np.int32)}
  return frozen, trainable, opt


def qparams(seed: int):
  """``params(seed)`` with the l1 and l2 kernels as NF4Arrays of random bytes,
  built from NumPy (no XLA)."""
  out = {m: dict(leaves) for m, leaves in params(seed).items()}
  rng = np.random.default_rng(200 + seed)
  layout = jlora.Layout((0,), (1,))
  for m in ("l1", "l2"):
    shape = out[m]["kernel"].shape
    arrays = {name: (rng.integers(0, 256, s, dtype=np.uint8) if d == "uint8"
                     else np.asarray(rng.random(s), np.float32))
              for name, (s, d) in nf4.part_specs(shape, layout).items()}
    out[m]["kernel"] = jlora.NF4Array(**arrays, shape=shape, dtype=np.dtype(np.float32),
                                      layout=layout, block_size=64)
  return out


BNB_RULES = jlora.peft.Rules.generic()


def is_lp_or_nf4(x):
  return is_lp(x) or isinstance(x, jlora.NF4Array)


def digest(tree) -> str:
  """A hash of everything a reader returns: paths, arrays' bytes, LoRA and NF4 metadata."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lp_or_nf4)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    if is_lp(leaf):
      h.update(repr((leaf.scale, leaf.layout, leaf.dropout)).encode())
      leaves = [leaf.a, leaf.b]
    elif isinstance(leaf, jlora.NF4Array):
      h.update(repr((leaf.shape, np.dtype(leaf.dtype).name, leaf.layout,
                     leaf.block_size)).encode())
      leaves = [x for x in (leaf.codes, leaf.absmax, leaf.nested_absmax, leaf.offset)
                if x is not None]
    else:
      leaves = [leaf]
    for x in leaves:
      x = np.asarray(x)
      h.update(f"{x.dtype}{x.shape}".encode())
      h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


# -- the writers --------------------------------------------------------------------


class Writer:
  """prepare(d): inputs and old state in d; run(d): the write; read(d): digest."""
  target = ""


class OrbaxSave(Writer):
  target = "adapter"

  def prepare(self, d):
    frozen, trainable, _ = adapter(1)
    jlora.orbax.save(d / self.target, trainable, SPEC, base=frozen)

  def run(self, d):
    frozen, trainable, _ = adapter(2)
    jlora.orbax.save(d / self.target, trainable, SPEC, base=frozen, overwrite=True)

  def read(self, d):
    frozen, _, _ = adapter(0)
    trainable, spec = jlora.orbax.load(d / self.target, base=frozen)
    assert spec == SPEC, spec
    return digest(trainable)


class OrbaxFirstSave(OrbaxSave):
  def prepare(self, d):
    pass


class PeftSave(Writer):
  target = "peft"

  def prepare(self, d):
    _, trainable, _ = adapter(1)
    jlora.peft.save(d / self.target, trainable, jlora.peft.Rules.generic(), spec=SPEC)

  def run(self, d):
    _, trainable, _ = adapter(2)
    jlora.peft.save(d / self.target, trainable, jlora.peft.Rules.generic(), spec=SPEC,
                    overwrite=True)

  def read(self, d):
    got = jlora.peft.load(d / self.target, params(0), jlora.peft.Rules.generic())
    return digest((got.frozen, got.trainable))


class BaseSave(Writer):
  target = "base.safetensors"

  def prepare(self, d):
    jlora.base.save(d / self.target, params(1))

  def run(self, d):
    jlora.base.save(d / self.target, params(2), overwrite=True)

  def read(self, d):
    return digest(dict(jlora.base.read(d / self.target)))


class BaseDirSave(BaseSave):
  target = "base"


class QuantizedBaseSave(Writer):
  """A base with NF4 weights."""
  target = "q.safetensors"

  def prepare(self, d):
    jlora.base.save(d / self.target, qparams(1))

  def run(self, d):
    jlora.base.save(d / self.target, qparams(2), overwrite=True)

  def read(self, d):
    return digest(dict(jlora.base.read(d / self.target)))


class QuantizedBaseDirSave(QuantizedBaseSave):
  target = "q"


class BnbSave(Writer):
  """A Hugging Face bitsandbytes 4-bit checkpoint."""
  target = "model.safetensors"

  def prepare(self, d):
    jlora.bnb.save(d / self.target, qparams(1), BNB_RULES)

  def run(self, d):
    jlora.bnb.save(d / self.target, qparams(2), BNB_RULES, overwrite=True)

  def read(self, d):
    return digest(jlora.bnb.load(d / self.target, qparams(0), BNB_RULES))


class ManagerSave(Writer):
  """Steps 1 and 2 exist; step 3 is saved with max_to_keep=2 (step 1 goes)."""
  target = "ckpt"

  def prepare(self, d):
    frozen = adapter(0)[0]
    with jlora.orbax.CheckpointManager(d / self.target, base=frozen, spec=SPEC,
                                       max_to_keep=2) as mngr:
      for step in (1, 2):
        _, trainable, opt = adapter(step)
        mngr.save(step, trainable, opt)

  def run(self, d):
    frozen, trainable, opt = adapter(3)
    with jlora.orbax.CheckpointManager(d / self.target, base=frozen, spec=SPEC,
                                       max_to_keep=2) as mngr:
      mngr.save(3, trainable, opt, overwrite=True)   # the next call may find step 3

  def read(self, d):
    frozen, _, opt = adapter(0)
    out = {}
    with jlora.orbax.CheckpointManager(d / self.target, base=frozen, spec=SPEC,
                                       max_to_keep=2) as mngr:
      for step in mngr.all_steps():
        got = mngr.restore(step, opt_state=opt)
        out[step] = digest((got.trainable, got.opt_state))
    return json.dumps(out, sort_keys=True)


class CliMerge(Writer):
  target = "merged.safetensors"

  def prepare(self, d):
    frozen, trainable, _ = adapter(1)
    jlora.base.save(d / "base.safetensors", params(0))
    jlora.orbax.save(d / "adapter", trainable, SPEC, base=frozen)
    jlora.base.save(d / self.target, params(7))        # an older merge

  def run(self, d):
    rc = jlora.cli.main(["merge", "--base", str(d / "base.safetensors"), "--adapter",
                         str(d / "adapter"), "--out", str(d / self.target), "--overwrite",
                         "--quiet"])
    if rc != 0:
      raise SystemExit(rc)

  def read(self, d):
    return digest(dict(jlora.base.read(d / self.target)))


class CliConvert(Writer):
  target = "peft"

  def prepare(self, d):
    frozen, trainable, _ = adapter(2)
    jlora.orbax.save(d / "adapter", trainable, SPEC, base=frozen)
    jlora.peft.save(d / self.target, adapter(1)[1], jlora.peft.Rules.generic(), spec=SPEC)

  def run(self, d):
    rc = jlora.cli.main(["convert", str(d / "adapter"), str(d / self.target), "--to", "peft",
                         "--overwrite"])
    if rc != 0:
      raise SystemExit(rc)

  read = PeftSave.read


class CliConvertToOrbax(Writer):
  target = "adapter"

  def prepare(self, d):
    frozen, trainable, _ = adapter(2)
    jlora.base.save(d / "base.safetensors", params(0))
    jlora.peft.save(d / "peft", trainable, jlora.peft.Rules.generic(), spec=SPEC)
    jlora.orbax.save(d / self.target, adapter(1)[1], SPEC, base=frozen)

  def run(self, d):
    rc = jlora.cli.main(["convert", str(d / "peft"), str(d / self.target), "--to", "orbax",
                         "--base", str(d / "base.safetensors"), "--overwrite"])
    if rc != 0:
      raise SystemExit(rc)

  def read(self, d):
    frozen = adapter(0)[0]
    trainable, _ = jlora.orbax.load(d / self.target, base=frozen)
    return digest(trainable)


WRITERS = {"orbax": OrbaxSave(), "orbax_first": OrbaxFirstSave(), "peft": PeftSave(),
           "base_st": BaseSave(), "base_dir": BaseDirSave(), "manager": ManagerSave(),
           "cli_merge": CliMerge(), "cli_convert": CliConvert(),
           "cli_convert_orbax": CliConvertToOrbax(), "base_q_st": QuantizedBaseSave(),
           "base_q_dir": QuantizedBaseDirSave(), "bnb": BnbSave()}


# -- file-system events, and the kill ----------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class Events:
  """Counts file-system events in every thread; SIGKILLs the process at one."""

  def __init__(self, kill_at: int | None):
    self.kill_at = kill_at
    self.counter = itertools.count(1)
    self.kinds: list[str] = []
    self.lock = threading.Lock()

  def hit(self, kind: str) -> None:
    with self.lock:
      n = next(self.counter)
      self.kinds.append(kind)
    if n == self.kill_at:
      os.kill(os.getpid(), signal.SIGKILL)

  def install(self) -> None:
    def wrap(module, name, kind, when=None):
      original = getattr(module, name)

      def hooked(*args, **kwargs):
        if when is None or when(*args, **kwargs):
          self.hit(kind)
        return original(*args, **kwargs)
      setattr(module, name, hooked)

    for name in ("rename", "replace", "unlink", "remove", "rmdir", "mkdir", "fsync", "link",
                 "symlink", "truncate", "ftruncate"):
      if hasattr(os, name):
        wrap(os, name, name)
    wrap(os, "open", "open-w", lambda path, flags, *a, **k: bool(flags & _WRITE_FLAGS))
    writing = lambda file, mode="r", *a, **k: any(c in mode for c in "wax+")  # noqa: E731
    wrap(builtins, "open", "open-w", writing)
    wrap(io, "open", "open-w", writing)
    exchange = _atomic._exchange

    def hooked_exchange(a, b):
      self.hit("exchange")
      return exchange(a, b)
    _atomic._exchange = hooked_exchange


# -- the child's work ---------------------------------------------------------------


def _error(e: BaseException) -> dict:
  text = str(e)
  return {"error": type(e).__name__, "lora": isinstance(e, jlora.LoraError),
          "message": text, "lines": len(text.strip().splitlines())}


def _read(writer, d) -> dict:
  try:
    return {"digest": writer.read(pathlib.Path(d))}
  except BaseException as e:  # noqa: BLE001 - reported to the test
    return _error(e)


def _leftovers(d: pathlib.Path) -> list[str]:
  out = []
  for root, dirs, files in os.walk(d):
    for name in dirs + files:
      if ".jlora-" in name or "orbax-checkpoint-tmp" in name:
        out.append(os.path.relpath(os.path.join(root, name), d))
  return sorted(out)


def child(cmd: dict) -> dict:
  if cmd["op"] == "script":
    sys.argv = ["-c", *cmd["argv"]]
    exec(compile(cmd["code"], "<script>", "exec"), {"__name__": "__main__"})  # noqa: S102
    return {}
  writer = WRITERS[cmd["writer"]]
  if cmd.get("no_exchange"):
    _atomic.USE_EXCHANGE = False   # the two-rename protocol of other systems
  op = cmd["op"]
  if op == "prepare":
    d = pathlib.Path(cmd["dir"])
    d.mkdir(parents=True, exist_ok=True)
    writer.prepare(d)
    return {"old": _read(writer, d) if cmd.get("read_old", True) else None}
  if op == "run":
    d = pathlib.Path(cmd["dir"])
    shutil.copytree(cmd["template"], d, symlinks=True)
    events = Events(cmd.get("kill_at"))
    events.install()
    try:
      writer.run(d)
    except BaseException as e:  # noqa: BLE001
      return {"events": len(events.kinds), "kinds": events.kinds, **_error(e)}
    return {"events": len(events.kinds), "kinds": events.kinds}
  if op == "verify":
    out = []
    for d in map(pathlib.Path, cmd["dirs"]):
      after_kill = _read(writer, d)
      try:
        writer.run(d)
        rerun = {}
      except BaseException as e:  # noqa: BLE001
        rerun = _error(e)
      out.append({"after_kill": after_kill, "rerun": rerun, "after_rerun": _read(writer, d),
                  "leftovers": _leftovers(d)})
    return {"cases": out}
  if op == "read":
    return {"reads": [_read(writer, d) for d in cmd["dirs"]]}
  raise ValueError(op)


def serve() -> None:
  for line in sys.stdin:
    cmd = json.loads(line)
    result_file = pathlib.Path(cmd["result"])
    err_file = pathlib.Path(cmd["stderr"])
    pid = os.fork()
    if pid == 0:  # the child
      code = 0
      result = None
      try:
        fd = os.open(err_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        if cmd["op"] == "script":
          # Opened first: the script may give up the rights to open them.
          result = builtins.open(result_file, "w")
          os.dup2(os.open(cmd["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        else:
          os.dup2(fd, 1)   # what the CLI prints; the zygote's stdout answers the test
        out = child(cmd)
      except BaseException as e:  # noqa: BLE001
        out = {"crash": "".join(traceback.format_exception(e))}
        code = 1
      try:
        # A writer's result is opened here, after its events: the last one counted.
        with result or builtins.open(result_file, "w") as f:
          json.dump(out, f)
        if result:
          sys.stdout.flush()   # the script's output
        sys.stderr.flush()
      finally:
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    try:
      result = json.loads(result_file.read_text()) if result_file.exists() else {}
    except ValueError:
      result = {}
    result["killed"] = killed
    result["stderr"] = err_file.read_text() if err_file.exists() else ""
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  with contextlib.suppress(BrokenPipeError):
    serve()
