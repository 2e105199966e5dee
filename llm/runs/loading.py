"""A run's model opened with its parameters: for inference (`load`), or as the model a run starts
from (`Source` for init_from, `Start` for the starting parameters).

    run = runs.load("runs/gpt_tiny")
    logits = run.model.apply({"params": run.params}, tokens)

On several devices `load` splits the parameters over them by heads, MLP width and vocabulary
(tensor parallelism, through the run's logical axis rules); a model whose sizes do not divide by
the device count stays on the first device. The files themselves are llm/runs/rundir.py.
"""

import dataclasses

import flax.linen as nn
import jax
import ml_collections

from llm import tasks
from llm import model as model_lib
from llm.errors import UserError
from llm.runs import hf, rundir
from llm.text import tokenizer as tokenizer_lib
from llm.training import checkpoint, optim, sharding, params as params_lib


class Source:
  """The model `init_from` names: a run directory, or a Hugging Face folder or hub name.

  `values` are the config sections the run takes from it (`model`, `tokenizer`); its parameters
  are read once, when first asked for.
  """

  def __init__(self, name: str):
    self.name = name
    self._params = None
    self.kind = ""  # the task a run of ours trained it for ("" for a Hugging Face model)
    if rundir.is_run(name):
      saved = rundir.read_config(name)
      self.kind = saved.task.kind
      self.values = {"model": saved.model.to_dict(),
                     "tokenizer": {"kind": saved.tokenizer.kind,
                                   "lowercase": saved.tokenizer.lowercase}}
      self.tokenizer = rundir.read_tokenizer(name)
      self._read = lambda: load(name, jax.devices()).params
    else:
      directory = hf.locate(name)
      hf_config = hf.read_hf_config(directory)
      model_values = hf.model_values(hf_config)  # a config it cannot read is said first
      self.tokenizer = hf.load_tokenizer(directory, hf_config)
      self.values = {"model": model_values,
                     "tokenizer": {"kind": self.tokenizer.kind,
                                   "lowercase": getattr(self.tokenizer, "lowercase", True)}}
      self._read = lambda: hf.load(directory)[2]

  def params(self):
    """The source's full parameters (a run's adapters already merged)."""
    if self._params is None:
      self._params = self._read()
    return self._params


class Start:
  """The parameters a run (config `cfg`, on `mesh`) starts from: its source's weights, fresh
  ones where the source has none, LoRA adapters at zero."""

  def __init__(self, cfg, mesh, mesh_cfg, source: Source | None = None):
    self.cfg, self.mesh, self.mesh_cfg = cfg, mesh, mesh_cfg
    self.source = source if source is not None or not cfg.init_from else Source(cfg.init_from)

  def source_params(self):
    return self.source.params() if self.source else None

  def init(self, model):
    """(params, shardings, boxed abstract tree): created sharded, the source's weights in."""
    return params_lib.init(self.cfg, model, self.mesh, self.mesh_cfg, self.source_params(),
                           self.cfg.init_from)

  def params(self, model):
    """The starting model as one merged tree (with LoRA, the base alone)."""
    return params_lib.assemble(self.cfg, self.init(model)[0], {})


USE_EMA_HELP = ("Use the run's moving average of its parameters (a run trained with "
                "train.ema) instead of the parameters themselves.")


def load_params(cfg, model, workdir: str, mesh, mesh_cfg, use_ema: bool = False):
  """The model parameters of a trained run: its checkpoint's trainable part (with `use_ema`
  their moving average; schedule-free's averaged point), the rest from its init_from source,
  adapters merged."""
  shapes, shardings = params_lib.abstract(cfg, model, mesh, mesh_cfg)
  abstract = checkpoint.abstract_like(nn.meta.unbox(shapes), shardings)
  trainable_filter = params_lib.is_trainable(cfg, model_lib.shape_of(model).num_layers)
  trainable_abstract, frozen_abstract = params_lib.split(abstract, trainable_filter)
  if use_ema and not cfg.train.get("ema"):
    raise UserError(f"--use_ema: {workdir} was trained without a moving average "
                    "(train.ema=0)")
  ckpt = rundir.checkpointer(workdir)
  try:
    if use_ema:
      trainable = ckpt.restore_params(trainable_abstract, "ema")
    elif cfg.train.get("optimizer") == "schedule_free":
      boxed = params_lib.split(shapes, trainable_filter)[0]
      tx = optim.build(cfg.train, boxed)
      with sharding.activate(mesh, mesh_cfg):
        opt_boxed = jax.eval_shape(tx.init, boxed)
        opt_state = checkpoint.abstract_like(
            params_lib.values(opt_boxed), sharding.logical_shardings(opt_boxed, mesh, mesh_cfg))
      parts = ckpt.restore_parts({"params": trainable_abstract, "opt_state": opt_state})
      trainable = optim.evaluation_params(cfg.train, parts["params"], parts["opt_state"])
    else:
      trainable = ckpt.restore_params(trainable_abstract)
  finally:
    ckpt.close()
  frozen = {}
  if frozen_abstract:  # as training started: fresh from the seed, then the source's weights
    params = Start(cfg, mesh, mesh_cfg).init(model)[0]
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
  task: tasks.Task | None = None  # what it was trained for: what its model produces


def load(workdir: str, devices=None, use_ema: bool = False) -> Run:
  """The run in `workdir` opened for inference (`use_ema`: at its parameters' moving
  average)."""
  cfg = rundir.read_config(workdir)
  tokenizer = rundir.read_tokenizer(workdir)
  task = tasks.build(cfg)
  model = task.build_model(tokenizer.vocab_size)
  devices = jax.devices() if devices is None else devices
  m = model_lib.shape_of(model)
  if any(size % len(devices) for size in (m.num_heads, m.d_ff, m.vocab_size)):
    devices = devices[:1]
  mesh_cfg = ml_collections.ConfigDict(
      {"data": 1, "fsdp": 1, "tensor": len(devices), "rules": cfg.mesh.rules})
  mesh = sharding.make_mesh(mesh_cfg, devices)
  params = load_params(cfg, model, workdir, mesh, mesh_cfg, use_ema)
  return Run(cfg, tokenizer, model, params, mesh, mesh_cfg, workdir, task)
