"""Stopping a run on request (SIGTERM from a scheduler or a preempted VM, Ctrl-C), saved.

The train loop asks `requested(step)` after every step. When it says yes, the loop saves a
checkpoint of that step and raises `Preempted`; the command line prints one line and exits with
EXIT_PREEMPTED, so a scheduler can requeue the job. A second Ctrl-C quits at once, without
saving (the last checkpoint stays intact).

On one process a Python signal handler sets a flag. On several, every process must stop at the
same step: JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM on
any process and `reached_preemption` makes them agree on a step; Ctrl-C is passed to it as a
SIGTERM.
"""

import os
import signal
import sys
import threading

import jax

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"


class Preempted(Exception):
  """The run stopped at a step on request, after saving it."""


class Watcher:

  def __init__(self, checkpointer):
    self.checkpointer = checkpointer
    self.flag = False
    self.previous = {}
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be set from the main thread
    self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)
    if jax.process_count() == 1:
      self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_terminate)

  def _on_terminate(self, signum, frame):
    self.flag = True

  def _on_interrupt(self, signum, frame):
    if self.flag:
      print("\ninterrupted again: quitting without saving (the last checkpoint is intact)",
            file=sys.stderr, flush=True)
      os._exit(130)
    self.flag = True
    print("\ninterrupted: saving at the end of this step (Ctrl-C again quits at once)",
          file=sys.stderr, flush=True)
    if jax.process_count() > 1:  # tell JAX's preemption service, which every process asks
      os.kill(os.getpid(), signal.SIGTERM)

  def requested(self, step: int) -> bool:
    """Whether to save and stop after `step` (the same answer on every process)."""
    if jax.process_count() > 1:
      return self.checkpointer.reached_preemption(step)
    return self.flag

  def close(self) -> None:
    for signum, handler in self.previous.items():
      signal.signal(signum, handler)
