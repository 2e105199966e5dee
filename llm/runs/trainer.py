"""The train loop (`train`) and what it is made of (`Trainer`): `python -m llm.train` runs it.

A run started on a DIR that has checkpoints resumes from the latest one.
"""

import contextlib
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm import model as model_lib
from llm.data import batches as data_batches
from llm.errors import UserError
from llm.evals import benchmarks, loglikelihood
from llm.model import moe
from llm.runs import rundir, startup
from llm.training import checkpoint, metrics, objectives, optim, preemption, sharding
from llm.training import params as params_lib


class Trainer:
  """Everything a run is made of, built from its resolved config before anything is written to
  DIR: the mesh, tokenizer, task (model, objective, data), optimizer and compiled steps."""

  def __init__(self, cfg, workdir: str, devices=None):
    """`devices`: the mesh's (default: all); a TPU topology's to compile ahead of time."""
    self.workdir = workdir
    # A wrong value stops the run before data is read.
    setup = startup.setup(cfg, workdir, len(devices) if devices is not None else 0)
    self.cfg = cfg = setup.cfg
    self.task, self.tokenizer = setup.task, setup.tokenizer
    self.mesh = sharding.make_mesh(cfg.mesh, devices)
    self.is_main = jax.process_index() == 0
    self.model = self.task.build_model(self.tokenizer.vocab_size)
    self.objective = self.task.objective(self.model)
    self.context = startup.context(setup, self.mesh, workdir)
    self.data = self.task.data(setup.docs, self.model, self.context)
    self.batches, self.schema = self.data.batches, self.data.schema
    self.trainable = params_lib.is_trainable(cfg, model_lib.shape_of(self.model).num_layers)
    self.assemble = functools.partial(params_lib.assemble, cfg)
    # The parameters' shapes and logical axis names (Muon routes by them), nothing computed:
    # the optimizer, the state's shardings and the counts are known before any array exists.
    shapes, shardings = params_lib.abstract(cfg, self.model, self.mesh, cfg.mesh)
    self.boxed_trainable, boxed_frozen = params_lib.split(shapes, self.trainable)
    if not jax.tree.leaves(self.boxed_trainable):
      raise UserError(f"train.trainable={cfg.train.trainable!r} leaves nothing to train in this "
                      "model")
    self.frozen_shapes = params_lib.values(boxed_frozen)
    self.frozen_shardings = params_lib.split(shardings, self.trainable)[1]
    self.tx = optim.build(cfg.train, self.boxed_trainable, self.data.updates_per_batch)
    with sharding.activate(self.mesh, cfg.mesh):
      self.state_shardings = sharding.logical_shardings(
          jax.eval_shape(self.new_state, self.boxed_trainable), self.mesh, cfg.mesh)
    self.num_params = params_lib.count(params_lib.values(shapes))
    self.num_trainable = params_lib.count(params_lib.values(self.boxed_trainable))
    # What a token computes with: a mixture of experts leaves out the experts not chosen.
    self.num_active_params = self.num_params - moe.inactive_params(
        model_lib.shape_of(self.model))
    self.benchmarks = self.load_benchmarks()
    if self.is_main:
      print(f"{self.data.summary}; {jax.device_count()} devices as mesh {dict(self.mesh.shape)}")

  def load_benchmarks(self) -> dict:
    """train.evals' benchmarks: name -> its first train.eval_examples examples."""
    tr = self.cfg.train
    specs = [s.strip() for s in tr.evals.split(",") if s.strip()]
    if specs and (self.task.produces != "text"
                  or not model_lib.family(self.cfg.model.kind).causal):
      raise UserError(f"train.evals scores language models; task.kind={self.cfg.task.kind} "
                      f"with model.kind={self.cfg.model.kind} is not one")
    return dict(benchmarks.load(spec, tr.benchmark_dir, tr.eval_examples) for spec in specs)

  def init_state(self):
    """(train state, frozen parameters), created sharded.

    The state holds the trainable parameters and their optimizer state; frozen parameters are
    an input of every step, never saved.
    """
    params = self.context.start.init(self.model)[0]
    trainable, frozen = params_lib.split(params, self.trainable)
    with sharding.activate(self.mesh, self.cfg.mesh):
      state = jax.jit(self.new_state, out_shardings=self.state_shardings)(trainable)
    return state, frozen

  def new_state(self, params) -> dict:
    """The train state of a run starting at `params`: the step, the parameters, their optimizer
    state, the dropout key, and with train.ema their moving average (sharded like them)."""
    dropout_key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), 1)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": self.tx.init(params), "rng": dropout_key}
    if self.cfg.train.ema:  # in float32 whatever the parameters' dtype: small steps add up
      state["ema"] = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return state

  def evaluation_params(self, state) -> dict:
    """What a run is evaluated at while it trains: the parameters (schedule-free: its averaged
    point)."""
    return optim.evaluation_params(self.cfg.train, state["params"], state["opt_state"])

  def abstract_state(self):
    """(train state, frozen parameters) as shapes and dtypes with their shardings, nothing
    computed: what the train step compiles for ahead of time (llm.bench --topology)."""
    with sharding.activate(self.mesh, self.cfg.mesh):
      state = jax.eval_shape(self.new_state, params_lib.values(self.boxed_trainable))
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return (jax.tree.map(with_sharding, state, self.state_shardings),
            jax.tree.map(with_sharding, self.frozen_shapes, self.frozen_shardings))

  def jit_train_step(self):
    """The train step, compiled for the state's shardings, with the old state donated."""
    tr = self.cfg.train
    schedule = optim.lr_schedule(tr, self.data.updates_per_batch)
    step = make_train_step(self.objective, self.tx, schedule, self.assemble,
                           max_nonfinite=tr.max_nonfinite if tr.on_nonfinite == "skip" else 1,
                           ema=tr.ema, router_bias_rate=self.cfg.model.moe.bias_update_rate)
    return jax.jit(step, in_shardings=(self.state_shardings, self.frozen_shardings,
                                       sharding.batch_sharding(self.mesh), None),
                   out_shardings=(self.state_shardings, None, None), donate_argnums=0)

  def place(self, batch: dict):
    """A batch of this process's rows [grad_accum, micro, ...] as global arrays on the mesh,
    checked against the task's schema."""
    self.schema.check(batch, batch_axes=2)
    return sharding.global_batch(batch, self.mesh, batch_dim=1)

  def jit_evaluate(self):
    """(params, frozen, batches) -> the objective's metrics on them."""
    return objectives.evaluator(self.objective, self.assemble, in_shardings=(
        self.state_shardings["params"], self.frozen_shardings,
        sharding.batch_sharding(self.mesh, 0)))

  def evaluators(self) -> dict:
    """split -> (params, frozen) -> its metrics: the objective on the split's fixed batches,
    or the task's own evaluation (an online task samples); and each of train.evals'
    benchmarks."""
    evaluators = self.benchmark_evaluators()
    if self.data.evaluate is not None:
      return {"eval": self.data.evaluate, **evaluators}
    evaluate = self.jit_evaluate()
    placed = {split: [sharding.global_batch(b, self.mesh, batch_dim=0) for b in batches]
              for split, batches in self.data.evals.items()}
    return {**{split: lambda params, frozen, b=b: evaluate(params, frozen, b)
               for split, b in placed.items()}, **evaluators}

  def benchmark_evaluators(self) -> dict:
    """benchmark -> (params, frozen) -> its metrics, for train.evals: the requests encoded
    once; the scoring programs compiled at the first evaluation, reused by the others."""
    if not self.benchmarks:
      return {}
    scorer = loglikelihood.LogLikelihood(self.model, self.tokenizer, self.mesh, self.cfg.mesh)
    assemble = jax.jit(self.assemble)

    def evaluator(name, examples):
      requests = benchmarks.requests(scorer, examples)
      return lambda params, frozen: benchmarks.metrics(
          name, examples, requests, scorer(assemble(params, frozen), requests), scorer.max_len)

    return {name: evaluator(name, examples) for name, examples in self.benchmarks.items()}

  @property
  def tokens_per_step(self) -> int:
    return self.cfg.train.batch_size * self.schema.tokens

  def throughput(self) -> metrics.Throughput:
    """Tokens/s and MFU of timed steps."""
    m = model_lib.shape_of(self.model)
    non_embedding = self.num_active_params - (  # learned position embeddings do no matmul
        m.max_len * m.d_model if m.positions == "learned" else 0)
    flops = metrics.flops_per_token(non_embedding, m.num_layers, m.num_heads, m.head_dim,
                                    self.schema.length) * self.tokens_per_step
    peak = metrics.peak_flops(jax.devices()[0].device_kind, self.cfg.train.peak_flops)
    return metrics.Throughput(self.tokens_per_step, flops, peak, jax.device_count())


def make_train_step(objective: objectives.Objective, tx: optax.GradientTransformationExtraArgs,
                    schedule: optax.Schedule, assemble=lambda trainable, frozen: trainable,
                    max_nonfinite: int = 1, ema: float = 0.0, router_bias_rate: float = 0.0):
  """One optimizer step over a batch of [grad_accum, micro_batch, ...] arrays.

  A mixture of experts adds its router losses (balance, z) to the objective's, returns its
  router statistics in stats["router"] (summed over micro-batches), and with
  `router_bias_rate` (model.moe.bias_update_rate) moves its router biases towards balance.

  With `ema` (train.ema, a decay in (0, 1)) the state's "ema" follows the parameters:
  ema <- ema * decay + params * (1 - decay) after each applied step.

  Gradients flow to the state's (trainable) parameters only; `assemble(trainable, frozen)`
  makes the model's parameters from both.

  `health` counts steps whose loss or gradient norm was not finite: such a step is never
  applied (the parameters and optimizer state stay as they were). After `max_nonfinite` of them
  in a row `health["stopped_at"]` names the step, and no step is applied any more; the host
  reads it when it logs or saves, so a run that diverged never saves a non-finite state.
  """

  def train_step(state, frozen, batch, health):
    dropout_rng = jax.random.fold_in(state["rng"], state["step"])
    # Each loss term is divided by its weight over the whole step (every micro-batch): the
    # micro-batches' gradients then add up to exactly the gradient of the step's mean loss.
    counts = objective.counts(batch)

    def grads_and_sums(params, micro_batch, rng):
      def loss(p):
        with moe.recorded() as records:  # a mixture of experts' router statistics
          sums = objective.loss(assemble(p, frozen), micro_batch, rng, True)
        router = moe.collected(records)
        # Each micro-batch's router losses weigh 1 / num_micro: the step's mean.
        aux = 0.0 if router is None else moe.aux_loss(router) / num_micro
        return objective.total(sums, counts) + aux, (sums, router)
      return jax.grad(loss, has_aux=True)(params)

    def micro_step(totals, xs):
      micro_batch, i = xs
      out = grads_and_sums(state["params"], micro_batch, jax.random.fold_in(dropout_rng, i))
      return jax.tree.map(jnp.add, totals, out), None

    num_micro = jax.tree.leaves(batch)[0].shape[0]
    first = jax.tree.map(lambda x: x[0], batch)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                         jax.eval_shape(grads_and_sums, state["params"], first, dropout_rng))
    (grads, (sums, router)), _ = jax.lax.scan(micro_step, zeros, (batch, jnp.arange(num_micro)))
    loss, grad_norm = objective.total(sums, counts), optax.tree.norm(grads)
    # Finite gradients give every optimizer here finite updates (its state is finite: a bad
    # step is never applied), so a step is known good or bad before the optimizer runs, and the
    # optimizer skips a bad one in its update (optim.skippable).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    going = health["stopped_at"] == 0
    apply = finite & going
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"], apply=apply)
    params = jax.tree.map(lambda p, u: jnp.where(apply, (p + u).astype(p.dtype), p),
                          state["params"], updates)
    if router is not None and router_bias_rate:  # outside the optimizer (moe.py)
      params = jax.tree.map(lambda new, old: jnp.where(apply, new, old),
                            moe.update_router_bias(params, router, router_bias_rate), params)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "rng": state["rng"]}
    if ema:
      new_state["ema"] = jax.tree.map(lambda e, p: e * ema + p.astype(e.dtype) * (1 - ema),
                                      state["ema"], new_state["params"])
    in_a_row = jnp.where(finite, 0, health["in_a_row"] + 1)
    health = {"skipped": health["skipped"] + (going & ~finite),
              "in_a_row": in_a_row,
              "stopped_at": jnp.where(going & (in_a_row >= max_nonfinite), state["step"] + 1,
                                      health["stopped_at"])}
    stats = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "sums": sums,
             "router": router}
    return new_state, stats, health

  return train_step


def new_health(skipped: int = 0) -> dict:
  """The non-finite step counters `train_step` carries (see make_train_step)."""
  return {"skipped": jnp.int32(skipped), "in_a_row": jnp.int32(0), "stopped_at": jnp.int32(0)}


def train(cfg, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last evaluation's metrics.

  Raises Preempted after saving when SIGTERM or Ctrl-C asked the run to stop.
  """
  trainer = Trainer(cfg, workdir)
  with rundir.lock(workdir) if trainer.is_main else contextlib.nullcontext():
    ckpt = rundir.checkpointer(workdir, trainer.cfg.train.keep_checkpoints, trains=True)
    try:
      return _train(trainer, ckpt)
    finally:
      ckpt.close()  # waits for the last save


def _train(trainer: Trainer, ckpt) -> dict:
  cfg, tr, mesh, workdir = trainer.cfg, trainer.cfg.train, trainer.mesh, trainer.workdir
  state, frozen = trainer.init_state()
  start, health = 0, new_health()
  if ckpt.latest_step():
    start, state, data_state = ckpt.restore(
        checkpoint.abstract_like(state, trainer.state_shardings))
    trainer.batches.restore(data_state)
    health = new_health(data_state.get("skipped", 0))
  evaluate = trainer.evaluators()

  def due(step) -> list[str]:
    """The evaluations of `step`: "eval" and any benchmarks every train.eval_every steps and at
    the last, and "test" at the last."""
    if step % tr.eval_every and step != tr.steps:
      return []
    return [split for split in evaluate if split != "test" or step == tr.steps]

  # A step is saved before it is evaluated, so that a failed evaluation loses no training: the
  # evaluations of the step resumed from that did not finish (no line in metrics.jsonl) run now.
  missed = unlogged(workdir, start, due(start)) if start else []
  if start >= tr.steps and not missed:
    print(f"{workdir} is already trained to step {start} (train.steps={tr.steps}); "
          f"raise --config.train.steps to train further")
    return {}
  if trainer.is_main:  # the run starts: now DIR gets its files
    rundir.start(workdir, cfg, trainer.tokenizer)
    rundir.drop_metrics_after(workdir, start)
  log = Log(trainer, start, ckpt)
  train_step = trainer.jit_train_step()
  last_eval, sampled = {}, {}

  def evaluated(step, splits) -> dict:
    """The "eval" split's metrics after evaluating `splits` at `step` (the last ones if not)."""
    if not splits:
      return last_eval
    with sharding.activate(mesh, cfg.mesh):
      params = trainer.evaluation_params(state)
      results = {split: log.evaluated(step, split, evaluate[split](params, frozen))
                 for split in splits}
    return results.get("eval", last_eval)

  batches = data_batches.Prefetch(trainer.batches, trainer.place)
  profiler = metrics.StepProfiler(tr.profile_steps, rundir.path(workdir, rundir.PROFILE))
  done, data_state = start, None  # the last step finished, and the data's state after it
  try:
    if start == 0 and tr.eval_at_start:
      evaluated(0, [split for split in evaluate if split != "test"])
    last_eval = evaluated(start, missed)
    with preemption.Watcher(ckpt, start) as watcher:  # a signal from here on: save the step, stop
      for step in range(start + 1, tr.steps + 1):
        batch = next(batches)
        if trainer.data.rollout is not None:  # sampled from the policy being trained
          batch, sampled = trainer.data.rollout(state["params"], frozen, batch, step)
        profiler.before(step)
        with sharding.activate(mesh, cfg.mesh):
          for _ in range(trainer.data.updates_per_batch):  # the last pass's stats are logged
            state, stats, health = train_step(state, frozen, batch, health)
          profiler.after(step, stats)
          log.trained(step, stats, health, sampled)
        done, data_state = step, batches.state()
        preempted = watcher.requested(step)
        if step % tr.checkpoint_every == 0 or step == tr.steps or preempted or due(step):
          log.phase("saving")
          skipped = log.check(step, health)  # never save a run that diverged
          ckpt.save(step, state, {**data_state, "skipped": skipped})
        if preempted:  # the step's evaluations run when the run resumes
          raise preemption.Preempted(f"preempted at step {step}, saved; run the same command to "
                                     "resume")
        last_eval = evaluated(step, due(step))
        log.phase("train")
  except preemption.Preempted:
    raise
  except Exception:
    _save_before_failing(log, ckpt, done, data_state, state, health)
    raise
  finally:
    profiler.stop()
    batches.close()
    log.close()
  return last_eval


def _save_before_failing(log, ckpt, step: int, data_state, state, health) -> None:
  """An error after `step` finished (a reward function or an evaluation raising, a batch that
  cannot be read): that step is saved first, unless it is, or the run diverged. On one process
  only: an error on one of several would leave the others waiting in the collective save."""
  if data_state is None or jax.process_count() > 1 or ckpt.latest_step() == step:
    return
  try:
    skipped = log.check(step, health)  # never save a run that diverged
    ckpt.save(step, state, {**data_state, "skipped": skipped})  # train() closes it: waits
  except Exception:  # the state itself may be gone (a step that ran out of memory)
    return
  print(f"saved step {step} before stopping on the error below; run the same command to resume "
        "once it is fixed")


def unlogged(workdir: str, step: int, splits: list[str]) -> list[str]:
  """Of `splits`, those the run being resumed has no line of at `step`, as the main process
  reads its metrics.jsonl (the processes must agree: an evaluation is collective)."""
  metrics_file = rundir.path(workdir, rundir.METRICS)
  logged = ({m.get("split") for m in metrics.read(metrics_file) if m.get("step") == step}
            if jax.process_index() == 0 and os.path.exists(metrics_file) else set())
  missing = np.array([split not in logged for split in splits])
  if jax.process_count() > 1 and splits:
    from jax.experimental import multihost_utils
    missing = multihost_utils.broadcast_one_to_all(missing)
  return [split for split, flag in zip(splits, missing) if flag]


class Log:
  """What a run shows and records as it trains: train and eval lines in metrics.jsonl (and
  TensorBoard), the progress bar, and the throughput of the training steps between lines."""

  def __init__(self, trainer: Trainer, start: int, checkpointer):
    from tqdm import tqdm
    self.objective, self.train_cfg = trainer.objective, trainer.cfg.train
    self.num_micro = trainer.cfg.train.grad_accum
    self.checkpointer = checkpointer
    self.is_main = trainer.is_main
    self.writer = metrics.MetricsWriter(rundir.path(trainer.workdir, rundir.METRICS),
                                        enabled=self.is_main,
                                        wandb_project=trainer.cfg.train.wandb_project,
                                        config=trainer.cfg.to_dict())
    self.throughput = trainer.throughput()
    self.bar = tqdm(total=self.train_cfg.steps, initial=start, disable=not self.is_main,
                    desc="train", unit="step", dynamic_ncols=True)
    self.timer, self.timer_step = None, start
    if self.is_main:
      frozen = trainer.num_params - trainer.num_trainable
      active = trainer.num_active_params
      print((f"{trainer.num_trainable:,} of {trainer.num_params:,} parameters train" if frozen
             else f"{trainer.num_params:,} parameters")
            + (f" ({active:,} active per token)" if active != trainer.num_params else "")
            + f"; {trainer.tokens_per_step:,} tokens per step; starting at step {start}"
            + ("" if self.throughput.peak_flops else
               "; MFU needs --config.train.peak_flops on this device"))

  def trained(self, step: int, stats: dict, health: dict, extra: dict) -> None:
    """After each step: a train line every train.log_every steps and at the last (with `extra`
    metrics of the step's making: an online task's sampling)."""
    if self.timer is None:  # the first step compiles (and one after an eval): time from its end
      jax.block_until_ready(stats)
      self.timer, self.timer_step = time.perf_counter(), step
    if step % self.train_cfg.log_every == 0 or step == self.train_cfg.steps:
      stats, skipped = jax.device_get(stats), self.check(step, health)
      speed = self.throughput(step - self.timer_step, time.perf_counter() - self.timer)
      task_metrics = {k: v for k, v in self.objective.summarize(stats["sums"]).items()
                      if isinstance(v, float) and k not in ("loss", "perplexity")}
      task_metrics.update(extra)
      if stats["router"] is not None:
        task_metrics.update(moe.metrics(stats["router"], self.num_micro))
      if self.train_cfg.on_nonfinite == "skip":
        task_metrics["skipped_steps"] = skipped
      loss, grad_norm = float(stats["loss"]), float(stats["grad_norm"])
      finite = lambda x: x if np.isfinite(x) else None  # JSON has no NaN
      self.writer.write({"step": step, "split": "train", "loss": finite(loss),
                         "lr": float(stats["lr"]), "grad_norm": finite(grad_norm), **speed,
                         **task_metrics})
      tokens_per_sec = speed["tokens_per_sec"]
      self.bar.set_postfix_str(headline({"loss": loss, **task_metrics})
                               + (f", {tokens_per_sec:,.0f} tok/s" if tokens_per_sec else ""))
      self.timer, self.timer_step = time.perf_counter(), step
    self.bar.update(1)

  def check(self, step: int, health: dict) -> int:
    """The count of skipped non-finite steps; stops the run (UserError) once the train step
    has stopped applying updates (see make_train_step). Syncs with the device."""
    health = jax.device_get(health)
    if health["stopped_at"]:
      last = self.checkpointer.latest_step()
      saved = (f"the last checkpoint, step {last}, is intact" if last else
               "no checkpoint was saved")
      in_a_row = (f" ({health['in_a_row']} in a row)"
                  if self.train_cfg.on_nonfinite == "skip" else "")
      remedy = ("raise train.max_nonfinite" if self.train_cfg.on_nonfinite == "skip" else
                "set train.on_nonfinite=skip")
      raise UserError(f"the loss or gradient became non-finite at step {health['stopped_at']}"
                      f"{in_a_row}; that step was not applied and nothing after it is saved; "
                      f"{saved}; lower train.lr, check the data, or {remedy}")
    return int(health["skipped"])

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
  """The loss, perplexity, reward (online RL) and every accuracy (classes; BERT's masked tokens
  and next sentence)."""
  keys = [k for k in ("loss", "perplexity", "reward", "best_of_n_reward") if k in result]
  keys += [k for k in result if k.endswith("accuracy")]
  return ", ".join(f"{k} {result[k]:.4f}" for k in keys)
