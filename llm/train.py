"""Trains a model from a config file; owns the run directory.

    python -m llm.train --config=configs/gpt_tiny.py --workdir=runs/tiny [--config.train.steps=200]

Running the same command again resumes from the latest checkpoint in --workdir.
"""

import json
import os
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from llm import checkpoint, config as config_lib, data, metrics, objectives, optim, sharding
from llm import model as model_lib
from llm import tokenizer as tokenizer_lib
from llm.errors import UserError, exits_cleanly

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when this module is the entry point."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
  sharding.define_distributed_flags()


class Run:
  """Everything a run is made of, built from the config before anything is written to DIR."""

  def __init__(self, cfg, workdir: str):
    config_lib.validate(cfg)
    self.cfg, self.workdir = cfg, workdir
    self.mesh = sharding.make_mesh(cfg.mesh)
    self.is_main = jax.process_index() == 0

    docs = data.load_documents(cfg.data)
    saved_tokenizer = os.path.join(workdir, "tokenizer")
    if os.path.isdir(saved_tokenizer):  # resuming: the run keeps its own tokenizer
      self.tokenizer = tokenizer_lib.load(saved_tokenizer)
    else:
      with tempfile.TemporaryDirectory() as tmp:
        self.tokenizer = tokenizer_lib.build(
            cfg, data.texts(docs, cfg.data.text_field, cfg.tokenizer.train_chars), tmp)
    tokens = data.token_stream(docs, self.tokenizer, cfg.data.text_field, cfg.data.cache_dir)
    train_tokens, val_tokens = data.split(tokens, cfg.data.val_fraction)
    d, tr = cfg.data, cfg.train
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    self.batches = data.LMBatches(train_tokens, d.max_length, d.stride, tr.batch_size,
                                  tr.grad_accum, cfg.seed, **where)
    self.eval_batches = data.eval_batches(val_tokens, d.max_length,
                                          tr.batch_size // tr.grad_accum, tr.eval_batches,
                                          **where)
    if cfg.model.vocab_size and cfg.model.vocab_size < self.tokenizer.vocab_size:
      raise UserError(f"config: model.vocab_size={cfg.model.vocab_size} is smaller than the "
                      f"tokenizer's {self.tokenizer.vocab_size}; use 0 or a larger size")
    self.model = model_lib.build(cfg.model, self.tokenizer.vocab_size)
    self.objective = objectives.causal_lm(self.model)
    self.tx = optim.build(tr)
    if self.is_main:
      print(f"{len(train_tokens):,} training tokens in {len(self.batches):,} windows, "
            f"{len(self.eval_batches)} evaluation batches; {jax.device_count()} devices as "
            f"mesh {dict(self.mesh.shape)}")

  def init_state(self):
    """The train state, created already sharded: eval_shape -> shardings -> jit(init)."""
    root = jax.random.PRNGKey(self.cfg.seed)
    params_key, dropout_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)

    def boxed_state():
      params = self.model.init({"params": params_key}, jnp.zeros((1, 1), jnp.int32))["params"]
      return {"step": jnp.zeros((), jnp.int32), "params": params,
              "opt_state": self.tx.init(params), "rng": dropout_key}

    with sharding.activate(self.mesh, self.cfg.mesh):
      abstract = jax.eval_shape(boxed_state)
      shardings = sharding.logical_shardings(abstract, self.mesh, self.cfg.mesh)
      state = jax.jit(lambda: nn.meta.unbox(boxed_state()), out_shardings=shardings)()
    return state, shardings

  def jit_train_step(self, state_shardings):
    """The train step, compiled for the state's shardings, with the old state donated."""
    step = make_train_step(self.objective, self.tx, optim.lr_schedule(self.cfg.train))
    return jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(self.mesh)),
                   out_shardings=(state_shardings, None), donate_argnums=0)

  @property
  def tokens_per_step(self) -> int:
    return self.cfg.train.batch_size * self.cfg.data.max_length

  def flops_per_step(self, num_params: int) -> float:
    """Training FLOPs of one optimizer step, for MFU."""
    m, length = self.model.cfg, self.cfg.data.max_length
    non_embedding = num_params - m.max_len * m.d_model  # position embeddings do no matmul
    return metrics.flops_per_token(non_embedding, m.num_layers, m.num_heads, m.head_dim,
                                   length) * self.tokens_per_step


def make_train_step(objective: objectives.Objective, tx: optax.GradientTransformation,
                    schedule: optax.Schedule):
  """One optimizer step over a batch of [grad_accum, micro_batch, ...] arrays."""

  def train_step(state, batch):
    dropout_rng = jax.random.fold_in(state["rng"], state["step"])

    def grads_and_sums(params, micro_batch, rng):
      def loss(p):
        sums = objective.loss(p, micro_batch, rng, True)
        return sums["loss"], sums
      return jax.grad(loss, has_aux=True)(params)

    def micro_step(totals, xs):
      micro_batch, i = xs
      out = grads_and_sums(state["params"], micro_batch, jax.random.fold_in(dropout_rng, i))
      return jax.tree.map(jnp.add, totals, out), None

    num_micro = jax.tree.leaves(batch)[0].shape[0]
    first = jax.tree.map(lambda x: x[0], batch)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                         jax.eval_shape(grads_and_sums, state["params"], first, dropout_rng))
    (grads, sums), _ = jax.lax.scan(micro_step, zeros, (batch, jnp.arange(num_micro)))
    # The objective sums over targets: the mean over all of them is the step's loss.
    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state, "rng": state["rng"]}
    stats = {"loss": sums["loss"] / weight, "grad_norm": optax.tree.norm(grads),
             "lr": schedule(state["step"])}
    return new_state, stats

  return train_step


def train(cfg, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last evaluation's metrics."""
  run = Run(cfg, workdir)
  state, state_shardings = run.init_state()
  tr = cfg.train
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint.Checkpointer(workdir, tr.keep_checkpoints)
  start = ckpt.latest_step() or 0
  if start:
    state, data_state = ckpt.restore(start, checkpoint.abstract_like(state, state_shardings))
    run.batches.restore(data_state)
    if run.is_main:
      _drop_metrics_after(workdir, start)
  if start >= tr.steps:
    print(f"{workdir} is already trained to step {start} (train.steps={tr.steps}); "
          f"raise --config.train.steps to train further")
    ckpt.close()
    return {}

  if run.is_main:  # the run starts: now DIR gets its files
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))
    run.tokenizer.save(os.path.join(workdir, "tokenizer"))
  writer = metrics.MetricsWriter(workdir, enabled=run.is_main)
  num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  tokens_per_step, flops = run.tokens_per_step, run.flops_per_step(num_params)
  peak = metrics.peak_flops(jax.devices()[0].device_kind, tr.peak_flops)
  if run.is_main:
    print(f"{num_params:,} parameters; {tokens_per_step:,} tokens per step; starting at step "
          f"{start}" + ("" if peak else "; MFU needs --config.train.peak_flops on this device"))

  train_step = run.jit_train_step(state_shardings)
  eval_step = jax.jit(lambda params, batch: run.objective.loss(params, batch, None, False),
                      in_shardings=(state_shardings["params"], sharding.batch_sharding(run.mesh, 0)))
  eval_data = [sharding.global_batch(b, run.mesh, batch_dim=0) for b in run.eval_batches]

  def evaluate(step):
    with sharding.activate(run.mesh, cfg.mesh):
      sums = [eval_step(state["params"], b) for b in eval_data]
    totals = jax.tree.map(lambda *xs: float(sum(np.asarray(x) for x in xs)), *sums)
    result = run.objective.summarize(totals)
    writer.write({"step": step, "split": "eval", **result})
    return result

  progress = _progress_bar(run.is_main, start, tr.steps)
  last_eval, timer_step, timer = {}, start, None
  for step in range(start + 1, tr.steps + 1):
    batch = sharding.global_batch(next(run.batches), run.mesh, batch_dim=1)
    with sharding.activate(run.mesh, cfg.mesh):
      state, stats = train_step(state, batch)
    if timer is None:  # the first step compiles: time from its end
      jax.block_until_ready(stats)
      timer, timer_step = time.perf_counter(), step
    if step % tr.log_every == 0 or step == tr.steps:
      stats = jax.device_get(stats)
      elapsed = time.perf_counter() - timer
      steps_timed = step - timer_step
      tokens_per_sec = steps_timed * tokens_per_step / elapsed if steps_timed else None
      mfu = (tokens_per_sec * flops / tokens_per_step / (peak * jax.device_count())
             if tokens_per_sec and peak else None)
      writer.write({"step": step, "split": "train", "loss": float(stats["loss"]),
                    "lr": float(stats["lr"]), "grad_norm": float(stats["grad_norm"]),
                    "tokens_per_sec": tokens_per_sec, "mfu": mfu})
      progress.set_postfix(loss=f"{float(stats['loss']):.3f}",
                           tok_s=f"{tokens_per_sec or 0:,.0f}")
      timer, timer_step = time.perf_counter(), step
      if not np.isfinite(stats["loss"]):
        raise UserError(f"the loss became {stats['loss']} at step {step}; lower train.lr or "
                        f"check the data (the last checkpoint is intact)")
    progress.update(1)
    if step % tr.eval_every == 0 or step == tr.steps:
      last_eval = evaluate(step)
      if run.is_main:
        progress.write(f"step {step}: eval loss {last_eval['loss']:.4f}, "
                       f"perplexity {last_eval['perplexity']:.2f}")
    preempted = ckpt.reached_preemption(step)
    if step % tr.checkpoint_every == 0 or step == tr.steps or preempted:
      ckpt.save(step, state, run.batches.state())
    if preempted:
      break
    if step % tr.eval_every == 0 or step % tr.checkpoint_every == 0:
      timer = None  # throughput counts training steps only
  progress.close()
  ckpt.close()
  writer.close()
  return last_eval


def _progress_bar(enabled: bool, start: int, total: int):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step",
              dynamic_ncols=True)


def _drop_metrics_after(workdir: str, step: int) -> None:
  """A resumed run logs the steps after its checkpoint again: drop their old lines."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return
  with open(path) as f:
    kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)


@exits_cleanly
def main(argv):
  del argv
  if FLAGS.config is None or not FLAGS.workdir:
    raise UserError("usage: python -m llm.train --config=configs/FILE.py --workdir=DIR")
  logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
  sharding.initialize_distributed()
  train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
