"""The optimizer and learning-rate schedule a run trains with: `train.optimizer`, `train.schedule`.

    optimizer      what it updates                                           its keys (train.*)
    adamw          every parameter                                           lr, b1, b2, eps
    muon           hidden matrices (attention, MLP) by orthogonalised        muon_lr, muon_beta
                   momentum; embeddings, head, norms, biases, adapters by    (+ adamw's)
                   AdamW
    lion           sign of interpolated momentum                             lr, b1, b2
    adafactor      factored second moments (no first moment), update clipping  lr
    sgd            momentum, optionally Nesterov                             lr, momentum, nesterov
    schedule_free  schedule-free AdamW: evaluated at its averaged point      lr, b1, b2, eps

Every optimizer decays matrices only (`decay_mask`) by train.weight_decay, clips the global
gradient norm at train.grad_clip, and keeps its state in train.opt_state_dtype. Its update takes
`apply` (a boolean scalar, default True): False skips the step (a non-finite loss), the state
stays as it was and the updates are zero. Schedules (`lr_schedule`) all warm up linearly over
train.warmup_steps; counted in optimizer updates.
Muon routes each parameter by its logical axis names (`muon_dimensions`), so the same rule holds
for GPT, BERT and Llama blocks, scanned or not, with LoRA adapters and task heads.
"""

import jax
import jax.numpy as jnp
import optax
from optax import contrib
from optax.transforms import MaskedNode

from llm.model import layers

OPTIMIZERS = ("adamw", "muon", "lion", "adafactor", "sgd", "schedule_free")
SCHEDULES = ("cosine", "wsd", "linear", "constant")
DECAY_SHAPES = ("linear", "1-sqrt")
STATE_DTYPES = ("float32", "bfloat16")  # of the optimizer state, and of parameters


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules


def lr_schedule(train_cfg, updates_per_step: int = 1) -> optax.Schedule:
  """Linear warmup from 0 to train.lr, then:

      cosine    cosine decay to train.min_lr at the last step
      linear    linear decay to train.min_lr at the last step
      constant  train.lr to the end (schedule-free's)
      wsd       warmup-stable-decay: train.lr until the last train.decay_fraction of the
                steps, then to train.min_lr, linearly or as 1 - sqrt (train.decay_shape).
                Raising train.steps moves the decay later, so an extended run that resumes
                from a checkpoint of the stable phase stays stable until its new decay.

  Counted in optimizer updates, `updates_per_step` of them per step."""
  tr = train_cfg
  warmup, steps = tr.warmup_steps * updates_per_step, tr.steps * updates_per_step
  peak, end = tr.lr, tr.min_lr
  if tr.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, end_value=end, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1))
  ramp = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if tr.schedule == "constant":
    return optax.join_schedules([ramp, optax.constant_schedule(peak)], [warmup])
  if tr.schedule == "linear":
    return optax.join_schedules(
        [ramp, optax.linear_schedule(peak, end, max(steps - warmup, 1))], [warmup])
  decay_steps = max(round(tr.decay_fraction * steps), 1)
  stable_until = max(steps - decay_steps, warmup)

  def decay(count):
    done = jnp.clip(count / decay_steps, 0.0, 1.0)
    shape = done if tr.decay_shape == "linear" else jnp.sqrt(done)
    return peak + (end - peak) * shape

  return optax.join_schedules([ramp, optax.constant_schedule(peak), decay],
                              [warmup, stable_until])


# ---------------------------------------------------------------------------------------------
# Which parameters are which


HIDDEN = ("heads", "kv", "kv_heads", "mlp")  # the axes a block's matrices map embed to or from


def muon_dimensions(names: tuple):
  """For a parameter with these logical axis names: how Muon sees it as a matrix (the input
  axes it orthogonalises over, the output axes; a scanned stack's `layers` axis is a batch of
  matrices), or None when AdamW updates it. Muon takes the blocks' matrices: an `embed` axis on
  one side and only hidden axes on the other. Embeddings and the LM head (`vocab`), norms and
  biases (one side only), task heads and LoRA adapters (an unnamed axis) go to AdamW."""
  named = [i for i, n in enumerate(names) if n not in ("layers", "expert")]  # a matrix each
  axes = [names[i] for i in named]
  if "embed" not in axes or None in axes or len(axes) < 2:
    return None
  if not all(n in HIDDEN for n in axes if n != "embed") or axes.count("embed") != 1:
    return None
  if axes[0] == "embed":
    return contrib.MuonDimensionNumbers(reduction_axis=(named[0],), output_axis=tuple(named[1:]))
  if axes[-1] == "embed":
    return contrib.MuonDimensionNumbers(reduction_axis=tuple(named[:-1]),
                                        output_axis=(named[-1],))
  return None


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings) only; not on biases and norm scales.
  Scanned blocks' arrays have one more dimension, the leading `layers` one."""
  def is_matrix(path, p):
    stacked = any(getattr(key, "key", None) == layers.SCANNED for key in path)
    return p.ndim - stacked >= 2
  return jax.tree_util.tree_map_with_path(is_matrix, params)


# ---------------------------------------------------------------------------------------------
# Optimizers


def build(train_cfg, boxed_params=None,
          updates_per_step: int = 1) -> optax.GradientTransformationExtraArgs:
  """train.optimizer for parameters shaped and named like `boxed_params` (their logical axis
  names route Muon; any other optimizer needs none)."""
  tr = train_cfg
  schedule = lr_schedule(tr, updates_per_step)
  clip = optax.clip_by_global_norm(tr.grad_clip) if tr.grad_clip > 0 else optax.identity()
  decay = optax.add_decayed_weights(tr.weight_decay, mask=decay_mask)
  if tr.optimizer == "adamw":
    inner = optax.adamw(schedule, b1=tr.b1, b2=tr.b2, eps=tr.eps,
                        weight_decay=tr.weight_decay, mask=decay_mask)
  elif tr.optimizer == "muon":
    dimensions = jax.tree.map(lambda box: muon_dimensions(box.names), boxed_params,
                              is_leaf=lambda x: hasattr(x, "names"))
    is_leaf = lambda x: x is None or isinstance(x, contrib.MuonDimensionNumbers)
    labels = jax.tree.map(lambda d: "adamw" if d is None else "muon", dimensions,
                          is_leaf=is_leaf)
    # Muon sees AdamW's parameters as masked (optax.partition): so do its dimension numbers.
    masked = jax.tree.map(lambda d: MaskedNode() if d is None else d, dimensions,
                          is_leaf=is_leaf)
    muon_lr = lambda count: schedule(count) * (tr.muon_lr / tr.lr)
    muon = optax.chain(
        contrib.scale_by_muon(beta=tr.muon_beta, weight_dimension_numbers=masked),
        _scale_by_width(masked), decay, optax.scale_by_learning_rate(muon_lr))
    adamw = optax.adamw(schedule, b1=tr.b1, b2=tr.b2, eps=tr.eps,
                        weight_decay=tr.weight_decay, mask=decay_mask)
    inner = optax.partition({"muon": muon, "adamw": adamw}, labels)
  elif tr.optimizer == "lion":
    inner = optax.chain(optax.scale_by_lion(b1=tr.b1, b2=tr.b2), decay,
                        optax.scale_by_learning_rate(schedule))
  elif tr.optimizer == "adafactor":
    # Factored second moments with Adafactor's own update clipping; an absolute learning rate
    # (not scaled by each parameter's size), so the schedules mean what they mean elsewhere.
    inner = optax.chain(
        optax.scale_by_factored_rms(decay_rate=0.8), optax.clip_by_block_rms(1.0), decay,
        optax.scale_by_learning_rate(schedule))
  elif tr.optimizer == "sgd":
    inner = optax.chain(decay, optax.trace(decay=tr.momentum, nesterov=tr.nesterov),
                        optax.scale_by_learning_rate(schedule))
  else:  # schedule_free: optax's schedule_free_adamw with decay on matrices only
    inner = contrib.schedule_free(
        optax.chain(optax.scale_by_rms(decay=tr.b2, eps=tr.eps, eps_in_sqrt=False,
                                       bias_correction=True),
                    decay, optax.scale_by_learning_rate(schedule)),
        learning_rate=schedule, b1=tr.b1)
  return in_dtype(skippable(optax.chain(clip, inner)), jnp.dtype(tr.opt_state_dtype))


def skippable(tx) -> optax.GradientTransformationExtraArgs:
  """`tx` whose update takes `apply`: where False, the old state and zero updates. The train
  step knows a bad step from its loss and gradient norm (finite gradients give finite updates),
  so unlike optax.apply_if_finite this keeps no state of its own: checkpoints hold `tx`'s."""
  def update(updates, state, params=None, apply=True):
    new_updates, new_state = tx.update(updates, state, params)
    return (jax.tree.map(lambda u: jnp.where(apply, u, jnp.zeros_like(u)), new_updates),
            jax.tree.map(lambda new, old: jnp.where(apply, new, old), new_state, state))

  return optax.GradientTransformationExtraArgs(tx.init, update)


def _scale_by_width(dimensions) -> optax.GradientTransformation:
  """Muon's orthogonalised update times sqrt(max(1, fan_out / fan_in)), as modded-nanogpt and
  optax's muon scale it."""
  def scale(update, d):
    if isinstance(d, MaskedNode):  # AdamW's
      return update
    fan_in = jnp.prod(jnp.array([update.shape[i] for i in d.reduction_axis]))
    fan_out = jnp.prod(jnp.array([update.shape[i] for i in d.output_axis]))
    return update * jnp.sqrt(jnp.maximum(1.0, fan_out / fan_in))

  def update(updates, state, params=None):
    del params
    is_leaf = lambda x: isinstance(x, (contrib.MuonDimensionNumbers, MaskedNode))
    return jax.tree.map(scale, updates, dimensions, is_leaf=is_leaf), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def in_dtype(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformationExtraArgs:
  """`tx` with its floating-point state stored in `dtype`, whatever the parameters' dtype; each
  update computes in float32. Second moments (optax's `nu`) stay float32: bfloat16's 8-bit
  significand rounds b2·ν back to ν for b2 >= about 0.996 (0.999 is common), which would freeze
  them; so bfloat16 saves AdamW a quarter of its state, the first moment's half."""
  def cast(tree, to):
    def leaf(path, x):
      second_moment = any(getattr(key, "name", None) == "nu" for key in path)
      floating = jnp.issubdtype(x.dtype, jnp.floating)
      return x.astype(jnp.float32 if second_moment else to) if floating else x
    return jax.tree_util.tree_map_with_path(leaf, tree)

  def init(params):
    return cast(tx.init(params), dtype)

  def update(updates, state, params=None, **extra_args):
    updates, state = tx.update(updates, cast(state, jnp.float32), params, **extra_args)
    return updates, cast(state, dtype)

  return optax.GradientTransformationExtraArgs(init, update)


def evaluation_params(train_cfg, params, opt_state):
  """The parameters a run is evaluated, sampled and exported at: schedule-free's averaged
  point (its gradients are taken elsewhere), else the parameters themselves."""
  if train_cfg.optimizer != "schedule_free":
    return params
  is_state = lambda x: isinstance(x, contrib.ScheduleFreeState)
  state = next(s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s))
  return contrib.schedule_free_eval_params(state, params)
