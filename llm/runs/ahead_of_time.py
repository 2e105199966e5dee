"""A run's real train step compiled ahead of time for a TPU topology, from any machine (libtpu
describes the chips): per-chip memory against the chip's, and XLA's cost estimates with the
roofline they give. `python -m llm.bench train --topology=v5e:2x4` prints it."""

import dataclasses
import math
import tempfile
import time
from typing import Any

import jax
import numpy as np

from llm import config as config_lib
from llm import model as model_lib
from llm.errors import UserError
from llm.model import attention
from llm.runs.trainer import new_health, Trainer
from llm.training import metrics, sharding


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


@dataclasses.dataclass
class CompiledStep:
  compiled: Any  # jax.stages.Compiled
  trainer: Any
  state: dict  # abstract: shapes and shardings
  seconds: float  # to compile
  splash_kernel: bool  # whether the step holds the Mosaic splash-attention kernel


def compile_for(cfg, topology: str) -> CompiledStep:
  """The config's real train step (the Trainer's model, shardings and mesh rules) compiled for
  a TPU topology, its state abstract (shapes and shardings; nothing is made). The step is
  compiled for one micro-batch (grad_accum=1): XLA's cost model counts a loop's body about
  once, whatever its trip count, and the memory is a micro-batch's either way."""
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
