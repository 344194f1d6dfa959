"""Ctrl-C on the command line: one line, status 130, nothing left behind.

Python turns SIGINT into a ``KeyboardInterrupt`` at whatever the main thread
runs next. Where that is a callback that cannot raise (a garbage-collector
callback such as JAX's, a ``__del__``), Python prints "Exception ignored ...
KeyboardInterrupt" with a traceback, drops the exception, and the command runs
on to the end. ``delivered`` makes sure the interrupt reaches ``main``: a
dropped one is raised again a moment later, outside the callback, silently;
a second Ctrl-C while the first unwinds (removing staged files) is ignored.

An interrupt can also land inside a constructor (orbax's event loop, say) and
leave an object half-built, whose ``__del__`` then fails when it is collected:
while the block unwinds, or when the interpreter finalizes. Those errors are
consequences of the interrupt, not news, so after it they are dropped inside
the block, and ``exit_after_interrupt`` ends the process without finalizing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

# How long after a dropped KeyboardInterrupt it is raised again (seconds).
_RETRY_S = 0.01


@contextlib.contextmanager
def delivered() -> Iterator[Callable[[], None]]:
  """Within the block, the first SIGINT raises ``KeyboardInterrupt`` until the
  function the block is given is called (where it is caught) or the block
  ends; later ones are ignored. Does nothing where SIGINT is not Python's
  default handler (ignored, or the caller's own), where SIGALRM or the real
  timer is someone else's (a test runner's timeout), or off the main thread.

  Example:
    >>> with delivered() as caught:
    ...   caught()
  """
  state = {"seen": False, "left": False, "armed": False}

  def caught() -> None:
    state["left"] = True
    if state["armed"]:
      state["armed"] = False
      signal.setitimer(signal.ITIMER_REAL, 0)

  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
      or signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None)
      or signal.getitimer(signal.ITIMER_REAL) != (0.0, 0.0)):
    yield caught
    return
  old_hook = sys.unraisablehook

  def on_sigint(signum, frame):
    if state["seen"]:
      return          # already unwinding: let the cleanup finish
    state["seen"] = True
    raise KeyboardInterrupt

  def again(signum, frame):
    state["armed"] = False
    if state["seen"] and not state["left"]:
      raise KeyboardInterrupt

  def unraisable(u) -> None:
    if isinstance(u.exc_value, KeyboardInterrupt) and state["seen"] and not state["left"]:
      state["armed"] = True
      signal.setitimer(signal.ITIMER_REAL, _RETRY_S)   # raise it again, outside the callback
      return
    if state["seen"]:
      return    # a __del__ of something the interrupt left half-built
    old_hook(u)

  old_alarm = signal.signal(signal.SIGALRM, again)
  signal.signal(signal.SIGINT, on_sigint)
  sys.unraisablehook = unraisable
  try:
    yield caught
  finally:
    caught()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGALRM, old_alarm)
    sys.unraisablehook = old_hook


def exit_after_interrupt(status: int) -> None:
  """Ends the process with ``status`` at once, after flushing stdout and stderr.

  Called by the console entry point once ``main`` has reported an interrupt:
  the staged files are already gone, and a normal exit would run the
  finalizers of objects the interrupt left half-built, which print tracebacks.
  Every writer survives ``kill -9``, so skipping the interpreter's shutdown
  loses nothing.
  """
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError, AttributeError):
      pass
  os._exit(status)
