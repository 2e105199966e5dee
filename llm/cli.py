"""What every entry point (`python -m llm.<name>`) shares: starting, and bad input as one line.

    if __name__ == "__main__":
      cli.run(main, define_flags)

A UserError, a config file that does not exist, a misspelled config key or flag: each prints one
line (`error: ...`, with the closest valid name where there is one) and exits with status 2,
before anything is written.
"""

import atexit
import functools
import gc
import glob
import os
import re
import stat
import sys
import threading

import jax
from absl import app, flags, logging

from llm.errors import closest, UserError
from llm.training import preemption

EXIT_USER_ERROR = 2


def run(main, define_flags) -> None:
  preemption.protect(quit_at_once)  # from the first line: see llm/training/preemption.py
  try:  # a signal while the flags are defined and parsed, before main's own try
    define_flags()
    flags.DEFINE_bool("verbose", False, "Show the log lines of XLA and Gloo that are hidden.")
    app.run(_exits_cleanly(main), flags_parser=_parse_flags)
  except preemption.Interrupted as e:
    _stop(str(e))


def _exits_cleanly(main):
  @functools.wraps(main)
  def wrapped(argv):
    if not flags.FLAGS.verbose:
      logging.set_verbosity(logging.WARNING)  # orbax and jax are chatty at INFO
      _hide_chatter()
    try:
      return main(argv)
    except UserError as e:
      fail(str(e))
    except preemption.Preempted as e:
      if jax.process_index() == 0:  # every process saved; one says so
        print(e, file=sys.stderr)
      sys.exit(preemption.EXIT_PREEMPTED)
    except preemption.Interrupted as e:  # the files it was writing are removed by now
      stopped_by = str(e)
    except Exception:
      stopped_by = preemption.signalled()  # raised by a library it interrupted (XLA, orbax)
      if not stopped_by:
        raise
    _stop(stopped_by)

  return wrapped


def _stop(stopped_by: str) -> None:
  """The end of a command a signal stopped before anything was saved: one line, status 75."""
  gc.collect()  # what the interrupted frames held goes first: a progress bar ends its line
  line = f"stopped by {stopped_by}; nothing is left half-written; run the same command again"
  if jax.process_index() == 0:
    print(line, file=sys.stderr, flush=True)
  if jax.distributed.is_initialized():  # leave the other processes' service in order
    jax.distributed.shutdown()
  # Not sys.exit: XLA may still be compiling in a thread of its own, and an interpreter that
  # shuts down under it crashes (exit 139). Nothing is left to clean up by now.
  quit_at_once(preemption.EXIT_PREEMPTED, "")


def quit_at_once(status: int, line: str) -> None:
  """Ends the process now, without unwinding (a second Ctrl-C), after `line` reached the
  terminal."""
  if line:
    print(line, file=sys.stderr, flush=True)
  sys.stdout.flush()
  for restore in reversed(_restores):  # the chatter filter passes on what it holds
    restore()
  os._exit(status)


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


# Lines the C++ libraries print straight to the terminal, bypassing Python's logging: XLA's
# warnings and notes (e.g. "W1129 10:50:50.146451 9022 spmd_partitioner.cc:656] ...") and Gloo's
# connection messages, printed by every process of a multi-host run on CPU.
CHATTER = re.compile(r"\[Gloo\] Rank|\d+ is connected to \d+ peer ranks|"
                     r"[WI]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.]+:\d+\]")
_MAY_START_CHATTER = re.compile(r"\[G|[WI]\d{4} ")


def _hide_chatter() -> None:
  """Passes this process's stdout and stderr (file descriptors 1 and 2, so output from C++
  too) through a filter that drops CHATTER; a partial line such as a progress bar passes at
  once."""
  for fd in (1, 2):
    if not _is_stream_or_file(fd):
      continue
    original = os.dup(fd)
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)
    thread = threading.Thread(target=_filter, args=(read_end, original), daemon=True)
    thread.start()

    def restore(fd=fd, original=original, thread=thread):
      for stream in (sys.stdout, sys.stderr):
        stream.flush()
      os.dup2(original, fd)  # the pipe's last writer closes: the filter drains it and ends
      thread.join(timeout=5)

    atexit.register(restore)
    _restores.append(restore)


_restores = []  # undo _hide_chatter, for quit_at_once (atexit does it on a normal exit)


def _is_stream_or_file(fd: int) -> bool:
  try:
    mode = os.fstat(fd).st_mode
  except OSError:
    return False
  return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def _filter(read_end: int, out: int) -> None:
  pending, reader_gone = "", False
  while chunk := os.read(read_end, 65536):
    if reader_gone:  # e.g. `| head`: keep draining, so that the program never blocks
      continue
    pending += chunk.decode("utf-8", "replace")
    *lines, pending = pending.split("\n")
    kept = []
    for line in lines:
      match = CHATTER.search(line)
      if not match:
        kept.append(line + "\n")
      elif match.start():  # e.g. a progress bar that a log line interrupted
        kept.append(line[:match.start()])
    if not _MAY_START_CHATTER.search(pending):
      kept.append(pending)
      pending = ""
    try:
      if kept:
        os.write(out, "".join(kept).encode())
    except OSError:
      reader_gone = True
  if pending and not reader_gone:
    try:
      os.write(out, pending.encode())
    except OSError:
      pass


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every way it can fail turned into one line."""
  config_file = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
  if config_file is not None:
    path = config_file.split(":", 1)[0]
    if not os.path.isfile(path):
      fail(f"--config={config_file}: no such config file{_suggest(path, _shipped_configs(path))}")
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # absl, ml_collections and the config file raise many types
    for arg in argv[1:]:
      key = arg.removeprefix("--config.").split("=", 1)[0]
      if arg.startswith("--config.") and key not in _config_keys():
        fail(f"--config.{key}: no such config key{_suggest(key, _config_keys())}; "
             "python -m llm.train --config=FILE --print_config lists them all")
    fail(_one_line(e))


def _one_line(e: Exception) -> str:
  """The line that says what went wrong: the last one of a traceback inside the message."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  if not lines:
    return type(e).__name__
  if any(line.startswith("Traceback") for line in lines):
    return re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
  return lines[0]


def _suggest(name: str, candidates) -> str:
  close = closest(name, candidates)
  return f" (did you mean {close}?)" if close else ""


def _shipped_configs(path: str) -> list[str]:
  folder = os.path.dirname(path) or "."
  return sorted(glob.glob(os.path.join(folder, "*.py")))


@functools.cache
def _config_keys() -> tuple[str, ...]:
  from llm import config as config_lib
  return tuple(config_lib.describe_keys())
