"""The run directory: what DIR holds, and the one place that writes, recognises and opens it.

    DIR/config.json     the run's resolved config (config.resolve), written when training starts
    DIR/tokenizer/      the tokenizer's files, so DIR alone is enough to sample from
    DIR/checkpoints/    orbax steps (checkpoint.py): the trainable parameters, optimizer state,
                        step, RNG and data position
    DIR/metrics.jsonl   one JSON line per log (metrics.py), and TensorBoard events beside it
    DIR/.lock           while a run trains in DIR: its host and process id
    DIR/task_data.npz   what the task computed once from the starting model (DPO: the
                        reference log-probabilities), read back on resume

`python -m llm.train` creates DIR (`start`); `python -m llm.convert` writes a complete one from
a Hugging Face folder (`write`); `init_from` names one or a Hugging Face folder (`Source`); the
other entry points open one for inference (`load`):

    run = rundir.load("runs/gpt_tiny")
    logits = run.model.apply({"params": run.params}, tokens)

On several devices `load` splits the parameters over them by heads, MLP width and vocabulary
(tensor parallelism, through the run's logical axis rules); a model whose sizes do not divide by
the device count stays on the first device.
"""

import contextlib
import dataclasses
import json
import os
import socket

import flax.linen as nn
import jax
import ml_collections

from llm import checkpoint, config as config_lib, hf, params as params_lib, sharding, tasks
from llm import model as model_lib
from llm import tokenizer as tokenizer_lib
from llm.errors import UserError

CONFIG, TOKENIZER, CHECKPOINTS, METRICS, LOCK, TASK_DATA = (
    "config.json", "tokenizer", "checkpoints", "metrics.jsonl", ".lock", "task_data.npz")


def path(workdir: str, name: str) -> str:
  """DIR/name for one of CONFIG, TOKENIZER, CHECKPOINTS, METRICS, LOCK, TASK_DATA."""
  return os.path.join(workdir, name)


def is_run(directory: str) -> bool:
  """A run directory (rather than a Hugging Face folder, whose config.json has no sections)."""
  try:
    with open(path(directory, CONFIG)) as f:
      return isinstance(json.load(f).get("model"), dict)
  except (OSError, ValueError, AttributeError):
    return False


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


def has_tokenizer(workdir: str) -> bool:
  return os.path.isdir(path(workdir, TOKENIZER))


def checkpointer(workdir: str, keep: int = 1) -> checkpoint.Checkpointer:
  return checkpoint.Checkpointer(path(workdir, CHECKPOINTS), keep)


def start(workdir: str, cfg, tokenizer) -> None:
  """A run starts (or resumes): DIR gets its config and tokenizer."""
  os.makedirs(workdir, exist_ok=True)
  with open(path(workdir, CONFIG), "w") as f:
    f.write(cfg.to_json_best_effort(indent=2))
  tokenizer.save(path(workdir, TOKENIZER))


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
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except (ValueError, KeyError, TypeError):
        if line.strip():
          print(f"warning: {metrics} line {number} is torn (a kill while it was written); "
                "dropped")
  with open(metrics + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(metrics + ".tmp", metrics)


class Source:
  """The model `init_from` names: a run directory, or a Hugging Face folder or hub name.

  `values` are the config sections the run takes from it (`model`, `tokenizer`).
  """

  def __init__(self, name: str):
    self.name = name
    if is_run(name):
      saved = read_config(name)
      self.values = {"model": saved.model.to_dict(),
                     "tokenizer": {"kind": saved.tokenizer.kind,
                                   "lowercase": saved.tokenizer.lowercase}}
      self.tokenizer = read_tokenizer(name)
      self._params = lambda: load(name, jax.devices()).params
    else:
      directory = hf.resolve(name)
      hf_config = hf.read_config(directory)
      model_values = hf.model_values(hf_config)
      self.tokenizer = hf.load_tokenizer(directory, hf_config)
      self.values = {"model": model_values,
                     "tokenizer": {"kind": self.tokenizer.kind,
                                   "lowercase": getattr(self.tokenizer, "lowercase", True)}}
      self._params = lambda: hf.load(directory)[2]

  def params(self):
    """The source's full parameters (a run's adapters already merged)."""
    return self._params()


def load_params(cfg, model, workdir: str, mesh, mesh_cfg):
  """The model parameters of a trained run: its checkpoint's trainable part, the rest from
  its init_from source, adapters merged."""
  shapes, shardings = params_lib.abstract(cfg, model, mesh, mesh_cfg)
  abstract = checkpoint.abstract_like(nn.meta.unbox(shapes), shardings)
  trainable_filter = params_lib.is_trainable(cfg, model_lib.shape_of(model).num_layers)
  trainable_abstract, frozen_abstract = params_lib.split(abstract, trainable_filter)
  ckpt = checkpointer(workdir)
  try:
    trainable = ckpt.restore_params(trainable_abstract)
  finally:
    ckpt.close()
  frozen = {}
  if frozen_abstract:  # as training started: fresh from the seed, then the source's weights
    source = Source(cfg.init_from) if cfg.init_from else None
    params, _, _ = params_lib.init(cfg, model, mesh, mesh_cfg,
                                   source and source.params(), cfg.init_from)
    frozen = params_lib.split(params, trainable_filter)[1]
  return params_lib.assemble(cfg, trainable, frozen)


@dataclasses.dataclass
class Run:
  """A run directory opened for inference."""
  cfg: ml_collections.FrozenConfigDict
  tokenizer: tokenizer_lib.Tokenizer
  model: nn.Module
  params: dict
  mesh: jax.sharding.Mesh
  mesh_cfg: ml_collections.ConfigDict
  workdir: str = ""


def load(workdir: str, devices=None) -> Run:
  cfg = read_config(workdir)
  tokenizer = read_tokenizer(workdir)
  model = tasks.build_model(cfg, tokenizer.vocab_size)
  devices = jax.devices() if devices is None else devices
  m = model_lib.shape_of(model)
  if any(size % len(devices) for size in (m.num_heads, m.d_ff, m.vocab_size)):
    devices = devices[:1]
  mesh_cfg = ml_collections.ConfigDict(
      {"data": 1, "fsdp": 1, "tensor": len(devices), "rules": cfg.mesh.rules})
  mesh = sharding.make_mesh(mesh_cfg, devices)
  params = load_params(cfg, model, workdir, mesh, mesh_cfg)
  return Run(cfg, tokenizer, model, params, mesh, mesh_cfg, workdir)
