"""Speed, measured side by side in one process (never in a timed test).

    python -m llm.bench train --config=configs/gpt_tiny.py [--steps=20] [--compare_torch]
    python -m llm.bench train --config=configs/finetune_instruct.py --compare_packing
    python -m llm.bench train --config=configs/gpt_tiny.py --optimizers=adamw,muon,lion
    python -m llm.bench train --config=configs/gpt_tiny.py --profile=/tmp/profile
    python -m llm.bench generate --config=configs/gpt_tiny.py --config.model.max_len=512 \\
        [--batch=1 --prompt_len=16 --new_tokens=256] [--compare_hf]

    python -m llm.bench train --config=configs/gpt_small.py --topology=v5e:2x4   # needs libtpu

`train --topology` (and `generate --topology`) compiles the step ahead of time for a TPU
topology, from any machine, and reports per-chip memory and XLA's cost estimates instead of
timing. `train` compiles the train step (timed; XLA's memory accounting of it: temporaries and
arguments, per device) and times it after one warm-up step on batches already on the devices
(`step_ms`), then fed as training feeds it, by a host thread that makes the next batches
(`step_ms_with_data`).
`rl` times an online RL config's (task.kind=grpo, rloo) rollout and update apart, and the share
of a step spent sampling.
`evaluate` times multiple-choice scoring (HellaSwag's shape: 4 choices per example) in
examples/s, and with --compare_hf lm-evaluation-harness's own Hugging Face backend beside it.
`generate` times prefill and decoding of a randomly initialised model of the config's shape, with
and without the KV cache, and prints the ratio and the cache's size.
`data` measures the data path of the config's tokenizer on corpora of --corpus_mb megabytes
(JSON lines of CPython's documentation and standard library sources, made once in
--corpus_dir): the tokenizer's own batch throughput on all cores on the smallest corpus held in
memory, preparation's throughput on the same text (streamed from the file, as llm.prepare
reads it), `python -m llm.prepare`'s wall time and peak resident memory per corpus, and the
time from starting `python -m llm.train` on the largest prepared corpus (the config's `:tiny`
model shape) to its first step.

    python -m llm.bench data --config=configs/gpt_small.py --config.tokenizer.path=DIR \
        [--corpus_mb=100,1000]
"""

import dataclasses
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from llm import cli, config as config_lib, metrics, sharding
from llm.data import batches as data_batches
from llm.data import shards, sources
from llm import model as model_lib
from llm.model import attention, layers
from llm.errors import UserError
from llm.sampling import generate_tokens

FLAGS = flags.FLAGS


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_integer("steps", 20, "train, rl: timed steps (train 0: compile and report memory "
                       "only).")
  flags.DEFINE_integer("batch", 1, "generate: prompts per batch.")
  flags.DEFINE_integer("prompt_len", 16, "generate: prompt tokens.")
  flags.DEFINE_integer("new_tokens", 256, "generate: tokens to decode.")
  flags.DEFINE_integer("repeats", 3, "generate: timed repeats (the best counts).")
  flags.DEFINE_string("topology", None, "train, generate: compile for this TPU topology ahead "
                      "of time (e.g. v5e:2x4, v5p:2x2x1, v6e:2x2; needs libtpu) and report "
                      "XLA's memory and cost estimates per chip instead of timing.")
  flags.DEFINE_integer("examples", 64, "evaluate: multiple-choice examples (4 choices each).")
  flags.DEFINE_integer("context_len", 48, "evaluate: context tokens of each example.")
  flags.DEFINE_integer("choice_len", 24, "evaluate: tokens of each choice.")
  flags.DEFINE_integer("requests_per_batch", 16, "evaluate: requests per forward pass.")
  flags.DEFINE_bool("compare_hf", False,
                    "generate: also time transformers' GPT-2 generate (CPU torch), same shape; "
                    "evaluate: also lm-evaluation-harness's Hugging Face backend.")
  flags.DEFINE_list("corpus_mb", ["100", "1000"], "data: corpus sizes in megabytes.")
  flags.DEFINE_string("corpus_dir", os.path.join(tempfile.gettempdir(), "llm-bench-data"),
                      "data: where the corpora and their shards are made (kept for reruns).")
  flags.DEFINE_list("optimizers", [], "train: time the config with each of these "
                    "optimizers (train.optimizer) side by side, e.g. adamw,muon,lion.")
  flags.DEFINE_string("profile", "", "train: write a jax.profiler trace of the timed steps to "
                      "this folder (tensorboard --logdir=FOLDER, or ui.perfetto.dev).")
  flags.DEFINE_bool("compare_packing", False,
                    "train: time a fine-tuning config's records padded and packed "
                    "(data.packing) side by side, in real (non-padding) tokens/s.")
  flags.DEFINE_bool("compare_torch", False,
                    "train: also time torch.compile'd train steps (AdamW, same shape and batch) "
                    "of transformers' GPT-2 and of a nanoGPT-style GPT (and the latter without "
                    "torch.compile), in turn with this project's for 5 rounds, and print the "
                    "ratios of the medians; then one block's forward and backward pass against "
                    "nanoGPT's, causal attention's against torch's scaled_dot_product_attention, "
                    "and the step's matrix products alone, JAX against torch.")


def _times(fn, repeats) -> list[float]:
  """The seconds of each of `repeats` calls of fn, its results awaited, after one that
  compiles."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def _best_time(fn, repeats):
  return min(_times(fn, repeats))


def _in_turn(calls: dict, rounds: int) -> dict:
  """The median seconds of each of `calls` (name: a function that returns when its work is
  done), the calls timed in turn for `rounds` rounds: the ratios of the medians then compare
  calls timed seconds apart, not minutes (this machine's speed drifts)."""
  seconds = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      start = time.perf_counter()
      call()
      seconds[name].append(time.perf_counter() - start)
  return {name: float(np.median(times)) for name, times in seconds.items()}


def _side_by_side(ours, theirs, rounds: int) -> tuple[float, float]:
  """The median seconds of ours() and of theirs(), timed in turn (`_in_turn`) after two calls
  of each that compile and warm up."""
  for run in (ours, theirs, ours, theirs):
    run()
  seconds = _in_turn({"ours": ours, "theirs": theirs}, rounds)
  return seconds["ours"], seconds["theirs"]


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
  import tempfile
  from llm.train import Trainer, new_health
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


def bench_packing(cfg, steps: int) -> dict:
  """A fine-tuning config's train step on its records padded and packed (data.packing), side
  by side: the padding share and real (non-padding) tokens/s of each."""
  result = {}
  for layout, packing in (("padded", False), ("packed", True)):
    timed = bench_train(config_lib.replace(cfg, {"data.packing": packing}), steps)
    if "padding_share" not in timed:
      raise UserError("--compare_packing times fine-tuning on records (task.kind=instruct, "
                      "reward, dpo)")
    for key in ("step_ms", "tokens_per_sec", "padding_share", "real_tokens_per_sec"):
      result[f"{layout}_{key}"] = timed[key]
  result["packed_over_padded"] = (result["packed_real_tokens_per_sec"]
                                  / result["padded_real_tokens_per_sec"])
  return result


def topology_devices(name: str) -> list:
  """The devices of a TPU topology named like v5e:2x4 or v4:2x2x1, described without a TPU
  (libtpu compiles for them on any machine)."""
  jax.config.update("jax_platforms", "cpu")  # this process runs on its CPU, compiles for TPU
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
  except Exception as e:  # libtpu missing, or a name it does not know
    if "Unknown backend" in str(e) or "tpu" in str(e).lower() and "plugin" in str(e).lower():
      raise UserError("--topology needs libtpu: pip install libtpu==0.0.51 (the version that "
                      f"pairs with jax {jax.__version__})") from None
    raise UserError(f"--topology={name}: {str(e).splitlines()[0][:200]}") from None


def bench_compile_for(cfg, topology: str) -> dict:
  """The config's real train step (the Trainer's model, shardings and mesh rules) compiled
  ahead of time for a TPU topology, its state abstract (shapes and shardings; nothing is
  made): per device, the state's and XLA's temporary bytes against the chip's memory, and the
  step's FLOPs and bytes by XLA's cost model, and the time, MFU and tokens/s a roofline of them
  gives. Estimates, not measurements."""
  step = compile_for(cfg, topology)
  report = aot_report(step)
  accum = cfg.train.grad_accum
  if accum > 1 and report.get("step_ms"):  # the micro-batch's time, train.grad_accum times
    report.update(step_ms=report["step_ms"] * accum, micro_batches=accum)
  return {"compile_s": step.seconds, **report}


@dataclasses.dataclass
class CompiledStep:
  compiled: Any  # jax.stages.Compiled
  trainer: Any
  state: dict  # abstract: shapes and shardings
  seconds: float  # to compile
  splash_kernel: bool  # whether the step holds the Mosaic splash-attention kernel


def compile_for(cfg, topology: str) -> CompiledStep:
  """The train step compiled for a TPU topology: see bench_compile_for. The step is compiled
  for one micro-batch (grad_accum=1):
  XLA's cost model counts a loop's body about once, whatever its trip count, and the memory
  is a micro-batch's either way."""
  from llm.train import Trainer, new_health
  tr = cfg.train
  cfg = config_lib.replace(cfg, {"train.batch_size": tr.batch_size // tr.grad_accum,
                                 "train.grad_accum": 1})
  devices = topology_devices(topology)
  with tempfile.TemporaryDirectory() as workdir:  # a run that writes nothing
    trainer = Trainer(cfg, workdir, devices)
  state, frozen = trainer.abstract_state()
  shaped = lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s)
  batch_sharding = sharding.batch_sharding(trainer.mesh)
  batch = {k: shaped(v, batch_sharding) for k, v in next(trainer.batches).items()}
  replicated = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
  health = jax.tree.map(lambda x: shaped(x, replicated), new_health())
  with attention.compiling_for("tpu"), sharding.activate(trainer.mesh, trainer.cfg.mesh):
    started = time.perf_counter()
    lowered = trainer.jit_train_step().lower(state, frozen, batch, health)
    compiled = lowered.compile()
  # The lowered text, as the compiled HLO of some topologies cannot be read back here.
  return CompiledStep(compiled, trainer, state, time.perf_counter() - started,
                      "tpu_custom_call" in lowered.as_text())


def aot_report(step: CompiledStep) -> dict:
  """What a compiled step for a TPU topology costs per device, by XLA's own accounting."""
  compiled, trainer, state = step.compiled, step.trainer, step.state
  devices = trainer.mesh.devices.flatten()
  kind = devices[0].device_kind
  shard_gb = lambda tree: sum(
      math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
      for x in jax.tree.leaves(tree)) / 1e9
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  temp_gb = memory.temp_size_in_bytes / 1e9
  total_gb = (memory.argument_size_in_bytes + memory.output_size_in_bytes
              - memory.alias_size_in_bytes + memory.temp_size_in_bytes) / 1e9
  # The topology's chip, not the machine train.peak_flops describes.
  hbm = metrics.hbm_bytes(kind)
  peak = metrics.peak_flops(kind, 0) or metrics.peak_flops(kind, trainer.cfg.train.peak_flops)
  bandwidth = metrics.hbm_bandwidth(kind)
  flops, moved = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  throughput = trainer.throughput()
  kernel = step.splash_kernel
  if kernel:  # XLA counts nothing inside the splash kernel: its attention FLOPs, by formula
    m = model_lib.shape_of(trainer.model)
    flops += metrics.flops_per_token(0, m.num_layers, m.num_heads, m.head_dim,
                                     trainer.schema.length) * throughput.tokens_per_step / len(
                                         devices)
  out = {"device": f"{len(devices)} x {kind}", "params_gb": shard_gb(state["params"]),
         "opt_state_gb": shard_gb(state["opt_state"]), "temp_gb": temp_gb,
         "total_gb": total_gb, "hbm_gb": hbm / 1e9 if hbm else None,
         "fits": (total_gb * 1e9 <= hbm) if hbm else None, "splash_kernel": kernel,
         "xla_flops": flops,
         "xla_gb_accessed": moved / 1e9,
         "model_flops_over_xla": throughput.flops_per_step / (len(devices) * flops)}
  if peak and bandwidth and not trainer.cfg.model.scan_layers:
    # (Scanned layers are a loop, whose body XLA's cost analysis counts once: no estimate.)
    # A roofline: the step takes at least its FLOPs at the chip's peak and its bytes at the
    # memory's bandwidth (libtpu's cost model gives no time of its own: optimal_seconds < 0).
    compute_s, memory_s = flops / peak, moved / bandwidth
    seconds = max(compute_s, memory_s)
    out.update({"step_ms": 1e3 * seconds, "bound_by_memory": memory_s > compute_s,
                "tokens_per_sec": throughput.tokens_per_step / seconds,
                "mfu": throughput.flops_per_step / (len(devices) * peak * seconds)})
  return out


def bench_generate_for(cfg, topology: str, batch: int, prompt_len: int,
                       new_tokens: int) -> dict:
  """Greedy KV-cache decoding of the config's model compiled ahead of time for a TPU topology
  (parameters split by the config's mesh rules; nothing is made): per device, the parameters',
  the KV cache's and XLA's temporary bytes against the chip's memory, and the decode rate that
  reading the parameters and the cache once per token at the memory's bandwidth allows."""
  from llm import params as params_lib
  config_lib.validate(cfg)
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  model = model_lib.build(cfg.model, cfg.tokenizer.vocab_size)
  shapes, shardings = params_lib.abstract(cfg, model, mesh, cfg.mesh)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        params_lib.values(shapes), shardings)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  prompt = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=replicated)
  valid = jax.ShapeDtypeStruct((batch, prompt_len), jnp.bool_, sharding=replicated)
  decode = jax.jit(lambda params, prompt, valid: generate_tokens(
      model, params, prompt, valid, jax.random.PRNGKey(0), -1, max_new_tokens=new_tokens,
      temperature=0.0, top_k=0, top_p=1.0, use_cache=True))
  with attention.compiling_for("tpu"), sharding.activate(mesh, cfg.mesh):
    started = time.perf_counter()
    compiled = decode.lower(params, prompt, valid).compile()
    compile_s = time.perf_counter() - started
  cache = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(
      (batch, prompt_len + new_tokens), jnp.int32), decode=True)["cache"])
  kind = devices[0].device_kind
  params_gb = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                  for x in jax.tree.leaves(params)) / 1e9
  cache_gb = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) / 1e9  # whole
  memory = compiled.memory_analysis()
  total_gb = (memory.argument_size_in_bytes + memory.output_size_in_bytes
              - memory.alias_size_in_bytes + memory.temp_size_in_bytes) / 1e9
  hbm, bandwidth = metrics.hbm_bytes(kind), metrics.hbm_bandwidth(kind)
  out = {"compile_s": compile_s, "device": f"{len(devices)} x {kind}", "params_gb": params_gb,
         "kv_cache_gb_all_devices": cache_gb, "temp_gb": memory.temp_size_in_bytes / 1e9,
         "total_gb": total_gb, "hbm_gb": hbm / 1e9 if hbm else None,
         "fits": (total_gb * 1e9 <= hbm) if hbm else None}
  if bandwidth:  # each new token reads every parameter and the cache once
    per_token_s = (params_gb + cache_gb / len(devices)) * 1e9 / bandwidth
    out["decode_tokens_per_sec_bound"] = batch / per_token_s
  return out


def bench_rl(cfg, steps: int) -> dict:
  """An online RL config's steps, their two halves timed apart after one untimed step (which
  compiles): the rollout (sampling, scoring, the policy's and the reference's log-probabilities;
  the host waits for it) and the update (task.updates_per_rollout passes); tokens/s of each
  and the share of a step spent sampling."""
  from llm.train import Trainer, new_health
  with tempfile.TemporaryDirectory() as workdir:  # a run that writes nothing
    trainer = Trainer(cfg, workdir)
  if trainer.data.rollout is None:
    raise UserError("llm.bench rl times an online RL config (task.kind=grpo or rloo)")
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


def bench_generate(cfg, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                   compare_hf: bool = False) -> dict:
  config_lib.validate(cfg)
  model = model_lib.build(cfg.model, cfg.tokenizer.vocab_size)
  if prompt_len + new_tokens > model.cfg.max_len:
    raise UserError(f"prompt_len + new_tokens = {prompt_len + new_tokens} is more than "
                    f"model.max_len={model.cfg.max_len}; raise --config.model.max_len")
  params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 1), jnp.int32)))["params"])()
  prompt = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (batch, prompt_len),
                                             dtype=np.int32)
  valid = np.ones_like(prompt, bool)

  def run(n, use_cache):  # eot_id -1: never stops early
    return lambda: generate_tokens(model, params, prompt, valid, jax.random.PRNGKey(0), -1,
                             max_new_tokens=n, temperature=0.0, top_k=0, top_p=1.0,
                             use_cache=use_cache)

  cache = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(
      (batch, prompt_len + new_tokens), jnp.int32), decode=True)["cache"])
  result = {"kv_cache_mb": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) / 1e6}
  for use_cache in (True, False):
    name = "cached" if use_cache else "uncached"
    prefill = _best_time(run(1, use_cache), repeats)
    total = _best_time(run(new_tokens, use_cache), repeats)
    result[f"{name}_prefill_tokens_per_sec"] = batch * prompt_len / prefill
    result[f"{name}_decode_tokens_per_sec"] = batch * (new_tokens - 1) / max(total - prefill, 1e-9)
  result["cached_over_uncached"] = (result["cached_decode_tokens_per_sec"] /
                                    result["uncached_decode_tokens_per_sec"])
  if compare_hf:
    hf = _hf_gpt2_decode(model.cfg, prompt, new_tokens, repeats)
    result.update(hf)
    result["cached_over_transformers"] = (result["cached_decode_tokens_per_sec"] /
                                          hf["transformers_decode_tokens_per_sec"])
  return result


def _torch_train(cfg, steps: int, ours, rounds: int = 5) -> dict:
  """The references beside this project's step (`ours(n)` runs n steps): transformers'
  GPT2LMHeadModel and a nanoGPT-style GPT of the same shape, compiled with torch.compile and
  trained by torch.optim.AdamW (CPU torch) on the same batch shape, and the nanoGPT-style GPT
  again without torch.compile. The four are timed in turn (`_in_turn`), `steps` steps each,
  for `rounds` rounds."""
  try:
    import torch
    import transformers
  except ImportError:
    raise UserError("--compare_torch needs torch and transformers "
                    "(pip install torch==2.13.0 transformers)") from None
  m = cfg.model
  if m.kind != "gpt":
    raise UserError("--compare_torch compares a GPT's next-token train step (model.kind=gpt)")
  vocab = max(m.vocab_size, cfg.tokenizer.vocab_size)
  hf_cfg = transformers.GPT2Config(
      vocab_size=vocab, n_positions=m.max_len, n_embd=m.d_model, n_layer=m.num_layers,
      n_head=m.num_heads, n_inner=m.d_ff, resid_pdrop=m.dropout, embd_pdrop=m.dropout,
      attn_pdrop=m.dropout, tie_word_embeddings=m.tie_embeddings, bos_token_id=None,
      eos_token_id=None)
  hf_model = transformers.GPT2LMHeadModel(hf_cfg).train()
  nano_model = _nanogpt(vocab, m, torch).train()
  eager_model = _nanogpt(vocab, m, torch).train()
  runs = {"ours": ours, "torch": _torch_steps(cfg, lambda x: hf_model(x).logits, hf_model, torch),
          "nanogpt": _torch_steps(cfg, nano_model, nano_model, torch),
          # the same GPT run by torch's own kernels, without torch.compile's fusions
          "nanogpt_eager": _torch_steps(cfg, eager_model, eager_model, torch,
                                        torch_compile=False)}
  seconds = _in_turn({name: lambda run=run: run(steps) for name, run in runs.items()}, rounds)
  tokens = cfg.train.batch_size * cfg.data.max_length
  result = {}
  for name, run_s in seconds.items():
    step_s = run_s / steps
    result.update({f"{name}_step_ms": 1e3 * step_s, f"{name}_tokens_per_sec": tokens / step_s})
  for ref in ("torch", "nanogpt", "nanogpt_eager"):
    result[f"tokens_per_sec_over_{ref}"] = (result["ours_tokens_per_sec"]
                                            / result[f"{ref}_tokens_per_sec"])
  return result


def bench_block(cfg, rounds: int = 15) -> dict:
  """One transformer block's forward and backward pass (the gradients of its parameters and
  input) at the config's shape, this project's `layers.Block` in jax.jit against nanoGPT's
  block compiled with torch.compile, timed in turn for `rounds` rounds: the step's per-layer
  share without its optimizer, loss or neighbours."""
  import torch
  tr, m = cfg.train, cfg.model
  x, w = (np.random.default_rng(i).standard_normal(
      (tr.batch_size // tr.grad_accum, cfg.data.max_length, m.d_model), np.float32)
      for i in range(2))
  block = layers.Block(model_lib.transformer_config(m, m.vocab_size or cfg.tokenizer.vocab_size))
  params = block.init(jax.random.key(0), jnp.asarray(x), None, None, None, True)
  loss = lambda p, x: jnp.sum(block.apply(p, x, None, None, None, True) * w)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
  ours = lambda: jax.block_until_ready(grads(params, jnp.asarray(x)))
  nano = _nanogpt_block(m, torch)
  compiled, x_torch, w_torch = torch.compile(nano), torch.from_numpy(x), torch.from_numpy(w)
  x_torch.requires_grad_()

  def theirs():
    (compiled(x_torch) * w_torch).sum().backward()
    x_torch.grad = None
    nano.zero_grad(set_to_none=True)

  ours_s, theirs_s = _side_by_side(ours, theirs, rounds)
  return {"block_ms": 1e3 * ours_s, "nanogpt_block_ms": 1e3 * theirs_s,
          "block_over_nanogpt": theirs_s / ours_s}


def bench_attention(cfg, rounds: int = 15) -> dict:
  """Causal self-attention alone, forward and backward (the gradients of q, k and v) at the
  config's shape: this project's `attention.attend` as the model runs it (model.attention_impl;
  `flash` on the CPU) in jax.jit, against torch's
  scaled_dot_product_attention on heads-first arrays, which nanoGPT calls (on the CPU, a fused
  flash-attention kernel). Timed in turn for `rounds` rounds."""
  import torch
  tr, m = cfg.train, cfg.model
  B, L, N = tr.batch_size // tr.grad_accum, cfg.data.max_length, m.num_heads
  shape_BxLxNxH = (B, L, N, m.d_model // N)
  q, k, v, w = (np.random.default_rng(i).standard_normal(shape_BxLxNxH, np.float32)
                for i in range(4))
  impl = attention.choose(m.attention_impl, jnp.float32, L, decode=False)
  loss = lambda q, k, v: jnp.sum(attention.attend(q, k, v, None, True, impl) * w)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  qkv = [jnp.asarray(x) for x in (q, k, v)]
  ours = lambda: jax.block_until_ready(grads(*qkv))
  heads_first = lambda x: torch.from_numpy(x.transpose(0, 2, 1, 3).copy())
  qkv_torch = [heads_first(x).requires_grad_() for x in (q, k, v)]
  w_torch = heads_first(w)

  def theirs():
    out = torch.nn.functional.scaled_dot_product_attention(*qkv_torch, is_causal=True)
    (out * w_torch).sum().backward()
    for x in qkv_torch:
      x.grad = None

  ours_s, theirs_s = _side_by_side(ours, theirs, rounds)
  return {"attention_ms": 1e3 * ours_s, "torch_sdpa_ms": 1e3 * theirs_s,
          "attention_over_torch_sdpa": theirs_s / ours_s}


def bench_matmuls(cfg, repeats: int = 20) -> dict:
  """The train step's matrix products at the config's shape, each timed alone in jax.jit and in
  torch (CPU, median of `repeats`): GFLOP/s of JAX and JAX / torch. Dense: an MLP projection and
  its two backward products ([B*L, D] x [D, F]); attention: the batched [B*N] products of the
  scores, of probabilities and values, and the backward's transposed one."""
  import torch
  tr, m = cfg.train, cfg.model
  M, L, H = tr.batch_size // tr.grad_accum * cfg.data.max_length, cfg.data.max_length, m.d_model
  BN, Hd, F = tr.batch_size // tr.grad_accum * m.num_heads, m.d_model // m.num_heads, m.d_ff
  products = {  # name: (einsum, lhs shape, rhs shape)
      "mlp": ("mk,kn->mn", (M, H), (H, F)),
      "mlp_grad_input": ("mn,kn->mk", (M, F), (H, F)),
      "mlp_grad_kernel": ("mk,mn->kn", (M, H), (M, F)),
      "scores": ("bik,bjk->bij", (BN, L, Hd), (BN, L, Hd)),
      "probs_values": ("bij,bjk->bik", (BN, L, L), (BN, L, Hd)),
      "scores_grad_keys": ("bij,bik->bjk", (BN, L, L), (BN, L, Hd)),
  }

  result = {}
  rng = np.random.default_rng(0)
  for name, (spec, lhs_shape, rhs_shape) in products.items():
    lhs, rhs = (rng.standard_normal(s, np.float32) for s in (lhs_shape, rhs_shape))
    product = jax.jit(lambda a, b, spec=spec: jnp.einsum(spec, a, b))
    jax_lhs, jax_rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    torch_lhs, torch_rhs = torch.from_numpy(lhs), torch.from_numpy(rhs)
    jax_s = float(np.median(_times(lambda: product(jax_lhs, jax_rhs), repeats)))
    torch_s = float(np.median(_times(lambda: torch.einsum(spec, torch_lhs, torch_rhs), repeats)))
    out_shape = jax.eval_shape(product, jax_lhs, jax_rhs).shape
    contracted = lhs.size // math.prod(out_shape[:-1])  # the summed dim's size
    flops = 2 * math.prod(out_shape) * contracted
    result[f"matmul_{name}_gflops"] = flops / jax_s / 1e9
    result[f"matmul_{name}_over_torch"] = torch_s / jax_s
  return result


def _nanogpt_block(m, torch):
  """A transformer block written the way nanoGPT's model.py writes it: fused QKV projection,
  F.scaled_dot_product_attention(is_causal=True), tanh GELU, pre-LayerNorm with biases."""
  nn, F = torch.nn, torch.nn.functional

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln_1, self.ln_2 = nn.LayerNorm(m.d_model), nn.LayerNorm(m.d_model)
      self.c_attn = nn.Linear(m.d_model, 3 * m.d_model)
      self.c_proj = nn.Linear(m.d_model, m.d_model)
      self.c_fc, self.mlp_proj = nn.Linear(m.d_model, m.d_ff), nn.Linear(m.d_ff, m.d_model)

    def forward(self, x):
      B, T, C = x.shape
      q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
      heads = lambda t: t.view(B, T, m.num_heads, C // m.num_heads).transpose(1, 2)
      y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
      x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
      return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

  return Block()


def _nanogpt(vocab: int, m, torch):
  """A GPT of `_nanogpt_block`s, with nanoGPT's learned positions and the head tied to the
  token embedding."""
  nn = torch.nn

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte, self.wpe = nn.Embedding(vocab, m.d_model), nn.Embedding(m.max_len, m.d_model)
      self.blocks = nn.ModuleList(_nanogpt_block(m, torch) for _ in range(m.num_layers))
      self.ln_f = nn.LayerNorm(m.d_model)
      self.lm_head = nn.Linear(m.d_model, vocab, bias=False)
      self.lm_head.weight = self.wte.weight  # tied

    def forward(self, idx):
      x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
      for block in self.blocks:
        x = block(x)
      return self.lm_head(self.ln_f(x))

  return GPT()


def _torch_steps(cfg, forward, model, torch, torch_compile: bool = True):
  """`run(n)`: n train steps of torch.compile(forward) (cross-entropy, AdamW, gradient
  clipping), after the steps that compile it; with `torch_compile=False`, of forward itself."""
  tr, vocab = cfg.train, max(cfg.model.vocab_size, cfg.tokenizer.vocab_size)
  optimizer = torch.optim.AdamW(model.parameters(), lr=tr.lr, betas=(tr.b1, tr.b2),
                                weight_decay=tr.weight_decay)
  micro = tr.batch_size // tr.grad_accum
  tokens = torch.randint(0, vocab, (tr.grad_accum, micro, cfg.data.max_length + 1))
  compiled = torch.compile(forward) if torch_compile else forward

  def step():
    for a in range(tr.grad_accum):
      inputs, targets = tokens[a, :, :-1], tokens[a, :, 1:]
      logits = compiled(inputs)
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
      (loss / tr.grad_accum).backward()
    if tr.grad_clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  def run(n: int) -> None:
    for _ in range(n):
      step()

  run(2)  # the first steps compile (forward, then backward) and warm up
  return run


def _hf_gpt2(cfg):
  """transformers' GPT2LMHeadModel of the model config's shape, random, for inference."""
  try:
    import transformers
  except ImportError:
    raise UserError("--compare_hf needs torch and transformers "
                    "(pip install torch==2.13.0 transformers)") from None
  return transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model,
      n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff, bos_token_id=None,
      eos_token_id=None)).eval()


def _hf_gpt2_decode(cfg, prompt, new_tokens: int, repeats: int) -> dict:
  """transformers' GPT-2 `generate` (CPU torch, KV cache) on a model of the same shape."""
  model = _hf_gpt2(cfg)
  import torch
  ids = torch.tensor(np.asarray(prompt), dtype=torch.long)

  def run(n):
    with torch.no_grad():
      return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, pad_token_id=0)

  def best(n):
    run(n)
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      run(n)
      times.append(time.perf_counter() - start)
    return min(times)

  prefill, total = best(1), best(new_tokens)
  batch, prompt_len = ids.shape
  return {"transformers_prefill_tokens_per_sec": batch * prompt_len / prefill,
          "transformers_decode_tokens_per_sec": batch * (new_tokens - 1) / (total - prefill)}


def bench_evaluate(cfg, examples: int, context_len: int, choice_len: int, batch_size: int,
                   compare_hf: bool = False) -> dict:
  """Multiple-choice scoring at the config's model shape (random weights): `examples` examples
  of 4 choices, a `context_len`-token context and `choice_len`-token choices of random tokens,
  through loglikelihood.LogLikelihood after one untimed pass (which compiles); examples/s.
  With `compare_hf`, lm-evaluation-harness's Hugging Face backend on transformers' GPT-2 of the
  same shape, on the same token ids, in the same process."""
  import types
  from llm import loglikelihood
  config_lib.validate(cfg)
  model = model_lib.build(cfg.model, cfg.tokenizer.vocab_size)
  if context_len + choice_len > model.cfg.max_len + 1:
    raise UserError(f"context_len + choice_len is more than model.max_len + 1 = "
                    f"{model.cfg.max_len + 1}")
  params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 1), jnp.int32)))["params"])()
  rng = np.random.default_rng(0)
  ids = lambda n: rng.integers(0, model.cfg.vocab_size, n).tolist()
  requests = [(context, ids(choice_len)) for context in (ids(context_len)
                                                         for _ in range(examples))
              for _ in range(4)]
  scorer = loglikelihood.LogLikelihood(model, types.SimpleNamespace(bos_id=None, eot_id=0),
                                       sharding.make_mesh(cfg.mesh), cfg.mesh, batch_size)
  scorer(params, requests)  # compiles
  started = time.perf_counter()
  scorer(params, requests)
  result = {"examples_per_sec": examples / (time.perf_counter() - started),
            "requests_per_batch": batch_size}
  if compare_hf:
    seconds = _harness_hf_seconds(model.cfg, requests, batch_size)
    result["harness_hf_examples_per_sec"] = examples / seconds
    result["examples_per_sec_over_harness_hf"] = result["examples_per_sec"] * seconds / examples
  return result


def _harness_hf_seconds(cfg, requests, batch_size: int) -> float:
  """lm-evaluation-harness's HFLM scoring `requests` (token ids) with transformers' GPT-2 of
  the model's shape (CPU torch): the second of two passes."""
  try:
    import transformers
    from lm_eval.models.huggingface import HFLM
  except ImportError:
    raise UserError("--compare_hf needs torch, transformers and lm_eval "
                    "(pip install torch==2.13.0 transformers lm_eval[hf]==0.4.13)") from None
  # The tokenizer is never used (the requests are ids); HFLM reads its special tokens.
  tokenizer = transformers.GPT2TokenizerFast(vocab={"<|endoftext|>": 0}, merges=[],
                                             eos_token="<|endoftext|>",
                                             unk_token="<|endoftext|>")
  lm = HFLM(pretrained=_hf_gpt2(cfg), tokenizer=tokenizer,
            batch_size=batch_size, device="cpu")
  tagged = [(("", ""), context, choice) for context, choice in requests]
  lm._loglikelihood_tokens(tagged, disable_tqdm=True)
  started = time.perf_counter()
  lm._loglikelihood_tokens(tagged, disable_tqdm=True)
  return time.perf_counter() - started


def make_corpus(path: str, megabytes: int) -> str:
  """JSON lines of real text, `megabytes` of it: CPython's documentation and its standard
  library's sources, again and again."""
  if os.path.exists(path):
    return path
  import glob
  stdlib = os.path.dirname(os.__file__)
  texts = list(sources.embedded_corpus()["text"])
  for file in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
    try:
      texts.append(open(file, encoding="utf-8").read())
    except (UnicodeDecodeError, OSError):
      continue
  target, written = megabytes * 10**6, 0
  with open(path + ".tmp", "w") as f:
    while written < target:
      for text in texts:
        line = json.dumps({"text": text}) + "\n"
        f.write(line)
        written += len(line)
        if written >= target:
          break
  os.replace(path + ".tmp", path)
  return path


def _peak_rss_run(command: list[str]) -> tuple[float, float, str]:
  """(seconds, peak resident MB, stderr) of a command run to its end."""
  started = time.perf_counter()
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
  stderr = process.stderr.read()
  _, status, usage = os.wait4(process.pid, 0)
  if status:
    raise UserError(f"{' '.join(command[:4])} ... failed: {stderr.strip()[-500:]}")
  return time.perf_counter() - started, usage.ru_maxrss / 1024, stderr


def _config_flags() -> list[str]:
  """The command line's --config and --config.* flags, for a subprocess."""
  return [arg for arg in sys.argv[1:] if arg.startswith("--config")]


def bench_data(cfg, sizes_mb: list[int], workdir: str) -> dict:
  from llm import tokenizer as tokenizer_lib
  os.makedirs(workdir, exist_ok=True)
  cfg = config_lib.resolve(cfg)
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = tokenizer_lib.build(cfg, None, tmp)
  corpora = {mb: make_corpus(os.path.join(workdir, f"corpus-{mb}MB.jsonl"), mb)
             for mb in sizes_mb}
  result = {}
  for mb, corpus in corpora.items():  # the whole command: reading, tokenizing, writing
    out = os.path.join(workdir, f"shards-{mb}MB")
    shutil.rmtree(out, ignore_errors=True)
    seconds, rss, _ = _peak_rss_run(
        [sys.executable, "-m", "llm.prepare", *_config_flags(), f"--config.data.path={corpus}",
         "--config.data.hf_name=", f"--out={out}"])
    result[f"prepare_{mb}MB_seconds"] = seconds
    result[f"prepare_{mb}MB_peak_rss_mb"] = rss
  smallest, largest = min(sizes_mb), max(sizes_mb)
  result["peak_rss_largest_over_smallest"] = (result[f"prepare_{largest}MB_peak_rss_mb"]
                                              / result[f"prepare_{smallest}MB_peak_rss_mb"])

  # Throughput on the smallest corpus, side by side: the tokenizer's batch API alone on texts in
  # memory, then preparation as llm.prepare does it (the corpus streamed, tokenized, written).
  with open(corpora[smallest]) as f:
    texts = [json.loads(line)["text"] for line in f]
  started, tokens = time.perf_counter(), 0
  for i in range(0, len(texts), shards.BATCH):
    tokens += sum(map(len, tokenizer.encode_batch(texts[i:i + shards.BATCH])))
  result["tokenizer_tokens_per_sec"] = tokens / (time.perf_counter() - started)
  del texts
  out = os.path.join(workdir, "shards-throughput")
  shutil.rmtree(out, ignore_errors=True)
  stream = sources.open_documents(config_lib.replace(
      cfg, {"data.path": corpora[smallest], "data.hf_name": ""}).data, stream=True)
  started = time.perf_counter()
  prepared = shards.prepare(stream, tokenizer, "text", out, progress=False, source="bench")
  result["prepare_tokens_per_sec"] = prepared.index["tokens"] / (time.perf_counter() - started)
  result["prepare_over_tokenizer"] = (result["prepare_tokens_per_sec"]
                                      / result["tokenizer_tokens_per_sec"])
  shutil.rmtree(out, ignore_errors=True)

  # From `python -m llm.train` to its first step, on the largest corpus's shards.
  with tempfile.TemporaryDirectory() as run:
    metrics_file = os.path.join(run, "metrics.jsonl")
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "llm.train", f"--config={_config_file()}:tiny",
         *[f for f in _config_flags() if f.startswith("--config.tokenizer")],
         f"--config.data.prepared={os.path.join(workdir, f'shards-{largest}MB')}",
         "--config.train.steps=1", f"--workdir={run}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not (
        os.path.exists(metrics_file) and '"train"' in open(metrics_file).read()):
      time.sleep(0.05)
    result[f"first_step_on_{largest}MB_seconds"] = time.perf_counter() - started
    if process.wait():
      raise UserError(f"llm.train on the prepared corpus failed: {process.stderr.read()[-500:]}")
  return result


def _config_file() -> str:
  flag = next(arg for arg in sys.argv[1:] if arg.startswith("--config="))
  return flag.split("=", 1)[1].split(":")[0]


def main(argv):
  kinds = ("train", "generate", "data", "rl", "evaluate")
  if len(argv) != 2 or argv[1] not in kinds or FLAGS.config is None:
    raise UserError(f"usage: python -m llm.bench {'|'.join(kinds)} --config=configs/FILE.py")
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  if argv[1] == "train" and FLAGS.topology:
    result = bench_compile_for(FLAGS.config, FLAGS.topology)
    device = result.pop("device") + f" ({FLAGS.topology}, compiled ahead of time; estimates)"
  elif argv[1] == "train" and FLAGS.compare_packing:
    result = bench_packing(FLAGS.config, max(FLAGS.steps, 1))
  elif argv[1] == "train" and FLAGS.optimizers:
    result = bench_optimizers(FLAGS.config, max(FLAGS.steps, 1), FLAGS.optimizers)
  elif argv[1] == "train":
    against = None
    if FLAGS.compare_torch:
      against = lambda ours: {**_torch_train(FLAGS.config, max(FLAGS.steps, 1), ours),
                              **bench_block(FLAGS.config), **bench_attention(FLAGS.config),
                              **bench_matmuls(FLAGS.config)}
    result = bench_train(FLAGS.config, FLAGS.steps, FLAGS.profile, against)
  elif argv[1] == "rl":
    result = bench_rl(FLAGS.config, max(FLAGS.steps, 1))
  elif argv[1] == "evaluate":
    result = bench_evaluate(FLAGS.config, FLAGS.examples, FLAGS.context_len, FLAGS.choice_len,
                            FLAGS.requests_per_batch, FLAGS.compare_hf)
  elif argv[1] == "data":
    result = bench_data(FLAGS.config, [int(mb) for mb in FLAGS.corpus_mb], FLAGS.corpus_dir)
  elif FLAGS.topology:
    result = bench_generate_for(FLAGS.config, FLAGS.topology, FLAGS.batch, FLAGS.prompt_len,
                                FLAGS.new_tokens)
    device = result.pop("device") + f" ({FLAGS.topology}, compiled ahead of time; estimates)"
  else:
    result = bench_generate(FLAGS.config, FLAGS.batch, FLAGS.prompt_len, FLAGS.new_tokens,
                            FLAGS.repeats, FLAGS.compare_hf)
  print(f"{argv[1]} on {device}:")
  for key, value in result.items():
    print(f"  {key}: {'n/a' if value is None else value if isinstance(value, bool) else f'{value:,.4g}'}")


if __name__ == "__main__":
  cli.run(main, define_flags)
