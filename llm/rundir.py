"""Opens a run directory for inference: its config, tokenizer, model and latest parameters
(for a fine-tuned run, the checkpoint's trainable part joined with its init_from base).

    run = rundir.load("runs/gpt_tiny")
    logits = run.model.apply({"params": run.params}, tokens)

On several devices the parameters are split over them by heads, MLP width and vocabulary (tensor
parallelism, through the run's logical axis rules); a model whose sizes do not divide by the
device count stays on the first device.
"""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import ml_collections

from llm import config as config_lib, finetune, sharding, tasks
from llm import model as model_lib
from llm import tokenizer as tokenizer_lib
from llm.errors import UserError


@dataclasses.dataclass
class Run:
  cfg: ml_collections.ConfigDict
  tokenizer: tokenizer_lib.Tokenizer
  model: nn.Module
  params: dict
  mesh: jax.sharding.Mesh
  mesh_cfg: ml_collections.ConfigDict


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """DIR/config.json over today's defaults, so a run saved before a key existed still loads."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"{workdir} is not a run directory (no config.json); train one with "
                    f"python -m llm.train --workdir={workdir} or convert one with llm.convert")
  with open(path) as f:
    saved = json.load(f)
  cfg = config_lib.base_config()
  for section, values in saved.items():
    if isinstance(values, dict) and section in cfg:
      cfg[section].update({k: v for k, v in values.items() if k in cfg[section]})
    elif section in cfg:
      cfg[section] = values
  return cfg


def load(workdir: str, devices=None) -> Run:
  cfg = read_config(workdir)
  tokenizer = tokenizer_lib.load(os.path.join(workdir, "tokenizer"))
  model = tasks.build_model(cfg, tokenizer.vocab_size)
  devices = jax.devices() if devices is None else devices
  m = model_lib.shape_of(model)
  if any(size % len(devices) for size in (m.num_heads, m.d_ff, m.vocab_size)):
    devices = devices[:1]
  mesh_cfg = ml_collections.ConfigDict(
      {"data": 1, "fsdp": 1, "tensor": len(devices), "rules": cfg.mesh.rules})
  mesh = sharding.make_mesh(mesh_cfg, devices)
  params = finetune.run_params(cfg, model, workdir, mesh, mesh_cfg)
  return Run(cfg, tokenizer, model, params, mesh, mesh_cfg)
