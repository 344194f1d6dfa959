"""Atomic replacement of a file or a directory, recoverable after a kill.

Every writer of jlora (orbax adapters, PEFT folders, base-parameter files)
writes through ``replace``: the content is written beside the target under a
hidden staging name, flushed to disk, and then put in place by one atomic
step. A reader therefore sees the old version or the new one, never a mix,
whatever point a ``kill -9`` interrupts the writer at.

Staging names are ``.<name>.jlora-<state>-<id>`` in the target's folder:

* ``tmp``: being written; incomplete, deleted by the next call;
* ``new``: complete, waiting to be put in place;
* ``old``: the replaced version, while the target is briefly absent (only on
  file systems without an atomic exchange of two directories);
* ``trash``: being deleted.

A directory replaces a directory with Linux's ``renameat2(RENAME_EXCHANGE)``,
which swaps both names at once; elsewhere it takes two renames, and a kill
between them leaves the target absent with a complete ``new`` (and ``old``)
beside it: ``resolve`` then points readers at the new version, and the next
``replace`` (or ``recover``) puts it in place. A file is replaced with one
``os.replace``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pathlib
import re
import shutil
import time
import uuid
from typing import Callable

from jlora.errors import LoraFileError

PathLike = str | os.PathLike
STATES = ("tmp", "new", "old", "trash")
# .<name>.jlora-<state>-<id>, and what orbax appends to a folder it is writing.
_STAGED = re.compile(r"\.(.+)\.jlora-(tmp|new|old|trash)-[0-9a-f]+(.*)")
# Tests set this to exercise the two-rename protocol on Linux too.
USE_EXCHANGE = True


def staged(path: pathlib.Path, state: str) -> pathlib.Path:
  """A fresh staging name for ``path`` in ``state`` (see the module docstring)."""
  return path.parent / f".{path.name}.jlora-{state}-{uuid.uuid4().hex[:8]}"


def leftovers(path: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  """The staging entries an interrupted replace of ``path`` left, by state."""
  out: dict[str, list[pathlib.Path]] = {s: [] for s in STATES}
  prefix = f".{path.name}.jlora-"
  try:
    entries = list(os.scandir(path.parent))
  except OSError:
    return out
  for entry in entries:
    if not entry.name.startswith(prefix):
      continue
    state = entry.name[len(prefix):].split("-", 1)[0]
    if state in out:
      out[state].append(path.parent / entry.name)
  for paths in out.values():
    paths.sort(key=lambda p: p.name)
  return out


def exists(path: pathlib.Path) -> bool:
  return os.path.lexists(path)


def resolve(path: PathLike) -> pathlib.Path:
  """What a reader should open for ``path``: ``path`` itself, or, if a killed
  replace left it absent, the complete version staged beside it."""
  path = pathlib.Path(path).absolute()
  if exists(path):
    return path
  left = leftovers(path)
  for state in ("new", "old"):
    if left[state]:
      return left[state][-1]
  return path


def remove(path: pathlib.Path) -> None:
  """Deletes a file or a directory tree: renamed to ``trash`` first, so a kill
  part-way never leaves a half-deleted tree under a name anything reads."""
  if not exists(path):
    return
  if path.is_dir() and not path.is_symlink():
    m = _STAGED.fullmatch(path.name)
    target = path
    if m is None or m.group(2) != "trash":
      # Trash under the name of what is being replaced, where recover() looks.
      target = staged(path.parent / (m.group(1) if m else path.name), "trash")
      os.rename(path, target)
    shutil.rmtree(target, ignore_errors=True)
    if exists(target):   # a file we could not delete: report it, as rmtree would
      shutil.rmtree(target)
  else:
    os.unlink(path)


def recover(path: PathLike) -> None:
  """Finishes or cleans up an interrupted ``replace`` of ``path``.

  A complete staged version is put in place if ``path`` is absent (the new
  one if there is one); everything else staged is deleted.
  """
  path = pathlib.Path(path).absolute()
  left = leftovers(path)
  for p in left["tmp"] + left["trash"]:
    remove(p)
  if not exists(path):
    for state in ("new", "old"):
      if left[state]:
        os.rename(left[state].pop(), path)
        break
  for p in left["new"] + left["old"]:
    remove(p)


def fsync_tree(path: pathlib.Path) -> None:
  """Flushes a file, or every file and directory under ``path``, to disk."""
  if path.is_dir():
    for root, dirs, files in os.walk(path):
      for name in files:
        _fsync(os.path.join(root, name), os.O_RDONLY)
      _fsync(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  else:
    _fsync(path, os.O_RDONLY)


def _fsync(path, flags) -> None:
  try:
    fd = os.open(path, flags)
  except OSError:
    return  # a directory cannot be opened on some systems; nothing to flush
  try:
    os.fsync(fd)
  except OSError as e:
    if e.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS):
      raise
  finally:
    os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Swaps two existing paths atomically; False where the system cannot."""
  if not USE_EXCHANGE:
    return False
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                        ctypes.c_uint]
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
    return False
  raise OSError(err, os.strerror(err), os.fspath(a))


def _put_in_place(new: pathlib.Path, path: pathlib.Path) -> None:
  """Moves the complete ``new`` to ``path``, replacing what is there."""
  if not exists(path):
    os.rename(new, path)
  elif new.is_dir() and path.is_dir():
    if _exchange(new, path):   # new now holds the old version
      remove(new)
      return
    old = staged(path, "old")
    os.rename(path, old)
    try:
      os.rename(new, path)
    except BaseException:
      os.rename(old, path)
      raise
    remove(old)
  else:
    os.replace(new, path)
  _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def is_empty_dir(path: pathlib.Path) -> bool:
  try:
    return path.is_dir() and not path.is_symlink() and not any(os.scandir(path))
  except OSError:
    return False


def os_error(e: OSError, path: PathLike, action: str) -> str:
  """One line for an OSError met while doing ``action`` at ``path``."""
  reason = {errno.ENOSPC: "no space left on the device",
            errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted",
            errno.EROFS: "read-only file system",
            errno.ENOTDIR: "a parent of it is a file, not a directory",
            errno.EEXIST: "a parent of it is a file, not a directory",
            errno.ENAMETOOLONG: "the name is too long"}.get(e.errno, e.strerror or str(e))
  where = f" ('{e.filename}')" if e.filename and os.fspath(e.filename) != os.fspath(path) else ""
  return f"cannot {action} '{path}': {reason}{where}"


def check_readable(path: PathLike, error: type[LoraFileError]) -> None:
  """Raises ``error`` naming ``path`` where this process may not reach it or,
  for a directory, list and enter it: one line in place of a PermissionError
  from deep inside a reader, or a misleading "has no ..." from a check that
  could not see in. A missing ``path`` passes: the caller says so."""
  try:
    os.stat(path)
  except PermissionError as e:
    raise error(os_error(e, path, "read")) from None
  except OSError:
    return
  if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
    raise error(f"cannot read '{path}': permission denied")


def replace(path: PathLike, write: Callable[[pathlib.Path], None], *, overwrite: bool,
            owned: Callable[[pathlib.Path], bool] | None = None, what: str = "file",
            error: type[LoraFileError] = LoraFileError) -> pathlib.Path:
  """Writes ``path`` atomically: ``write(staging)`` beside it, then one swap.

  Args:
    path: the file or directory to create or replace.
    write: writes the complete new version at the path it is given (a file
      or a directory, as ``path`` should be).
    overwrite: whether an existing ``path`` may be replaced. An empty
      directory is replaced without it.
    owned: with ``overwrite``, ``owned(path)`` must be true for an existing
      ``path`` to be replaced (it carries jlora's mark for ``what``).
    what: the kind of file, for messages.
    error: the LoraFileError subclass to raise.

  Returns:
    The absolute path written.

  Raises:
    error: ``path`` exists and may not be replaced, or the file system
      refused (permission, full disk, a parent that is a file); nothing is
      left behind.

  Example:
    >>> import pathlib, tempfile
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "hello.txt"
    >>> _ = replace(target, lambda p: p.write_text("hi"), overwrite=False)
    >>> _ = replace(target, lambda p: p.write_text("bye"), overwrite=True)
    >>> target.read_text(), sorted(q.name for q in target.parent.iterdir())
    ('bye', ['hello.txt'])
  """
  path = pathlib.Path(path).absolute()
  prepare(path, overwrite=overwrite, owned=owned, what=what, error=error)
  tmp = staged(path, "tmp")
  try:
    write(tmp)
    commit(tmp, path)
  except LoraFileError:
    raise
  except OSError as e:
    raise error(os_error(e, path, f"write {what}")) from None
  except Exception as e:  # a library's own error type (tensorstore, safetensors)
    raise error(library_error(e, path, f"write {what}")) from e
  finally:
    drop_staging(path, tmp)
  return path


def prepare(path: pathlib.Path, *, overwrite: bool,
            owned: Callable[[pathlib.Path], bool] | None, what: str,
            error: type[LoraFileError]) -> None:
  """Before a write: finishes or cleans up what a killed one left, checks
  that ``path`` may be replaced, creates its folder."""
  try:
    recover(path)
    if exists(path) and not is_empty_dir(path):
      if not overwrite:
        raise error(f"'{path}' already exists; pass overwrite=True to replace it")
      if owned is not None and not owned(path):
        raise error(f"'{path}' exists and is not a {what} written by jlora (it lacks "
                    f"jlora's mark); refusing to replace it: remove it yourself or choose "
                    f"another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.parent.is_dir():
      raise NotADirectoryError(errno.ENOTDIR, "not a directory", os.fspath(path.parent))
  except OSError as e:
    raise error(os_error(e, path, f"write {what}")) from None


def commit(tmp: pathlib.Path, path: pathlib.Path) -> None:
  """After a write: flushes the complete ``tmp`` and swaps it in at ``path``."""
  fsync_tree(tmp)
  new = staged(path, "new")
  os.rename(tmp, new)
  try:
    _put_in_place(new, path)
  finally:
    if exists(new):
      remove(new)


def drop_staging(path: pathlib.Path, tmp: pathlib.Path, *, patience: float = 2.0) -> None:
  """Deletes ``tmp`` and what a library staged beside it, if still there.

  After a failed write a library's background threads may still be writing
  into its staging, or create it again (orbax's async save on a full disk):
  the removal is retried until nothing is left or ``patience`` seconds pass.
  """
  deadline = time.monotonic() + patience
  while True:
    left = [p for p in leftovers(path)["tmp"]   # ours and what orbax staged beside it
            if p.name.startswith(tmp.name)]
    if not left or time.monotonic() > deadline:
      return
    for entry in left:
      try:
        remove(entry)
      except OSError:
        pass
    time.sleep(0.05)   # then look again: a thread may have been writing or recreating it


def replace_collective(path: PathLike, *, write_all: Callable[[pathlib.Path], None] | None = None,
                       write_primary: Callable[[pathlib.Path], None] | None = None,
                       overwrite: bool, owned: Callable[[pathlib.Path], bool] | None = None,
                       what: str = "file", error: type[LoraFileError] = LoraFileError,
                       op: str = "jlora save") -> pathlib.Path:
  """``replace`` when several JAX processes write one target together.

  Every process calls it. Process 0 alone checks and cleans up (``prepare``)
  and picks the staging name, which every process then receives;
  ``write_all(staging)`` runs on every process (a collective write, such as
  orbax's, where each process writes its shards); ``write_primary(staging)``
  then runs on process 0 (a manifest, or the whole write when the data were
  gathered first), which swaps the result in place (``commit``). Every
  process returns the path or raises process 0's error, so the guarantees
  of ``replace`` hold: the old version or the new one, never a mix, and
  nothing jlora did not write is replaced. They assume that every process
  sees one POSIX file system at ``path`` (a local disk for processes of one
  machine, or NFS and the like): object stores have no atomic rename.

  With one process it is ``replace``.
  """
  from jlora import _multihost
  sync = _multihost.Op(op)
  if not sync.multiprocess:
    def write(staging: pathlib.Path) -> None:
      if write_all is not None:
        write_all(staging)
      if write_primary is not None:
        write_primary(staging)
    return replace(path, write, overwrite=overwrite, owned=owned, what=what, error=error)
  path = pathlib.Path(path).absolute()

  def plan() -> str:
    prepare(path, overwrite=overwrite, owned=owned, what=what, error=error)
    return staged(path, "tmp").name

  tmp = path.parent / sync.on_primary("prepare", plan, error)
  failure: BaseException | None = None
  if write_all is not None:
    try:
      write_all(tmp)
    except Exception as e:  # reported by process 0 for all, or raised here
      failure = e
      if sync.index != 0:
        raise _wrap(e, path, what, error) from e

  def finish() -> None:
    try:
      if failure is not None:
        raise failure
      if write_primary is not None:
        write_primary(tmp)
      commit(tmp, path)
    except LoraFileError:
      raise
    except Exception as e:
      raise _wrap(e, path, what, error) from e
    finally:
      drop_staging(path, tmp)

  sync.on_primary("commit", finish, error)
  return path


def _wrap(e: BaseException, path: pathlib.Path, what: str,
          error: type[LoraFileError]) -> LoraFileError:
  if isinstance(e, LoraFileError):
    return e
  if isinstance(e, OSError):
    return error(os_error(e, path, f"write {what}"))
  return error(library_error(e, path, f"write {what}"))


def library_error(e: Exception, path: PathLike, action: str) -> str:
  """One line for another library's error about a file: an OSError's reason
  if the message carries one (tensorstore's ``os_error_code='28'``)."""
  text = " ".join(str(e).split())
  m = re.search(r"os_error_code='?(\d+)", text)
  if m:
    code = int(m.group(1))
    return os_error(OSError(code, os.strerror(code)), path, action)
  for code in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
    if os.strerror(code) in text:
      return os_error(OSError(code, os.strerror(code)), path, action)
  return f"cannot {action} '{path}': {type(e).__name__}: {text[:300]}"
