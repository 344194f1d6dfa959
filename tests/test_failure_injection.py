"""Failure injection: every writer killed with SIGKILL at many points, a full
disk, and corrupted bytes in every file a reader opens.

For each writer (orbax save, the same with the two-rename protocol of systems
without an atomic exchange, a first save, PEFT save, base save as a file and as
a directory, with NF4 weights too, bitsandbytes 4-bit save,
CheckpointManager.save with its max_to_keep cleanup, CLI merge and both CLI
converts) a forked child runs the write and is killed at chosen
file-system events; then a reader must find the old state or the new one
(never a mix), and the next call must finish or clean up, leaving nothing
staged behind. Each case is counted as:

* lost: the old state (or, after the next call, the new one) cannot be read;
* silent: a reader returned something that is neither;
* poor: an error that is not one line naming the path, a traceback printed,
  a failing next call, or staging left behind.

The floor is zero lost and zero silent (and zero poor). The suite prints
what it tried and the counts; it forks from a zygote that imported jlora
once, two at a time, to stay within CI's time on 2 cores.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest

import jlora

WORKER = pathlib.Path(__file__).with_name("fi_worker.py")
# Kill points per writer: the events that change what a reader sees (renames,
# the exchange, replaces) and others evenly spaced (writes, fsyncs, deletions).
KILL_POINTS = 10
CRITICAL = {"rename", "replace", "exchange"}


_LOG: list[str] = []


def log(*parts) -> None:
  _LOG.append(" ".join(str(p) for p in parts))


@pytest.fixture(autouse=True)
def _print_what_was_tried(capsys):
  """The suite's report goes to the log, also when it passes."""
  _LOG.clear()
  yield
  with capsys.disabled():
    print("\n".join(_LOG))


class Zygote:
  """fi_worker.py serving commands; one child at a time."""

  def __init__(self, scratch: pathlib.Path):
    self.scratch = scratch
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
        [str(WORKER.parent), *os.environ.get("PYTHONPATH", "").split(os.pathsep)])}
    self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env)

  def __call__(self, **cmd) -> dict:
    tag = uuid.uuid4().hex[:8]
    cmd.update(result=str(self.scratch / f"r-{tag}.json"), stderr=str(self.scratch / f"e-{tag}"))
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    assert line, "the failure-injection zygote died"
    out = json.loads(line)
    assert "crash" not in out, out["crash"]
    return out

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def zygotes(tmp_path_factory):
  scratch = tmp_path_factory.mktemp("fi-scratch")
  pool = [Zygote(scratch) for _ in range(2)]
  yield pool
  for z in pool:
    z.close()


def _run_parallel(zygotes, jobs):
  """Runs ``job(zygote)`` for each job, two at a time (one per zygote)."""
  free = list(zygotes)
  lock = threading.Lock()

  def run(job):
    with lock:
      z = free.pop()
    try:
      return job(z)
    finally:
      with lock:
        free.append(z)
  with concurrent.futures.ThreadPoolExecutor(len(zygotes)) as ex:
    return list(ex.map(run, jobs))


def _kill_points(kinds: list[str], budget: int) -> list[int]:
  """Every event if there are few; else the critical ones (the last ones first,
  jlora's own swap) and evenly spaced others, ``budget`` in all."""
  n = len(kinds)
  if n <= budget:
    return list(range(1, n + 1))
  critical = [i + 1 for i, k in enumerate(kinds) if k in CRITICAL][::-1][:budget // 2]
  rest = budget - len(critical)
  spread = {round(1 + j * (n - 1) / max(rest - 1, 1)) for j in range(rest)}
  return sorted(set(critical) | spread)


def _is_poor_error(res: dict, where: str) -> bool:
  return not res.get("lora") or res.get("lines") != 1 or where not in res.get("message", "")


def _manager_state_ok(got: str, old: str, new: str) -> bool:
  got, old, new = json.loads(got), json.loads(old), json.loads(new)
  known = {**old, **new}
  if not got or any(known.get(step) != d for step, d in got.items()):
    return False
  return max(int(s) for s in got) in {max(int(s) for s in old), max(int(s) for s in new)}


# (writer, options, how many kill points)
WRITERS = [("orbax", {}, 10), ("orbax", {"no_exchange": True}, 6), ("orbax_first", {}, 6),
           ("peft", {}, 10), ("peft", {"no_exchange": True}, 8), ("base_st", {}, 6),
           ("base_dir", {}, 8), ("manager", {}, 12), ("cli_merge", {}, 5),
           ("cli_convert", {}, 5), ("cli_convert_orbax", {}, 5), ("base_q_st", {}, 5),
           ("base_q_dir", {}, 6), ("bnb", {}, 5)]


def _kill_writer(tmp: pathlib.Path, writer: str, opts: dict, budget: int, z: Zygote) -> dict:
  name = writer + ("/no-exchange" if opts else "")
  base = tmp / name.replace("/", "-")
  template = base / "template"
  prep = z(op="prepare", writer=writer, dir=str(template), **opts)
  old = prep["old"].get("digest")
  first = z(op="run", writer=writer, dir=str(base / "count"), template=str(template), **opts)
  assert not first.get("error"), first
  new = z(op="read", writer=writer, dirs=[str(base / "count")])["reads"][0]["digest"]
  target_of = lambda d: str(d / _TARGETS[writer])  # noqa: E731
  counts = collections.Counter()
  notes = []
  points = _kill_points(first["kinds"], budget)
  runs = [z(op="run", writer=writer, dir=str(base / f"kill-{k}"), template=str(template),
            kill_at=k, **opts) for k in points]
  verified = z(op="verify", writer=writer, dirs=[str(base / f"kill-{k}") for k in points], **opts)
  for k, run, res in zip(points, runs, verified["cases"]):
    case = base / f"kill-{k}"
    counts["cases"] += 1
    problems = []
    after = res["after_kill"]
    where = target_of(case)
    if "digest" in after:
      d = after["digest"]
      ok = d in (old, new) or (writer == "manager" and _manager_state_ok(d, old, new))
      if not ok:
        counts["silent"] += 1
        problems.append("silent: the reader found neither the old nor the new state")
    elif old is None and after.get("lora") and "does not exist" in after["message"]:
      pass   # nothing was there before, nothing is there now
    else:
      counts["lost"] += 1
      problems.append(f"lost: {after}")
      if _is_poor_error(after, where):
        counts["poor"] += 1
    if res["rerun"]:
      counts["poor"] += 1
      problems.append(f"the next call failed: {res['rerun']}")
    if res["after_rerun"].get("digest") != new:
      counts["lost"] += 1
      problems.append(f"after the next call: {res['after_rerun']}")
    if res["leftovers"]:
      counts["poor"] += 1
      problems.append(f"left behind: {res['leftovers']}")
    if "Traceback" in run["stderr"]:
      counts["poor"] += 1
      problems.append(f"printed a traceback: {run['stderr'][-500:]}")
    if problems:
      notes.append(f"{name} killed at event {k} ({first['kinds'][k - 1]}): {problems}")
  if "Traceback" in verified["stderr"]:
    counts["poor"] += 1
    notes.append(f"{name}: reading or writing again printed a traceback: "
                 f"{verified['stderr'][-500:]}")
  return {"name": name, "events": len(first["kinds"]), "points": len(points),
          "counts": counts, "notes": notes}


_TARGETS = {"orbax": "adapter", "orbax_first": "adapter", "peft": "peft",
            "base_st": "base.safetensors", "base_dir": "base", "manager": "ckpt",
            "cli_merge": "merged.safetensors", "cli_convert": "peft",
            "cli_convert_orbax": "adapter", "base_q_st": "q.safetensors", "base_q_dir": "q",
            "bnb": "model.safetensors"}


def _report(title: str, rows: list[dict]) -> collections.Counter:
  total = collections.Counter()
  log(f"\n== {title}")
  for row in rows:
    c = row["counts"]
    total.update(c)
    log(f"  {row['name']:<24} {row.get('detail', '')}cases {c['cases']:3d}  lost "
          f"{c['lost']}  silent {c['silent']}  poor {c['poor']}")
    for note in row["notes"][:5]:
      log(f"    {note[:400]}")
  log(f"  total: cases run {total['cases']}, lost {total['lost']}, silent "
        f"{total['silent']}, poor {total['poor']}")
  return total


def test_kill_every_writer_at_many_points(zygotes, tmp_path):
  jobs = [lambda z, w=w, o=o, n=n: _kill_writer(tmp_path, w, o, n, z) for w, o, n in WRITERS]
  rows = _run_parallel(zygotes, jobs)
  for row in rows:
    row["detail"] = f"events {row['events']:3d}, killed at {row['points']:2d}: "
  total = _report("kill -9 at file-system events (then read, then the next call)", rows)
  assert total["cases"] >= 60
  assert total["lost"] == 0 and total["silent"] == 0, [n for r in rows for n in r["notes"]]
  assert total["poor"] == 0, [n for r in rows for n in r["notes"]]


# -- corrupted bytes -------------------------------------------------------------------


def _damages(data: bytes):
  n = len(data)
  if n == 0:
    return
  mid = n // 2
  yield "flip-middle", data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]
  yield "flip-first", bytes([data[0] ^ 0x01]) + data[1:]
  yield "truncate", data[:mid]


# (The orbax directory of a quantized base is checked by the same manifest as base_dir's.)
CORRUPT = [("orbax", "adapter"), ("manager", "ckpt"), ("base_st", "base.safetensors"),
           ("base_dir", "base"), ("peft", "peft"), ("base_q_st", "q.safetensors"),
           ("bnb", "model.safetensors")]


def _corrupt_writer(tmp: pathlib.Path, writer: str, target: str, z: Zygote) -> dict:
  base = tmp / f"corrupt-{writer}"
  template = base / "template"
  prep = z(op="prepare", writer=writer, dir=str(template))
  good = prep["old"]["digest"]
  root = template / target
  files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
  dirs, labels = [], []
  for f in files:
    rel = f.relative_to(template)
    data = f.read_bytes()
    for mode, bad in _damages(data):
      case = base / f"{len(dirs)}"
      shutil.copytree(template, case)
      (case / rel).write_bytes(bad)
      dirs.append(str(case))
      labels.append(f"{rel} {mode}")
  res = z(op="read", writer=writer, dirs=dirs)
  counts = collections.Counter()
  notes = []
  for label, d, r in zip(labels, dirs, res["reads"]):
    counts["cases"] += 1
    if "digest" in r:
      if r["digest"] != good:
        counts["silent"] += 1
        notes.append(f"{writer}: {label}: silent (the reader returned other values)")
    elif _is_poor_error(r, str(pathlib.Path(d) / target)):
      counts["poor"] += 1
      notes.append(f"{writer}: {label}: poor message {r}")
  if "Traceback" in res["stderr"]:
    counts["poor"] += 1
    notes.append(f"{writer}: a traceback was printed: {res['stderr'][-500:]}")
  return {"name": writer, "detail": f"files {len(files):3d}: ", "counts": counts,
          "notes": notes}


def test_corrupted_bytes_in_every_file(zygotes, tmp_path):
  jobs = [lambda z, w=w, t=t: _corrupt_writer(tmp_path, w, t, z) for w, t in CORRUPT]
  rows = _run_parallel(zygotes, jobs)
  total = _report("corrupted bytes in each file a reader opens (metadata included)", rows)
  assert total["silent"] == 0 and total["poor"] == 0, [n for r in rows for n in r["notes"]]


# -- a full disk --------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
  """A 1 MiB tmpfs (root only; skipped elsewhere)."""
  if os.geteuid() != 0:
    pytest.skip("mounting a small tmpfs needs root")
  mnt = tmp_path / "disk"
  mnt.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                    capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here")
  yield mnt
  subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_keeps_the_old_state_and_leaves_nothing(small_disk):
  import fi_worker as fw
  frozen, trainable, opt = fw.adapter(1)
  huge_base = _grow(fw.params(0))
  writers = {
      "orbax.save": (lambda p: jlora.orbax.save(p, trainable, fw.SPEC, base=frozen),
                     lambda p: jlora.orbax.save(p, _grow(trainable), None, base=_grow(frozen),
                                                overwrite=True),
                     lambda p: fw.digest(jlora.orbax.load(p, base=frozen)[0])),
      "peft.save": (lambda p: jlora.peft.save(p, trainable, jlora.peft.Rules(), spec=fw.SPEC),
                    lambda p: jlora.peft.save(p, _grow(trainable), jlora.peft.Rules(),
                                              overwrite=True),
                    lambda p: fw.digest(jlora.peft.load(p, fw.params(0), jlora.peft.Rules())
                                        .trainable)),
      "base.save (file)": (lambda p: jlora.base.save(p.with_suffix(".safetensors"), fw.params(1)),
                           lambda p: jlora.base.save(p.with_suffix(".safetensors"), huge_base,
                                                     overwrite=True),
                           lambda p: fw.digest(dict(jlora.base.read(
                               p.with_suffix(".safetensors"))))),
      "base.save (dir)": (lambda p: jlora.base.save(p, fw.params(1)),
                          lambda p: jlora.base.save(p, huge_base, overwrite=True),
                          lambda p: fw.digest(dict(jlora.base.read(p)))),
      "base.save (NF4)": (lambda p: jlora.base.save(p, fw.qparams(1)),
                          lambda p: jlora.base.save(p, _grow(fw.qparams(2)), overwrite=True),
                          lambda p: fw.digest(dict(jlora.base.read(p)))),
      "bnb.save": (lambda p: jlora.bnb.save(p.with_suffix(".safetensors"), fw.qparams(1),
                                            fw.BNB_RULES),
                   lambda p: jlora.bnb.save(p.with_suffix(".safetensors"), _grow(fw.qparams(2)),
                                            fw.BNB_RULES, overwrite=True),
                   lambda p: fw.digest(jlora.bnb.load(p.with_suffix(".safetensors"),
                                                      fw.qparams(0), fw.BNB_RULES))),
  }
  total = collections.Counter()
  log("\n== a full disk (1 MiB tmpfs)")
  for name, (write_old, write_big, read) in writers.items():
    path = small_disk / name.replace(" ", "_").replace(".", "_").replace("(", "").replace(")", "")
    write_old(path)
    before = read(path)
    try:
      write_big(path)
      outcome = "written?"
    except jlora.LoraError as e:
      outcome = str(e)
    ok = ("no space left" in outcome and str(small_disk) in outcome
          and len(outcome.splitlines()) == 1)
    intact = read(path) == before
    left = [p.name for p in small_disk.iterdir() if ".jlora-" in p.name]
    total.update(cases=1, lost=int(not intact), poor=int(not ok or bool(left)))
    log(f"  {name:<18} error: {outcome[:150]!r}; old state intact: {intact}; left: {left}")
    assert ok and intact and not left, (name, outcome, intact, left)
  # A CheckpointManager save that does not fit.
  mngr = jlora.orbax.CheckpointManager(small_disk / "ckpt", base=frozen, max_to_keep=2)
  mngr.save(1, trainable, opt)
  with pytest.raises(jlora.LoraCheckpointError) as err:
    mngr.save(2, trainable, _grow({}))   # 2 MiB of optimizer state
    mngr.wait_until_finished()
  message = str(err.value)
  log(f"  {'CheckpointManager':<18} error: {message[:150]!r}")
  assert "no space left" in message and len(message.splitlines()) == 1, message
  assert "ckpt" in message
  mngr.close()
  with jlora.orbax.CheckpointManager(small_disk / "ckpt", base=frozen, max_to_keep=2) as mngr:
    assert mngr.all_steps() == [1]
    assert fw.digest(mngr.restore(opt_state=opt).trainable) == fw.digest(trainable)
  assert sorted(p.name for p in (small_disk / "ckpt").iterdir()) == ["1"]   # cleaned up
  total.update(cases=1)
  log(f"  total: cases run {total['cases']}, lost {total['lost']}, silent 0, poor "
        f"{total['poor']}")


def _grow(tree):
  """The same tree with one more, large, leaf (2 MiB): too big for the disk."""
  out = dict(tree)
  out["big"] = {"kernel": np.random.default_rng(0).standard_normal((512, 1024), np.float32)}
  return out


# -- permission denied ---------------------------------------------------------------------

_DENIED = """
import os, sys
import numpy as np, jax
import jlora, orbax.checkpoint, safetensors.flax, safetensors.numpy
import fi_worker as fw
import shutil, tempfile
frozen, trainable, _ = fw.adapter(1)
writers = [("orbax", lambda p: jlora.orbax.save(p, trainable, fw.SPEC, base=frozen)),
           ("peft", lambda p: jlora.peft.save(p, trainable, jlora.peft.Rules(), spec=fw.SPEC)),
           ("base", lambda p: jlora.base.save(p + ".safetensors", fw.params(0))),
           ("base_dir", lambda p: jlora.base.save(p, fw.params(0))),
           ("manager", lambda p: jlora.orbax.CheckpointManager(p, base=frozen)),
           ("bnb", lambda p: jlora.bnb.save(p + ".safetensors", fw.qparams(0), fw.BNB_RULES))]
if os.geteuid() == 0:   # root is never denied: drop to nobody
  # Every writer runs once as root first, so that each module it imports
  # lazily (JAX's, orbax's) is loaded while the checkout is still readable:
  # nobody may not read a checkout under a private directory.
  scratch = tempfile.mkdtemp()
  for name, write in writers:
    write(os.path.join(scratch, name))
  shutil.rmtree(scratch)
  os.setgid(65534)
  os.setuid(65534)
for name, write in writers:
  try:
    write(os.path.join(sys.argv[1], name))
    print(name, "WROTE")
  except jlora.LoraError as e:
    print(name, "|", e)
"""


def _script(z: Zygote, code: str, *argv) -> subprocess.CompletedProcess:
  """``python -c code argv...`` as a child forked from a zygote (a new
  interpreter would spend seconds importing JAX and orbax again)."""
  stdout = z.scratch / f"o-{uuid.uuid4().hex[:8]}"
  out = z(op="script", code=code, argv=[str(a) for a in argv], stdout=str(stdout))
  return subprocess.CompletedProcess(argv, 0 if not out["killed"] else -9,
                                     stdout.read_text(), out["stderr"])


@pytest.fixture
def open_tmp():
  """A temporary directory others may enter (pytest's are private to their owner)."""
  import tempfile
  d = pathlib.Path(tempfile.mkdtemp())
  d.chmod(0o755)
  yield d
  shutil.rmtree(d, ignore_errors=True)


def test_permission_denied_gives_one_line_and_leaves_nothing(zygotes, open_tmp):
  locked = open_tmp / "locked"
  locked.mkdir()
  locked.chmod(0o755 if os.geteuid() == 0 else 0o555)   # not writable for the writer
  proc = _script(zygotes[0], _DENIED, locked)
  lines = proc.stdout.strip().splitlines()
  log("\n== permission denied\n  " + "\n  ".join(lines))
  assert len(lines) == 6 and proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  for line in lines:
    name, _, message = line.partition(" | ")
    assert "permission denied" in message and str(locked / name) in message, line
  assert list(locked.iterdir()) == []
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


_DENIED_READ = """
import os, sys
import jax, jlora, orbax.checkpoint, safetensors.numpy
import fi_worker as fw
frozen, trainable, _ = fw.adapter(1)
root = sys.argv[1]
rules = jlora.peft.Rules()
readers = [("orbax", lambda p: jlora.orbax.load(p, base=frozen)),
           ("peft", lambda p: jlora.peft.load(p, frozen, rules)),
           ("peft_bank", lambda p: jlora.peft.load_bank(p, frozen, rules))]
jlora.orbax.save(os.path.join(root, "orbax"), trainable, fw.SPEC, base=frozen)
jlora.peft.save(os.path.join(root, "peft"), trainable, rules, spec=fw.SPEC)
factors = jax.tree.map(lambda x: x if isinstance(x, jlora.LoraParam) else None, trainable,
                       is_leaf=lambda x: isinstance(x, jlora.LoraParam))
jlora.peft.save_bank(os.path.join(root, "peft_bank"), jlora.stack_adapters(
    {"a": factors, "b": factors}), rules)
for name, read in readers:   # as root first: every lazy import happens now
  read(os.path.join(root, name))
for name, _ in readers:      # then none but root may list or enter them
  os.chmod(os.path.join(root, name), 0o700)
if os.geteuid() == 0:        # root is never denied: drop to nobody
  os.setgid(65534)
  os.setuid(65534)
for name, read in readers:
  try:
    read(os.path.join(root, name))
    print(name, "READ")
  except jlora.LoraError as e:
    print(name, "|", e)
"""


def test_an_adapter_in_a_directory_one_cannot_read_gives_one_line(zygotes, open_tmp):
  """Loading from a directory the user may not read (orbax, PEFT, a PEFT bank):
  one line naming the directory, not a raw PermissionError or a wrong 'has no
  adapter_config.json'."""
  if os.geteuid() != 0:
    pytest.skip("needs root, to write as root and read as nobody")
  proc = _script(zygotes[0], _DENIED_READ, open_tmp)
  lines = proc.stdout.strip().splitlines()
  log("\n== permission denied, reading\n  " + "\n  ".join(lines))
  assert len(lines) == 3 and proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  for line in lines:
    name, _, message = line.partition(" | ")
    assert message == f"cannot read '{open_tmp / name}': permission denied", line
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
