"""A run's parameters: created (already sharded), split into the part that trains and the part
that stays frozen, put back together, counted.

A run's parameters are split in two by path ('backbone/block_3/attn/query/kernel'): trainable
ones live in the train state and its checkpoints; frozen ones are never saved, since they are
the `init_from` model's, and are read from it again on resume and for inference. So a LoRA
checkpoint holds the adapters (and a task head) plus, in config.json, a reference to its base.
`assemble` folds the adapters into the kernels: the model only ever sees a plain tree.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from llm import model as model_lib
from llm.errors import UserError
from llm.model import layers, lora
from llm.training import sharding

HEADS = ("head", "lm_head")  # a classifier's head; an untied LM head


def boxed(cfg, model, rng):
  """Fresh parameters with logical axis names, LoRA adapters added where configured.

  They are drawn for the unrolled blocks and then stacked when the model scans its layers, so a
  seed gives the same model either way; drawn in float32, then stored in model.param_dtype.
  """
  params = model_lib.unrolled(model).init({"params": rng}, jnp.zeros((1, 1), jnp.int32))["params"]
  dtype = jnp.dtype(cfg.model.param_dtype)
  if dtype != jnp.float32:
    params = jax.tree.map(lambda p: p.astype(dtype), params)
  if cfg.lora.rank:
    params, num_adapted = lora.add(params, cfg.lora.rank, cfg.lora.targets,
                                   jax.random.fold_in(rng, 1))
    if not num_adapted:
      raise UserError(f"lora.targets={cfg.lora.targets!r} matches no kernel; parameter paths "
                      "look like block_0/attn/query/kernel or backbone/block_0/mlp/wi/kernel")
  return layers.to_layout(params, model_lib.shape_of(model).scan_layers)


def abstract(cfg, model, mesh, mesh_cfg):
  """(the boxed parameter tree's shapes, their shardings on `mesh`), without computing them."""
  rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0)
  with sharding.activate(mesh, mesh_cfg):
    shapes = jax.eval_shape(lambda: boxed(cfg, model, rng))
  return shapes, sharding.logical_shardings(shapes, mesh, mesh_cfg)


def values(boxed_shapes):
  """A boxed tree (of shapes) without its logical axis names; unlike nn.meta.unbox, it adds no
  sharding constraint (which abstract shapes cannot take)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.value if is_box(x) else x, boxed_shapes, is_leaf=is_box)


def init(cfg, model, mesh, mesh_cfg, source_params=None, source_name: str = ""):
  """A run's starting parameters, created already sharded (eval_shape -> shardings -> jit),
  with the source's weights put in. Returns (params, shardings, boxed abstract tree)."""
  rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0)
  shapes, shardings = abstract(cfg, model, mesh, mesh_cfg)
  with sharding.activate(mesh, mesh_cfg):
    params = jax.jit(lambda: nn.meta.unbox(boxed(cfg, model, rng)), out_shardings=shardings)()
  if source_params is not None:
    params = place(params, shardings, source_params, source_name)
  return params, shardings, shapes


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

  A backbone's parameters fit under a classifier's "backbone" (and back), and unrolled blocks
  under scanned ones (and back); leaves the source lacks (a new head, LoRA adapters) keep their
  fresh values.
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  shard = traverse_util.flatten_dict(shardings, sep="/")
  source_params = layers.to_layout(source_params, layers.is_scanned(params))
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


def count(tree) -> int:
  """Numbers in a tree of arrays (or of their shapes)."""
  return sum(x.size for x in jax.tree.leaves(tree))
