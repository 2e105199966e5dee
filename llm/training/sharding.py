"""The device mesh, and how arrays are laid out on it.

The mesh has four axes: `data` (replicas), `fsdp` (batch and parameter shards), `expert` (a
mixture's experts; the batch too) and `tensor` (heads and MLP width). Models name their axes
logically; `mesh.rules` in the config maps those names to mesh axes, so a sharding ablation is a
config change.
"""

import contextlib
import os

import flax.linen as nn
from absl import flags
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from llm.errors import UserError

AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the global batch is split over these


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int, int]:
  """(data, fsdp, expert, tensor) with a -1 resolved; fails when the product is not the device
  count."""
  sizes = [mesh_cfg.get(axis, 1) for axis in AXES]  # a config.json older than an axis lacks it
  names = " x ".join(AXES)
  if -1 in sizes:
    rest = int(np.prod([s for s in sizes if s != -1]))
    if num_devices % rest:
      raise UserError(f"mesh: {num_devices} devices do not divide into "
                      f"{' x '.join('-1' if s == -1 else str(s) for s in sizes)} ({names}); "
                      f"choose sizes whose product is {num_devices}")
    sizes[sizes.index(-1)] = num_devices // rest
  if int(np.prod(sizes)) != num_devices:
    raise UserError(f"mesh: {names} = {' x '.join(map(str, sizes))} = "
                    f"{int(np.prod(sizes))} devices, but there are {num_devices}; choose sizes "
                    f"whose product is {num_devices} (one of them may be -1)")
  return tuple(sizes)


def check_batch(mesh_cfg, batch_size: int, grad_accum: int, num_devices: int = 0) -> None:
  """Each micro-batch splits evenly over the mesh's batch shards (data x fsdp x expert) of
  `num_devices` (default: all), or UserError."""
  data, fsdp, expert, _ = mesh_shape(mesh_cfg, num_devices or jax.device_count())
  micro, shards = batch_size // grad_accum, data * fsdp * expert
  if micro % shards:
    raise UserError(f"train.batch_size={batch_size} ({micro} sequences per micro-batch, "
                    f"train.grad_accum={grad_accum}) does not split over the mesh's "
                    f"{shards} batch shards (mesh.data x mesh.fsdp x mesh.expert = {data} x "
                    f"{fsdp} x {expert}); use a multiple of {shards * grad_accum}")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def rules(mesh_cfg) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in mesh_cfg.rules)


@contextlib.contextmanager
def activate(mesh: Mesh, mesh_cfg):
  """The mesh and the logical rules, for tracing code that constrains activations."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules(mesh_cfg)):
    yield


def logical_shardings(boxed_tree, mesh: Mesh, mesh_cfg):
  """NamedShardings for a tree whose leaves carry logical axis names (nn.LogicallyPartitioned).

  Leaves without names (step counters, RNG keys) are replicated, as are optimizer statistics
  that carry their parameter's names but not its shape (Adafactor's factored rows and columns,
  its [1] placeholders) where that shape does not split over the mesh.
  """
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)

  def sharding(x):
    if not is_box(x):
      return NamedSharding(mesh, P())
    shape = getattr(x.value, "shape", ())
    spec = nn.logical_to_mesh_axes(x.names, rules(mesh_cfg)) if len(x.names) == len(shape) \
        else P()
    named = NamedSharding(mesh, spec)
    try:
      named.shard_shape(shape)
    except ValueError:
      return NamedSharding(mesh, P())
    return named

  return jax.tree.map(sharding, boxed_tree, is_leaf=is_box)


def batch_sharding(mesh: Mesh, batch_dim: int = 1) -> NamedSharding:
  """Train batches are [grad_accum, micro_batch, ...] (batch_dim 1), eval batches
  [batch, ...] (batch_dim 0): the batch dimension is split over data, fsdp and expert."""
  return NamedSharding(mesh, P(*([None] * batch_dim), BATCH_AXES))


def global_batch(local_batch: dict, mesh: Mesh, batch_dim: int = 1) -> dict:
  """This process's share of the batch (numpy) -> global jax.Arrays on the mesh."""
  sharding = batch_sharding(mesh, batch_dim)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def define_distributed_flags() -> None:
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, for multi-host runs (found automatically on TPU "
                      "VMs and under SLURM).")
  flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")


def initialize_distributed() -> None:
  """Joins the processes of a multi-host run; a single process needs nothing.

  Flags win; else JAX finds the cluster itself (TPU VM metadata, SLURM's environment).
  """
  f = flags.FLAGS
  if f.coordinator_address or (f.num_processes or 0) > 1:
    # CPU devices (tests, launch/local.sh) talk through gloo; GPUs and TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f.coordinator_address,
                               num_processes=f.num_processes, process_id=f.process_id)
  elif _in_cluster():
    jax.distributed.initialize()


def _in_cluster() -> bool:
  return ("SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1) or (
      "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"])
