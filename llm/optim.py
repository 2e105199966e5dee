"""AdamW with linear warmup, cosine decay and global-norm clipping."""

import jax
import optax

from llm.model import layers


def lr_schedule(train_cfg, updates_per_step: int = 1) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `min_lr` at the last step; counted in
  optimizer updates, `updates_per_step` of them per step (several passes over a batch)."""
  warmup, steps = train_cfg.warmup_steps * updates_per_step, train_cfg.steps * updates_per_step
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.lr, end_value=train_cfg.min_lr,
      warmup_steps=warmup, decay_steps=max(steps, warmup + 1))


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings) only; not on biases and norm scales.
  Scanned blocks' arrays have one more dimension, the leading `layers` one."""
  def is_matrix(path, p):
    stacked = any(getattr(key, "key", None) == layers.SCANNED for key in path)
    return p.ndim - stacked >= 2
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def build(train_cfg, updates_per_step: int = 1) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip) if train_cfg.grad_clip > 0 else
      optax.identity(),
      optax.adamw(lr_schedule(train_cfg, updates_per_step), b1=train_cfg.b1, b2=train_cfg.b2,
                  weight_decay=train_cfg.weight_decay, mask=decay_mask),
  )
