"""Trains a model from a config file; owns the run directory.

    python -m llm.train --config=configs/gpt_tiny.py --workdir=runs/tiny [--config.train.steps=200]

Running the same command again resumes from the latest checkpoint in --workdir.
"""

import functools
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from ml_collections import config_flags

from llm import cli, checkpoint, config as config_lib, data, finetune, metrics, objectives, optim
from llm import sharding, tasks
from llm import model as model_lib
from llm import tokenizer as tokenizer_lib
from llm.errors import UserError

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when this module is the entry point."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
  flags.DEFINE_bool("print_config", False, "Print every config key with its value and meaning, "
                    "then exit.")
  sharding.define_distributed_flags()


class Run:
  """Everything a run is made of, built from the config before anything is written to DIR."""

  def __init__(self, cfg, workdir: str):
    self.cfg, self.workdir = cfg, workdir
    self.source = finetune.Source(cfg.init_from) if cfg.init_from else None
    if self.source:  # the architecture and tokenizer are the source's; dropout is the run's
      cfg.model.update({k: v for k, v in self.source.model_values.items() if k != "dropout"})
      cfg.tokenizer.kind = self.source.tokenizer.kind
      cfg.tokenizer.lowercase = getattr(self.source.tokenizer, "lowercase", cfg.tokenizer.lowercase)
    if cfg.data.max_length == 0:
      cfg.data.max_length = cfg.model.max_len
    config_lib.validate(cfg)
    self.mesh = sharding.make_mesh(cfg.mesh)
    self.is_main = jax.process_index() == 0

    docs = data.load_documents(cfg.data, tasks.fields(cfg))
    saved_tokenizer = os.path.join(workdir, "tokenizer")
    if os.path.isdir(saved_tokenizer):  # resuming: the run keeps its own tokenizer
      self.tokenizer = tokenizer_lib.load(saved_tokenizer)
    elif self.source:
      self.tokenizer = self.source.tokenizer
    else:
      with tempfile.TemporaryDirectory() as tmp:
        self.tokenizer = tokenizer_lib.build(cfg, tasks.texts(cfg, docs), tmp)
    if cfg.model.vocab_size and cfg.model.vocab_size < self.tokenizer.vocab_size:
      raise UserError(f"config: model.vocab_size={cfg.model.vocab_size} is smaller than the "
                      f"tokenizer's {self.tokenizer.vocab_size}; use 0 or a larger size")
    self.task = tasks.build(cfg, docs, self.tokenizer, process_index=jax.process_index(),
                            process_count=jax.process_count())
    self.model, self.objective = self.task.model, self.task.objective
    self.batches = self.task.batches
    self.trainable = finetune.is_trainable(cfg, model_lib.shape_of(self.model).num_layers)
    self.tx = optim.build(cfg.train)
    if self.is_main:
      print(f"{self.task.summary}; {jax.device_count()} devices as mesh {dict(self.mesh.shape)}")

  def init_state(self):
    """(train state, its shardings, frozen parameters, their shardings), created sharded.

    The state holds the trainable parameters and their optimizer state; frozen parameters are
    an input of every step, never saved.
    """
    cfg = self.cfg
    params, param_shardings, boxed = finetune.init_params(cfg, self.model, self.mesh, cfg.mesh,
                                                          self.source)
    trainable, frozen = finetune.split(params, self.trainable)
    boxed_trainable = finetune.split(boxed, self.trainable)[0]
    if not jax.tree.leaves(trainable):
      raise UserError(f"train.trainable={cfg.train.trainable!r} leaves nothing to train in this "
                      "model")
    frozen_shardings = finetune.split(param_shardings, self.trainable)[1]
    dropout_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)

    def new_state(params):
      return {"step": jnp.zeros((), jnp.int32), "params": params,
              "opt_state": self.tx.init(params), "rng": dropout_key}

    with sharding.activate(self.mesh, cfg.mesh):
      shardings = sharding.logical_shardings(jax.eval_shape(new_state, boxed_trainable),
                                             self.mesh, cfg.mesh)
      state = jax.jit(new_state, out_shardings=shardings)(trainable)
    return state, shardings, frozen, frozen_shardings

  def jit_train_step(self, state_shardings, frozen_shardings):
    """The train step, compiled for the state's shardings, with the old state donated."""
    step = make_train_step(self.objective, self.tx, optim.lr_schedule(self.cfg.train),
                           functools.partial(finetune.assemble, self.cfg))
    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings,
                                       sharding.batch_sharding(self.mesh)),
                   out_shardings=(state_shardings, None), donate_argnums=0)

  @property
  def tokens_per_step(self) -> int:
    example = self.batches.take(np.zeros(1, int), np.zeros(1, int))
    length = max(x.shape[1] if x.ndim > 1 else 1 for x in example.values())
    return self.cfg.train.batch_size * length

  def flops_per_step(self, num_params: int) -> float:
    """Training FLOPs of one optimizer step, for MFU."""
    m = model_lib.shape_of(self.model)
    length = self.tokens_per_step // self.cfg.train.batch_size
    non_embedding = num_params - m.max_len * m.d_model  # position embeddings do no matmul
    return metrics.flops_per_token(non_embedding, m.num_layers, m.num_heads, m.head_dim,
                                   length) * self.tokens_per_step


def make_train_step(objective: objectives.Objective, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, assemble=lambda trainable, frozen: trainable):
  """One optimizer step over a batch of [grad_accum, micro_batch, ...] arrays.

  Gradients flow to the state's (trainable) parameters only; `assemble(trainable, frozen)`
  makes the model's parameters from both.
  """

  def train_step(state, frozen, batch):
    dropout_rng = jax.random.fold_in(state["rng"], state["step"])
    # Each loss term is divided by its weight over the whole step (every micro-batch): the
    # micro-batches' gradients then add up to exactly the gradient of the step's mean loss.
    counts = objective.counts(batch)

    def grads_and_sums(params, micro_batch, rng):
      def loss(p):
        sums = objective.loss(assemble(p, frozen), micro_batch, rng, True)
        return objective.total(sums, counts), sums
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
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state, "rng": state["rng"]}
    stats = {"loss": objective.total(sums, counts), "grad_norm": optax.tree.norm(grads),
             "lr": schedule(state["step"]), "sums": sums}
    return new_state, stats

  return train_step


def train(cfg, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last evaluation's metrics."""
  run = Run(cfg, workdir)
  state, state_shardings, frozen, frozen_shardings = run.init_state()
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
  num_trainable, num_frozen = finetune.count(state["params"]), finetune.count(frozen)
  num_params = num_trainable + num_frozen
  tokens_per_step, flops = run.tokens_per_step, run.flops_per_step(num_params)
  peak = metrics.peak_flops(jax.devices()[0].device_kind, tr.peak_flops)
  if run.is_main:
    trained = (f"{num_trainable:,} of {num_params:,} parameters train"
               if num_frozen else f"{num_params:,} parameters")
    print(f"{trained}; {tokens_per_step:,} tokens per step; starting at step {start}"
          + ("" if peak else "; MFU needs --config.train.peak_flops on this device"))

  train_step = run.jit_train_step(state_shardings, frozen_shardings)
  assemble = functools.partial(finetune.assemble, cfg)
  eval_step = jax.jit(
      lambda params, frozen, batch: run.objective.loss(assemble(params, frozen), batch, None,
                                                       False),
      in_shardings=(state_shardings["params"], frozen_shardings,
                    sharding.batch_sharding(run.mesh, 0)))
  eval_data = {split: [sharding.global_batch(b, run.mesh, batch_dim=0) for b in batches]
               for split, batches in run.task.evals.items()}

  def evaluate(step, split="eval"):
    with sharding.activate(run.mesh, cfg.mesh):
      sums = [eval_step(state["params"], frozen, b) for b in eval_data[split]]
    result = run.objective.summarize(objectives.add_sums(sums))
    writer.write({"step": step, "split": split, **result})
    return result

  progress = _progress_bar(run.is_main, start, tr.steps)
  last_eval, timer_step, timer = {}, start, None
  for step in range(start + 1, tr.steps + 1):
    batch = sharding.global_batch(next(run.batches), run.mesh, batch_dim=1)
    with sharding.activate(run.mesh, cfg.mesh):
      state, stats = train_step(state, frozen, batch)
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
      task_metrics = {k: v for k, v in run.objective.summarize(stats["sums"]).items()
                      if isinstance(v, float) and k not in ("loss", "perplexity")}
      writer.write({"step": step, "split": "train", "loss": float(stats["loss"]),
                    "lr": float(stats["lr"]), "grad_norm": float(stats["grad_norm"]),
                    "tokens_per_sec": tokens_per_sec, "mfu": mfu, **task_metrics})
      progress.set_postfix_str(_headline({"loss": float(stats["loss"]), **task_metrics})
                               + (f", {tokens_per_sec:,.0f} tok/s" if tokens_per_sec else ""))
      timer, timer_step = time.perf_counter(), step
      if not np.isfinite(stats["loss"]):
        raise UserError(f"the loss became {stats['loss']} at step {step}; lower train.lr or "
                        f"check the data (the last checkpoint is intact)")
    progress.update(1)
    if (step % tr.eval_every == 0 or step == tr.steps) and "eval" in eval_data:
      progress.set_description("evaluating")
      last_eval = evaluate(step)
      if run.is_main:
        progress.write(f"step {step}: eval {_headline(last_eval)}")
    if step == tr.steps and "test" in eval_data:
      progress.set_description("testing")
      test = evaluate(step, "test")
      if run.is_main:
        progress.write(f"step {step}: test {_headline(test)}")
    preempted = ckpt.reached_preemption(step)
    if step % tr.checkpoint_every == 0 or step == tr.steps or preempted:
      progress.set_description("saving")
      ckpt.save(step, state, run.batches.state())
    progress.set_description("train")
    if preempted:
      break
    if step % tr.eval_every == 0 or step % tr.checkpoint_every == 0:
      timer = None  # throughput counts training steps only
  progress.close()
  ckpt.close()
  writer.close()
  return last_eval


def _headline(result: dict) -> str:
  """The loss, perplexity and every accuracy (classes; BERT's masked tokens and next sentence)."""
  keys = [k for k in ("loss", "perplexity") if k in result]
  keys += [k for k in result if k.endswith("accuracy")]
  return ", ".join(f"{k} {result[k]:.4f}" for k in keys)


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


def main(argv):
  del argv
  if FLAGS.config is not None and FLAGS.print_config:
    print(config_lib.describe(FLAGS.config))
    return
  if FLAGS.config is None or not FLAGS.workdir:
    raise UserError("usage: python -m llm.train --config=configs/FILE.py --workdir=DIR")
  sharding.initialize_distributed()
  train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main, define_flags)
