"""Files written whole or not at all."""

import contextlib
import os

from etils import epath


@contextlib.contextmanager
def written(path):
  """Yields a temporary path beside `path` (local or a bucket's) to write, a file or a folder;
  it becomes `path`
  when the block ends, and is removed if the block raises or a signal stops it (see
  llm/training/preemption.py), so that a reader never sees half a file and nothing is left
  behind. The name carries the writer's process id: `remove_stale` tells a killed writer's from
  a live one's."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
  try:
    yield tmp
    tmp.replace(path)
  except BaseException:
    if tmp.is_dir():
      tmp.rmtree()
    else:
      tmp.unlink(missing_ok=True)
    raise


def remove_stale(directory: epath.Path) -> None:
  """Removes the temporary files of writers killed on this machine (kill -9 runs no cleanup),
  not those of a writer still running."""
  for tmp in directory.glob(".*.tmp"):
    pid = tmp.name.rsplit(".", 2)[-2]
    if not pid.isdigit():
      continue
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      tmp.unlink(missing_ok=True)
    except PermissionError:  # alive, another user's
      pass
