"""`llm.bench train` and `llm.bench rl`: the config's real train step (the Trainer's), its
compile time, memory, step time, tokens/s and MFU; optimizers and padded against packed rows side
by side; a mixture of experts beside its dense twin; an online RL step's rollout and update
apart; and, with --topology, the step compiled ahead of time for a TPU slice
(llm/runs/ahead_of_time.py)."""

import resource
import tempfile
import time

import jax
import jax.numpy as jnp

from llm import tasks
from llm import config as config_lib
from llm.data import batches as data_batches
from llm.errors import UserError
from llm.runs import ahead_of_time
from llm.runs.trainer import new_health, Trainer
from llm.training import metrics, sharding


def state_bytes(state, num_params: int) -> dict:
  """The train state's bytes per trainable parameter: all of it, and the optimizer's part."""
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  return {"state_bytes_per_param": nbytes(state) / num_params,
          "opt_state_bytes_per_param": nbytes(state["opt_state"]) / num_params}


def bench_train(cfg, steps: int, profile: str = "", against=None) -> dict:
  """Compile time, the step's memory (XLA's own accounting, per device; the process's peak
  resident memory), step time, tokens/s, MFU and the state's bytes per parameter of the
  config's train step, on its own data; with `profile` (a folder) a jax.profiler trace of the
  timed steps. `against(ours)` adds its own results, given `ours(n)`, which runs n more of these
  steps."""
  if tasks.get(cfg.task.kind).online:  # its batches are sampled as it trains
    raise UserError(f"task.kind={cfg.task.kind} samples its batches as it trains: time it with "
                    "python -m llm.bench rl")
  with tempfile.TemporaryDirectory() as workdir:  # a run that writes nothing
    trainer = Trainer(cfg, workdir)
  state, frozen = trainer.init_state()
  batches = [trainer.place(next(trainer.batches)) for _ in range(steps + 1)]
  health = new_health()
  with sharding.activate(trainer.mesh, trainer.cfg.mesh):
    start = time.perf_counter()
    step_fn = trainer.jit_train_step().lower(state, frozen, batches[0], health).compile()
    compile_s = time.perf_counter() - start
    memory = step_fn.memory_analysis()
    memory = {"temp_gb": memory.temp_size_in_bytes / 1e9 if memory else None,
              "arguments_gb": memory.argument_size_in_bytes / 1e9 if memory else None}
    if not steps:  # the compiled step's size alone (a model too large to run here)
      return {"compile_s": compile_s, **memory}
    state, stats, health = step_fn(state, frozen, batches[0], health)  # warm-up
    jax.block_until_ready(stats)
    profiler = metrics.StepProfiler(f"1:{steps}" if profile else "", profile)
    start = time.perf_counter()
    for i, batch in enumerate(batches[1:], 1):
      profiler.before(i)
      state, stats, health = step_fn(state, frozen, batch, health)
      profiler.after(i, stats)
    jax.block_until_ready(stats)
    seconds = time.perf_counter() - start
    # The same steps fed as training feeds them: batches made and placed on a host thread.
    fed = data_batches.Prefetch(trainer.batches, trainer.place)
    try:
      start = time.perf_counter()
      for _ in range(steps):
        state, stats, health = step_fn(state, frozen, next(fed), health)
      jax.block_until_ready(stats)
      fed_seconds = time.perf_counter() - start
    finally:
      fed.close()

    def ours(n: int) -> None:
      nonlocal state, stats, health
      for i in range(n):
        state, stats, health = step_fn(state, frozen, batches[1 + i % steps], health)
      jax.block_until_ready(stats)

    # the host's side of memory: see llm/host_memory.py (Linux counts it in KiB)
    peak_resident_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    compared = against(ours) if against else {}
  result = {"compile_s": compile_s, **memory, "peak_resident_gb": peak_resident_gb,
            "step_ms": 1e3 * seconds / steps,
            "step_ms_with_data": 1e3 * fed_seconds / steps,
            **trainer.throughput()(steps, seconds), **state_bytes(state, trainer.num_trainable)}
  if trainer.data.real_share < 1:  # records padded or packed into rows: what is real
    result["padding_share"] = 1 - trainer.data.real_share
    result["real_tokens_per_sec"] = result["tokens_per_sec"] * trainer.data.real_share
  return {**result, **compared}


def bench_optimizers(cfg, steps: int, names: list[str]) -> dict:
  """The config's train step with each optimizer (train.optimizer), side by side: step time,
  tokens/s and the optimizer state's bytes per parameter."""
  result = {}
  for name in names:
    changes = {"train.optimizer": name}
    if name == "schedule_free":
      changes["train.schedule"] = "constant"
    timed = bench_train(config_lib.replace(cfg, changes), steps)
    for key in ("step_ms", "tokens_per_sec", "opt_state_bytes_per_param"):
      result[f"{name}_{key}"] = timed[key]
  for name in names[1:]:
    result[f"{name}_over_{names[0]}"] = (result[f"{name}_tokens_per_sec"]
                                         / result[f"{names[0]}_tokens_per_sec"])
  return result


def bench_moe(cfg, steps: int) -> dict:
  """A mixture-of-experts config's train step beside the dense model of the same active width
  (each MoE block's MLP as wide as its k experts together, model.moe.num_experts=0), side by
  side; and, on one MoE layer of the config's shape and micro-batch, the share of its forward
  and backward pass spent routing (router logits, top-k, the sort by expert), apart from the
  experts' grouped products."""
  moe_cfg = cfg.model.moe
  if not moe_cfg.num_experts:
    raise UserError("--compare_dense times a mixture of experts: set model.moe.num_experts")
  dense_d_ff = moe_cfg.experts_per_token * (moe_cfg.expert_d_ff or cfg.model.d_ff)
  result = {}
  for name, changes in (("moe", {}), ("dense", {"model.moe.num_experts": 0,
                                                "model.d_ff": dense_d_ff})):
    timed = bench_train(config_lib.replace(cfg, changes), steps)
    for key in ("step_ms", "tokens_per_sec", "mfu"):
      result[f"{name}_{key}"] = timed[key]
  result["moe_step_over_dense"] = result["moe_step_ms"] / result["dense_step_ms"]
  result.update(_router_share(cfg, steps))
  return result


def _router_share(cfg, steps: int) -> dict:
  """One MoE layer's forward and backward pass on a micro-batch of the config's tokens, timed
  whole and with routing alone (its outputs' weighted sum standing in for the experts)."""
  from llm import model as model_lib
  from llm.model import moe
  shape = model_lib.transformer_config(cfg.model, 64)
  T = cfg.train.batch_size // cfg.train.grad_accum * cfg.data.max_length
  D, E, F = shape.d_model, shape.moe.num_experts, shape.moe.expert_d_ff or shape.d_ff
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))
  normal = lambda *s: jax.random.normal(next(keys), s, shape.dtype) * 0.02
  weights = {"router": normal(D, E).astype(jnp.float32), "router_bias": None,
             "wg": (normal(E, D, F), None), "wi": (normal(E, D, F), None),
             "wo": (normal(E, F, D), None)}
  x = normal(1, T, D)

  def whole(x, w):
    return jnp.sum(moe.experts_forward(x, w, shape, jax.nn.silu)[0].astype(jnp.float32))

  def routing(x, w):
    logits = jnp.dot(x[0].astype(jnp.float32), w["router"])
    weights_TxK, experts_TxK, _ = moe.route(logits, None, shape.moe)
    order = jnp.argsort(experts_TxK.reshape(-1), stable=True)
    return jnp.sum(weights_TxK.reshape(-1)[order])

  def timed(fn):
    step = jax.jit(jax.grad(fn, argnums=(0, 1)))
    jax.block_until_ready(step(x, weights))
    start = time.perf_counter()
    for _ in range(steps):
      out = step(x, weights)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps

  layer_s, routing_s = timed(whole), timed(routing)
  return {"moe_layer_ms": 1e3 * layer_s, "routing_ms": 1e3 * routing_s,
          "routing_share_of_layer": routing_s / layer_s}


def bench_packing(cfg, steps: int) -> dict:
  """A fine-tuning config's train step on its records padded and packed (data.packing), side
  by side: the padding share and real (non-padding) tokens/s of each."""
  result = {}
  for layout, packing in (("padded", False), ("packed", True)):
    timed = bench_train(config_lib.replace(cfg, {"data.packing": packing}), steps)
    if "padding_share" not in timed:
      raise UserError("--compare_packing times fine-tuning on records (task.kind="
                      f"{', '.join(tasks.kinds_where(lambda c: c.packs))})")
    for key in ("step_ms", "tokens_per_sec", "padding_share", "real_tokens_per_sec"):
      result[f"{layout}_{key}"] = timed[key]
  result["packed_over_padded"] = (result["packed_real_tokens_per_sec"]
                                  / result["padded_real_tokens_per_sec"])
  return result


def bench_rl(cfg, steps: int) -> dict:
  """An online RL config's steps, their two halves timed apart after one untimed step (which
  compiles): the rollout (sampling, scoring, the policy's and the reference's log-probabilities;
  the host waits for it) and the update (task.updates_per_rollout passes); tokens/s of each
  and the share of a step spent sampling."""
  with tempfile.TemporaryDirectory() as workdir:  # a run that writes nothing
    trainer = Trainer(cfg, workdir)
  if trainer.data.rollout is None:
    raise UserError("llm.bench rl times an online RL config (task.kind="
                    f"{' or '.join(tasks.kinds_where(lambda c: c.online))})")
  state, frozen = trainer.init_state()
  health, step_fn = new_health(), trainer.jit_train_step()
  passes = trainer.data.updates_per_batch  # task.updates_per_rollout
  rollout_s = update_s = sampled = 0.0
  for step in range(1, steps + 2):
    prompts = trainer.place(next(trainer.batches))
    started = time.perf_counter()
    batch, _ = trainer.data.rollout(state["params"], frozen, prompts, step)
    jax.block_until_ready(batch)
    rolled = time.perf_counter()
    with sharding.activate(trainer.mesh, trainer.cfg.mesh):
      for _ in range(passes):
        state, stats, health = step_fn(state, frozen, batch, health)
    jax.block_until_ready(stats)
    if step > 1:
      rollout_s += rolled - started
      update_s += time.perf_counter() - rolled
      sampled += float(jnp.sum(batch["mask"]))
  return {"rollout_ms": 1e3 * rollout_s / steps, "update_ms": 1e3 * update_s / steps,
          "sampling_share": rollout_s / (rollout_s + update_s),
          "sampled_tokens_per_sec": sampled / rollout_s,
          "update_tokens_per_sec": trainer.tokens_per_step * passes * steps / update_s}


def bench_compile_for(cfg, topology: str) -> dict:
  """The config's real train step (the Trainer's model, shardings and mesh rules) compiled
  ahead of time for a TPU topology, its state abstract (shapes and shardings; nothing is
  made): per device, the state's and XLA's temporary bytes against the chip's memory, and the
  step's FLOPs and bytes by XLA's cost model, and the time, MFU and tokens/s a roofline of them
  gives. Estimates, not measurements."""
  step = ahead_of_time.compile_for(cfg, topology)
  report = ahead_of_time.aot_report(step)
  accum = cfg.train.grad_accum
  if accum > 1 and report.get("step_ms"):  # the micro-batch's time, train.grad_accum times
    report.update(step_ms=report["step_ms"] * accum, micro_batches=accum)
  return {"compile_s": step.seconds, **report}
