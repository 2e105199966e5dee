"""Trains a model from a config file; `train` is the loop, `Trainer` what it is made of.

    python -m llm.train --config=configs/gpt_tiny.py --workdir=runs/gpt_tiny \\
        [--config.train.steps=200]

Running the same command again resumes from the latest checkpoint in --workdir.
"""

import functools
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from ml_collections import config_flags

from llm import checkpoint, cli, config as config_lib, data, metrics, objectives, optim, rundir
from llm import sharding
from llm import model as model_lib
from llm import params as params_lib
from llm import tasks
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


class Trainer:
  """Everything a run is made of, built from its resolved config before anything is written to
  DIR: the mesh, tokenizer, task (model, objective, data), optimizer and compiled steps."""

  def __init__(self, cfg, workdir: str):
    self.workdir = workdir
    self.source = rundir.Source(cfg.init_from) if cfg.init_from else None
    source_values = self.source.values if self.source else None
    config_lib.resolve(cfg, source_values)  # a wrong value stops the run before data is read
    docs = data.load_documents(cfg.data, tasks.fields(cfg))
    self.cfg = cfg = config_lib.resolve(cfg, source_values, tasks.data_labels(cfg, docs))
    self.mesh = sharding.make_mesh(cfg.mesh)
    self.is_main = jax.process_index() == 0

    if rundir.has_tokenizer(workdir):  # resuming: the run keeps its own tokenizer
      self.tokenizer = rundir.read_tokenizer(workdir)
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
    self.trainable = params_lib.is_trainable(cfg, model_lib.shape_of(self.model).num_layers)
    self.assemble = functools.partial(params_lib.assemble, cfg)
    self.tx = optim.build(cfg.train)
    if self.is_main:
      print(f"{self.task.summary}; {jax.device_count()} devices as mesh {dict(self.mesh.shape)}")

  def init_state(self):
    """(train state, frozen parameters), created sharded; their shardings are kept on self.

    The state holds the trainable parameters and their optimizer state; frozen parameters are
    an input of every step, never saved.
    """
    cfg = self.cfg
    params, param_shardings, boxed = params_lib.init(
        cfg, self.model, self.mesh, cfg.mesh, self.source and self.source.params(),
        cfg.init_from)
    trainable, frozen = params_lib.split(params, self.trainable)
    boxed_trainable = params_lib.split(boxed, self.trainable)[0]
    if not jax.tree.leaves(trainable):
      raise UserError(f"train.trainable={cfg.train.trainable!r} leaves nothing to train in this "
                      "model")
    self.frozen_shardings = params_lib.split(param_shardings, self.trainable)[1]
    dropout_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)

    def new_state(params):
      return {"step": jnp.zeros((), jnp.int32), "params": params,
              "opt_state": self.tx.init(params), "rng": dropout_key}

    with sharding.activate(self.mesh, cfg.mesh):
      self.state_shardings = sharding.logical_shardings(
          jax.eval_shape(new_state, boxed_trainable), self.mesh, cfg.mesh)
      state = jax.jit(new_state, out_shardings=self.state_shardings)(trainable)
    self.num_params, self.num_trainable = params_lib.count(params), params_lib.count(trainable)
    return state, frozen

  def jit_train_step(self):
    """The train step, compiled for the state's shardings, with the old state donated."""
    step = make_train_step(self.objective, self.tx, optim.lr_schedule(self.cfg.train),
                           self.assemble)
    return jax.jit(step, in_shardings=(self.state_shardings, self.frozen_shardings,
                                       sharding.batch_sharding(self.mesh)),
                   out_shardings=(self.state_shardings, None), donate_argnums=0)

  def jit_evaluate(self):
    """(params, frozen, batches) -> the objective's metrics on them."""
    return objectives.evaluator(self.objective, self.assemble, in_shardings=(
        self.state_shardings["params"], self.frozen_shardings,
        sharding.batch_sharding(self.mesh, 0)))

  @property
  def tokens_per_step(self) -> int:
    example = self.batches.take(np.zeros(1, int), np.zeros(1, int))
    length = max(x.shape[1] if x.ndim > 1 else 1 for x in example.values())
    return self.cfg.train.batch_size * length

  def throughput(self) -> metrics.Throughput:
    """Tokens/s and MFU of timed steps (after init_state, which counts the parameters)."""
    m = model_lib.shape_of(self.model)
    length = self.tokens_per_step // self.cfg.train.batch_size
    non_embedding = self.num_params - m.max_len * m.d_model  # position embeddings do no matmul
    flops = metrics.flops_per_token(non_embedding, m.num_layers, m.num_heads, m.head_dim,
                                    length) * self.tokens_per_step
    peak = metrics.peak_flops(jax.devices()[0].device_kind, self.cfg.train.peak_flops)
    return metrics.Throughput(self.tokens_per_step, flops, peak, jax.device_count())


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
  trainer = Trainer(cfg, workdir)
  cfg, tr, mesh = trainer.cfg, trainer.cfg.train, trainer.mesh
  state, frozen = trainer.init_state()
  ckpt = rundir.checkpointer(workdir, tr.keep_checkpoints)
  start = ckpt.latest_step() or 0
  if start:
    state, data_state = ckpt.restore(start, checkpoint.abstract_like(state,
                                                                     trainer.state_shardings))
    trainer.batches.restore(data_state)
  if start >= tr.steps:
    print(f"{workdir} is already trained to step {start} (train.steps={tr.steps}); "
          f"raise --config.train.steps to train further")
    ckpt.close()
    return {}
  if trainer.is_main:  # the run starts: now DIR gets its files
    rundir.start(workdir, cfg, trainer.tokenizer)
    rundir.drop_metrics_after(workdir, start)
  log = Log(trainer, start)
  train_step, evaluate = trainer.jit_train_step(), trainer.jit_evaluate()
  eval_data = {split: [sharding.global_batch(b, mesh, batch_dim=0) for b in batches]
               for split, batches in trainer.task.evals.items()}
  last_eval = {}
  for step in range(start + 1, tr.steps + 1):
    batch = sharding.global_batch(next(trainer.batches), mesh, batch_dim=1)
    with sharding.activate(mesh, cfg.mesh):
      state, stats = train_step(state, frozen, batch)
      log.trained(step, stats)
      if (step % tr.eval_every == 0 or step == tr.steps) and "eval" in eval_data:
        last_eval = log.evaluated(step, "eval", evaluate(state["params"], frozen,
                                                         eval_data["eval"]))
      if step == tr.steps and "test" in eval_data:
        log.evaluated(step, "test", evaluate(state["params"], frozen, eval_data["test"]))
    preempted = ckpt.reached_preemption(step)
    if step % tr.checkpoint_every == 0 or step == tr.steps or preempted:
      log.phase("saving")
      ckpt.save(step, state, trainer.batches.state())
    if preempted:
      break
    log.phase("train")
  log.close()
  ckpt.close()
  return last_eval


class Log:
  """What a run shows and records as it trains: train and eval lines in metrics.jsonl (and
  TensorBoard), the progress bar, and the throughput of the training steps between lines."""

  def __init__(self, trainer: Trainer, start: int):
    from tqdm import tqdm
    self.objective, self.train_cfg = trainer.objective, trainer.cfg.train
    self.is_main = trainer.is_main
    self.writer = metrics.MetricsWriter(rundir.path(trainer.workdir, rundir.METRICS),
                                        enabled=self.is_main)
    self.throughput = trainer.throughput()
    self.bar = tqdm(total=self.train_cfg.steps, initial=start, disable=not self.is_main,
                    desc="train", unit="step", dynamic_ncols=True)
    self.timer, self.timer_step = None, start
    if self.is_main:
      frozen = trainer.num_params - trainer.num_trainable
      print((f"{trainer.num_trainable:,} of {trainer.num_params:,} parameters train" if frozen
             else f"{trainer.num_params:,} parameters")
            + f"; {trainer.tokens_per_step:,} tokens per step; starting at step {start}"
            + ("" if self.throughput.peak_flops else
               "; MFU needs --config.train.peak_flops on this device"))

  def trained(self, step: int, stats: dict) -> None:
    """After each step: a train line every train.log_every steps and at the last."""
    if self.timer is None:  # the first step compiles (and one after an eval): time from its end
      jax.block_until_ready(stats)
      self.timer, self.timer_step = time.perf_counter(), step
    if step % self.train_cfg.log_every == 0 or step == self.train_cfg.steps:
      stats = jax.device_get(stats)
      speed = self.throughput(step - self.timer_step, time.perf_counter() - self.timer)
      task_metrics = {k: v for k, v in self.objective.summarize(stats["sums"]).items()
                      if isinstance(v, float) and k not in ("loss", "perplexity")}
      loss = float(stats["loss"])
      self.writer.write({"step": step, "split": "train", "loss": loss, "lr": float(stats["lr"]),
                         "grad_norm": float(stats["grad_norm"]), **speed, **task_metrics})
      tokens_per_sec = speed["tokens_per_sec"]
      self.bar.set_postfix_str(headline({"loss": loss, **task_metrics})
                               + (f", {tokens_per_sec:,.0f} tok/s" if tokens_per_sec else ""))
      self.timer, self.timer_step = time.perf_counter(), step
      if not np.isfinite(loss):
        raise UserError(f"the loss became {loss} at step {step}; lower train.lr or check the "
                        "data (the last checkpoint is intact)")
    self.bar.update(1)

  def evaluated(self, step: int, split: str, result: dict) -> dict:
    self.phase("evaluating")
    self.writer.write({"step": step, "split": split, **result})
    if self.is_main:
      self.bar.write(f"step {step}: {split} {headline(result)}")
    return result

  def phase(self, name: str) -> None:
    """Says on the bar what the run does now ("evaluating", "saving", "train")."""
    self.bar.set_description(name)
    if name != "train":
      self.timer = None  # throughput counts training steps only

  def close(self) -> None:
    self.bar.close()
    self.writer.close()


def headline(result: dict) -> str:
  """The loss, perplexity and every accuracy (classes; BERT's masked tokens and next sentence)."""
  keys = [k for k in ("loss", "perplexity") if k in result]
  keys += [k for k in result if k.endswith("accuracy")]
  return ", ".join(f"{k} {result[k]:.4f}" for k in keys)


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
