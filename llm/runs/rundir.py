"""The run directory: what DIR holds, and the one place that writes and recognises its files.

    DIR/config.json     the run's resolved config (config.resolve), written when training starts
    DIR/tokenizer/      the tokenizer's files, so DIR alone is enough to sample from
    DIR/checkpoints/    orbax steps (checkpoint.py): the trainable parameters, optimizer state,
                        step, RNG and data position
    DIR/metrics.jsonl   one JSON line per log (metrics.py), and TensorBoard events beside it
    DIR/.lock           while a run trains in DIR: its host and process id
    DIR/task_data.npz   what the task computed once from the starting model (DPO: the
                        reference log-probabilities), read back on resume
    DIR/profile/        a jax.profiler trace of train.profile_steps (TensorBoard, Perfetto)

`python -m llm.train` creates DIR (`start`); `python -m llm.convert` writes a complete one from
a Hugging Face folder (`write`). Opening a run's model, for inference or as `init_from`, is
llm/runs/loading.py.
"""

import contextlib
import json
import os
import shutil
import socket

import ml_collections

from llm import files
from llm import config as config_lib
from llm.errors import UserError
from llm.text import tokenizer as tokenizer_lib
from llm.training import checkpoint

CONFIG, TOKENIZER, CHECKPOINTS, METRICS, LOCK, TASK_DATA, PROFILE = (
    "config.json", "tokenizer", "checkpoints", "metrics.jsonl", ".lock", "task_data.npz",
    "profile")


def path(workdir: str, name: str) -> str:
  """DIR/name for one of CONFIG, TOKENIZER, CHECKPOINTS, METRICS, LOCK, TASK_DATA, PROFILE."""
  return os.path.join(workdir, name)


def is_run(directory: str) -> bool:
  """A run directory (rather than a Hugging Face folder, whose config.json has no sections)."""
  try:
    with open(path(directory, CONFIG)) as f:
      return isinstance(json.load(f).get("model"), dict)
  except (OSError, ValueError, AttributeError):
    return False


def check(workdir: str) -> None:
  """Before anything is written: DIR can be a run directory (a folder, or a path one can be
  made at), and its files are of the right kind."""
  parent = workdir
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent.rstrip(os.sep))
  if parent and not os.path.isdir(parent):
    raise UserError(f"--workdir={workdir}: {parent} is a file, not a folder; choose another "
                    "--workdir")
  if parent and not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f"--workdir={workdir}: {parent} is not writable; choose another --workdir")
  for name, is_kind, kind in ((CONFIG, os.path.isfile, "file"), (METRICS, os.path.isfile, "file"),
                              (TOKENIZER, os.path.isdir, "folder"),
                              (CHECKPOINTS, os.path.isdir, "folder")):
    if os.path.exists(path(workdir, name)) and not is_kind(path(workdir, name)):
      raise UserError(f"{path(workdir, name)} should be a {kind}; move it away, or choose "
                      "another --workdir")


def resume_changes(workdir: str, cfg) -> list[str]:
  """What resuming the run in DIR with `cfg` changes (config.resume_changes: UserError for what
  cannot change); nothing for a new run, or one that stopped before its first checkpoint."""
  if not os.path.isfile(path(workdir, CONFIG)) or not resumes(workdir):
    return []
  try:
    with open(path(workdir, CONFIG)) as f:
      saved = json.load(f)
  except ValueError as e:
    raise UserError(f"{path(workdir, CONFIG)} is not valid JSON ({e}); fix it, or choose another "
                    "--workdir") from None
  return config_lib.resume_changes(saved, cfg)


def read_config(workdir: str) -> ml_collections.FrozenConfigDict:
  """DIR/config.json over today's defaults, so a run saved before a key existed still loads."""
  if not os.path.isfile(path(workdir, CONFIG)):
    raise UserError(f"{workdir} is not a run directory (no config.json); train one with "
                    f"python -m llm.train --workdir={workdir} or convert one with llm.convert")
  try:
    with open(path(workdir, CONFIG)) as f:
      saved = json.load(f)
  except ValueError as e:
    raise UserError(f"{path(workdir, CONFIG)} is not valid JSON ({e})") from None
  cfg = config_lib.base_config()
  for section, values in saved.items():
    if isinstance(values, dict) and section in cfg:
      cfg[section].update({k: v for k, v in values.items() if k in cfg[section]})
    elif section in cfg:
      cfg[section] = values
  return ml_collections.FrozenConfigDict(cfg)


def read_tokenizer(workdir: str) -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.load(path(workdir, TOKENIZER))


def resumes(workdir: str) -> bool:
  """Whether a run in DIR has a checkpoint to resume from. Until it has, DIR's config and
  tokenizer are only those of a start that stopped early: a new start may change them."""
  folder = path(workdir, CHECKPOINTS)
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def checkpointer(workdir: str, keep: int = 1, trains: bool = False) -> checkpoint.Checkpointer:
  return checkpoint.Checkpointer(path(workdir, CHECKPOINTS), keep, trains)


def start(workdir: str, cfg, tokenizer) -> None:
  """A run starts (or resumes): DIR gets its config and tokenizer."""
  os.makedirs(workdir, exist_ok=True)
  if not resumes(workdir):  # a resumed run's is the one it read
    if os.path.isdir(path(workdir, TOKENIZER)):
      shutil.rmtree(path(workdir, TOKENIZER))
    with files.written(path(workdir, TOKENIZER)) as tmp:
      tokenizer.save(os.fspath(tmp))
  with files.written(path(workdir, CONFIG)) as tmp:
    tmp.write_text(cfg.to_json_best_effort(indent=2))


def write(workdir: str, cfg, tokenizer, params) -> None:
  """A complete run directory holding `params` as its step-0 checkpoint."""
  if os.path.exists(path(workdir, CHECKPOINTS)):
    raise UserError(f"{workdir} already holds checkpoints; write into a new directory")
  os.makedirs(workdir, exist_ok=True)
  tokenizer.save(path(workdir, TOKENIZER))
  ckpt = checkpointer(workdir)
  ckpt.save(0, {"params": params}, {"step": 0})
  ckpt.close()
  with open(path(workdir, CONFIG), "w") as f:  # last: DIR is complete
    f.write(cfg.to_json_best_effort(indent=2))


@contextlib.contextmanager
def lock(workdir: str):
  """Holds DIR/.lock while a run trains in DIR: a second run on DIR stops with one line. A lock
  left by a process that is gone (killed) on this host is taken over."""
  os.makedirs(workdir, exist_ok=True)
  lock_path, me = path(workdir, LOCK), {"host": socket.gethostname(), "pid": os.getpid()}
  while True:
    try:
      fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      break
    except FileExistsError:
      holder = _read_lock(lock_path)
      if holder and not _is_gone(holder):
        raise UserError(f"{workdir} is in use by another run (process {holder['pid']} on "
                        f"{holder['host']}); wait for it to end, or delete {lock_path} if that "
                        "run is gone") from None
      print(f"note: taking over {lock_path}, left by a run that is gone")
      os.remove(lock_path)
  with os.fdopen(fd, "w") as f:
    json.dump(me, f)
  try:
    yield
  finally:
    if _read_lock(lock_path) == me:
      os.remove(lock_path)


def _read_lock(lock_path: str) -> dict | None:
  try:
    with open(lock_path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None  # gone, or torn by a kill while it was written


def _is_gone(holder: dict) -> bool:
  if holder.get("host") != socket.gethostname():
    return False  # another machine's process: it cannot be checked from here
  try:
    os.kill(int(holder["pid"]), 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False
  return int(holder["pid"]) == os.getpid()  # alive, but it is this process: a leftover


def drop_metrics_after(workdir: str, step: int) -> None:
  """A run that starts or resumes at `step` logs the steps after it again: their old lines go
  (all of them when it starts from 0), and so does a line torn by a kill mid-write."""
  metrics = path(workdir, METRICS)
  if not os.path.exists(metrics):
    return
  kept = []
  with open(metrics) as f:
    for number, line in enumerate(f, 1):
      try:
        if json.loads(line)["step"] <= step and step:  # (a step 0 evaluation goes too)
          kept.append(line)
      except (ValueError, KeyError, TypeError):
        if line.strip():
          print(f"warning: {metrics} line {number} is torn (a kill while it was written); "
                "dropped")
  with files.written(metrics) as tmp, tmp.open("w") as f:
    f.writelines(kept)
