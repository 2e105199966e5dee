"""Stopping on request (SIGTERM from a scheduler or a preempted VM, Ctrl-C), at any moment.

Every entry point is protected from its first line (`protect`, called by llm/cli.py):

- While the entry point's modules are imported (`exit_while_starting`, from llm/__init__.py)
  nothing has been written yet: the process exits with EXIT_PREEMPTED at once.
- Before a train loop runs (reading, tokenizing, training a tokenizer, the DPO reference pass,
  compiling) there is nothing to save: the signal raises `Interrupted` where the program is, the
  files being written are removed as it unwinds, and the command line prints one line and exits
  with EXIT_PREEMPTED (75, "try again later"), so a scheduler requeues the job.
- While a train loop runs (`Watcher`), the signal only sets a flag: the loop asks
  `requested(step)` after every step, saves that step and raises `Preempted`, which ends the
  same way.
- A second Ctrl-C (or SIGTERM) quits at once with one line and status 130; the last complete
  checkpoint stays intact, and what a save had half-written is removed by the next start.

On several processes every one must stop at the same step: JAX's preemption service (started
by `jax.distributed.initialize`, which takes SIGTERM over from Python) catches SIGTERM on any
process and `reached_preemption` makes them agree on a step; Ctrl-C is passed to it as a
SIGTERM. A SIGTERM that arrives there before the loop is therefore honoured as the loop
starts (exit 75, nothing to save), rather than at once.
"""

import gc
import os
import signal
import sys
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class Preempted(Exception):
  """The run stopped at a step on request, after saving it."""


class Interrupted(BaseException):
  """A signal stopped the command before anything was saved. A BaseException (as Python's
  KeyboardInterrupt), so that no `except Exception` on the way up swallows it."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)


_state = {"watcher": None, "signalled": "", "deferred": False, "quit": None}


def exit_while_starting() -> None:
  """Until `protect` takes over: a signal ends the process at once with EXIT_PREEMPTED. For the
  seconds a command spends importing its libraries, when nothing can be half-written yet (an
  exception raised there could land in a callback that ignores it, and the command go on)."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _exit_at_once)
    signal.signal(signal.SIGTERM, _exit_at_once)


def _exit_at_once(signum, frame):
  os.write(2, f"\nstopped by {signal.Signals(signum).name}; nothing is left half-written; run "
              "the same command again\n".encode())
  os._exit(EXIT_PREEMPTED)


def protect(quit_at_once) -> None:
  """Installs the handlers of SIGINT and SIGTERM for the whole process (main thread only).
  `quit_at_once(status, line)` ends the process at once (the command line's terminal knows how
  to flush its output first)."""
  _state["quit"] = quit_at_once
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def signalled() -> str:
  """The name of the signal that asked this process to stop ("" while none has)."""
  return _state["signalled"]


def _exit_now(status: int, line: str) -> None:
  print(line, file=sys.stderr, flush=True)
  os._exit(status)


def _on_signal(signum, frame):
  if _state["signalled"] and not _state["deferred"]:
    _state["quit"](EXIT_INTERRUPTED, f"\n{signal.Signals(signum).name} again: quitting at once "
                   "(the last complete checkpoint is intact)")
  _state.update(signalled=signal.Signals(signum).name, deferred=False)
  watcher = _state["watcher"]
  if watcher is not None:
    watcher.on_signal(signum)
  elif _swallows_exceptions(frame):
    # Raised here, Interrupted would be printed as "Exception ignored" and the program would go
    # on: the same signal is sent again in a moment, when the frame has returned.
    _state["deferred"] = True
    threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
  else:
    raise Interrupted(signum)


def _swallows_exceptions(frame) -> bool:
  """Whether an exception raised in `frame` would be ignored rather than unwind the program:
  the import machinery's lock callbacks, finalizers (`__del__`, `weakref.finalize`) and the
  garbage collector's callbacks (XLA has one) run where exceptions are only printed."""
  gc_callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
  while frame is not None:
    code = frame.f_code
    if (code.co_filename.startswith("<frozen importlib") or code.co_name == "__del__"
        or code in gc_callbacks
        or (code.co_name == "__call__" and code.co_filename.endswith("weakref.py"))):
      return True
    frame = frame.f_back
  return False


class Watcher:
  """While a train loop runs: a signal asks the loop to save and stop after its step."""

  def __init__(self, checkpointer, start: int):
    """`start`: the step the loop starts after (the restored checkpoint's, or 0)."""
    self.start = start
    self.checkpointer = checkpointer
    self.flag = False

  def __enter__(self):
    # train() called from Python, not a command line: the handlers are this loop's alone
    self.installed = (_state["quit"] is None
                      and threading.current_thread() is threading.main_thread())
    if self.installed:
      self.previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
      protect(_exit_now)
    _state["watcher"] = self
    if _state["signalled"]:  # arrived between the start-up's end and this line
      self.flag = True
    import jax
    if jax.process_count() > 1:
      # JAX's service sets its sync point to the last step it was told of + 1, and it has been
      # told of none yet: a SIGTERM during the start-up set it to 1. Then every process stops
      # here; else it learns the step the loop starts after.
      if self.checkpointer.reached_preemption(1):
        raise Interrupted(signal.SIGTERM)
      self.checkpointer.reached_preemption(max(self.start, 1))  # never told a smaller step
    return self

  def __exit__(self, *exc):
    _state["watcher"] = None
    if self.installed:
      for signum, handler in self.previous.items():
        signal.signal(signum, handler)
      _state.update(signalled="", deferred=False, quit=None)

  def on_signal(self, signum: int) -> None:
    self.flag = True
    if signum == signal.SIGINT:
      print("\ninterrupted: saving at the end of this step (Ctrl-C again quits at once)",
            file=sys.stderr, flush=True)
      import jax
      if jax.process_count() > 1:  # tell JAX's preemption service, which every process asks
        os.kill(os.getpid(), signal.SIGTERM)

  def requested(self, step: int) -> bool:
    """Whether to save and stop after `step` (the same answer on every process)."""
    import jax
    if jax.process_count() > 1:
      return self.checkpointer.reached_preemption(step)
    return self.flag
