"""Starting from a pre-trained model: where its weights come from (`init_from`), which of a
run's parameters train (`train.trainable`, `lora.rank`), and how a run's full parameters are
put together again for inference.

A run's parameters are split in two by path ('backbone/block_3/attn/query/kernel'):
trainable ones live in the train state and its checkpoints; frozen ones are never saved, since
they are the `init_from` model's, and are read from it again on resume and for inference. So a
LoRA checkpoint holds the adapters (and a task head) plus, in config.json, a reference to its
base. `assemble` folds the adapters into the kernels: the model only ever sees a plain tree.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from llm import checkpoint, sharding
from llm import model as model_lib
from llm import tokenizer as tokenizer_lib
from llm.errors import UserError
from llm.model import lora

HEADS = ("head", "lm_head")  # a classifier's head; an untied LM head


class Source:
  """The model `init_from` names: a run directory, or a Hugging Face folder or hub name."""

  def __init__(self, path: str):
    from llm import convert, rundir
    self.path = path
    config_path = os.path.join(path, "config.json")
    is_run = os.path.isfile(config_path) and "model" in json.load(open(config_path))
    if is_run:
      self.model_values = rundir.read_config(path).model.to_dict()
      self.tokenizer = tokenizer_lib.load(os.path.join(path, "tokenizer"))
      self._params = lambda: rundir.load(path, jax.devices()).params
    else:
      if not os.path.isdir(path) and os.path.exists(path):
        raise UserError(f"init_from={path!r} is not a run directory nor a model folder")
      directory = convert.resolve_hf(path)
      hf = convert.read_hf_config(directory)
      self.model_values = convert.hf_model_values(hf)
      self.tokenizer = convert.hf_tokenizer(directory, hf)
      self._params = lambda: convert.load_hf(directory)[2]

  def params(self):
    """The source's full parameters (a run's adapters already merged)."""
    return self._params()


def boxed_params(cfg, model, rng):
  """Fresh parameters with logical axis names, LoRA adapters added where configured."""
  params = model.init({"params": rng}, jnp.zeros((1, 1), jnp.int32))["params"]
  if cfg.lora.rank:
    params, num_adapted = lora.add(params, cfg.lora.rank, cfg.lora.targets,
                                   jax.random.fold_in(rng, 1))
    if not num_adapted:
      raise UserError(f"lora.targets={cfg.lora.targets!r} matches no kernel; parameter paths "
                      "look like block_0/attn/query/kernel or backbone/block_0/mlp/wi/kernel")
  return params


def is_trainable(cfg, num_layers: int):
  """path -> whether that parameter trains, from train.trainable and lora.rank."""
  segments = lambda path: path.split("/")
  if cfg.lora.rank:  # adapters, and a task head that did not exist before
    return lambda path: path.rsplit("/", 1)[-1] in (lora.A, lora.B) or segments(path)[0] == "head"
  if cfg.train.trainable == "all":
    return lambda path: True
  top = set(HEADS)
  if cfg.train.trainable.startswith("last:"):
    k = int(cfg.train.trainable[5:])
    # the final norm (GPT) or the pooler (BERT) sit between the last block and the head
    top |= {"ln_f", "pooler"} | {f"block_{i}" for i in range(max(num_layers - k, 0), num_layers)}
  return lambda path: any(s in top for s in segments(path))


def split(params, trainable) -> tuple[dict, dict]:
  """params -> (trainable part, frozen part), two nested dicts."""
  flat = traverse_util.flatten_dict(params, sep="/")
  parts = ({p: v for p, v in flat.items() if trainable(p)},
           {p: v for p, v in flat.items() if not trainable(p)})
  return tuple(traverse_util.unflatten_dict(part, sep="/") for part in parts)


def assemble(cfg, trainable, frozen):
  """The model's parameters: both parts joined, LoRA adapters merged into their kernels."""
  flat = {**traverse_util.flatten_dict(frozen, sep="/"),
          **traverse_util.flatten_dict(trainable, sep="/")}
  params = traverse_util.unflatten_dict(flat, sep="/")
  return lora.merge(params, cfg.lora.alpha / cfg.lora.rank) if cfg.lora.rank else params


def place(params, shardings, source_params, source_name: str):
  """`params` with every leaf the source also has replaced by the source's value.

  A backbone's parameters fit under a classifier's "backbone" (and back); leaves the source
  lacks (a new head, LoRA adapters) keep their fresh values.
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  shard = traverse_util.flatten_dict(shardings, sep="/")
  src = traverse_util.flatten_dict(source_params, sep="/")
  wants_backbone = any(p.startswith("backbone/") for p in flat)
  has_backbone = any(p.startswith("backbone/") for p in src)
  if wants_backbone and not has_backbone:
    src = {"backbone/" + p: v for p, v in src.items()}
  elif has_backbone and not wants_backbone:
    src = {p.removeprefix("backbone/"): v for p, v in src.items() if p.startswith("backbone/")}
  matched = 0
  for path, value in flat.items():
    if path in src:
      if src[path].shape != value.shape:
        raise UserError(f"init_from={source_name}: parameter {path} has shape "
                        f"{tuple(src[path].shape)} there but {tuple(value.shape)} in this "
                        "model; the model config must match the source's")
      flat[path] = jax.device_put(jnp.asarray(src[path], value.dtype), shard[path])
      matched += 1
  if not matched:
    raise UserError(f"init_from={source_name}: no parameter of it fits this model")
  return traverse_util.unflatten_dict(flat, sep="/")


def init_params(cfg, model, mesh, mesh_cfg, source: Source | None = None):
  """A run's starting parameters, created already sharded (eval_shape -> shardings -> jit),
  with the source's weights put in. Returns (params, shardings, boxed abstract tree)."""
  rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0)
  with sharding.activate(mesh, mesh_cfg):
    boxed = jax.eval_shape(lambda: boxed_params(cfg, model, rng))
    shardings = sharding.logical_shardings(boxed, mesh, mesh_cfg)
    params = jax.jit(lambda: nn.meta.unbox(boxed_params(cfg, model, rng)),
                     out_shardings=shardings)()
  if source is not None:
    params = place(params, shardings, source.params(), source.path)
  return params, shardings, boxed


def run_params(cfg, model, workdir: str, mesh, mesh_cfg):
  """The model parameters of a trained run: its checkpoint's trainable part, the rest from
  its init_from source, adapters merged."""
  rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0)
  with sharding.activate(mesh, mesh_cfg):
    boxed = jax.eval_shape(lambda: boxed_params(cfg, model, rng))
  shardings = sharding.logical_shardings(boxed, mesh, mesh_cfg)
  abstract = checkpoint.abstract_like(nn.meta.unbox(boxed), shardings)
  trainable_filter = is_trainable(cfg, model_lib.shape_of(model).num_layers)
  trainable_abstract, frozen_abstract = split(abstract, trainable_filter)
  ckpt = checkpoint.Checkpointer(workdir, keep=1)
  step = ckpt.latest_step()
  if step is None:
    raise UserError(f"{workdir} has no checkpoint yet")
  trainable = ckpt.restore_params(step, trainable_abstract)
  ckpt.close()
  frozen = {}
  if frozen_abstract:  # as training started: fresh from the seed, then the source's weights
    source = Source(cfg.init_from) if cfg.init_from else None
    params, _, _ = init_params(cfg, model, mesh, mesh_cfg, source)
    frozen = split(params, trainable_filter)[1]
  return assemble(cfg, trainable, frozen)


def count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))
