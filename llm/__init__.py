"""Training, tuning, evaluating and serving transformer language models in JAX (docs/index.md).

A process started as a command (`python -m llm.<name>`) exits with status 75 on a signal from
its first instant, while it still imports its libraries: see llm/training/preemption.py.
"""

import sys


def _started_as_command() -> bool:
  """Whether this process is `python [options] -m llm.<name> ...`."""
  argv, i = sys.orig_argv, 1
  while i < len(argv) and argv[i].startswith("-"):
    if argv[i].startswith("-m"):  # -m NAME, or -mNAME
      name = argv[i + 1] if argv[i] == "-m" and i + 1 < len(argv) else argv[i][2:]
      return name.split(".")[0] == "llm"
    if argv[i] == "-c":
      return False
    i += 2 if argv[i] in ("-X", "-W") else 1
  return False

if _started_as_command():
  from llm.training import preemption
  preemption.exit_while_starting()
