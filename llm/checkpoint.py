"""Checkpoints of a run: orbax CheckpointManager steps under DIR/checkpoints (rundir.checkpointer).

Each step holds the train state (params, optimizer state, step, RNG) and the data iterator's
position. Orbax writes a step to a temporary folder and renames it when complete, so a run
killed mid-save leaves the previous checkpoints as they were.
"""

import os

import jax
import orbax.checkpoint as ocp

from llm.errors import UserError


class Checkpointer:

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, abstract_state):
    """Restores straight into `abstract_state`'s shardings (any mesh, any device count)."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise UserError(f"checkpoint {self.directory}/{step} does not match this config "
                      f"({first[:300]}); use the run's own config.json or a new "
                      "--workdir") from None
    return restored.state, restored.data

  def restore_params(self, step: int, abstract_params):
    """The parameters alone, without the optimizer state: for sampling and evaluation."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              {"params": abstract_params},
              restore_args=ocp.checkpoint_utils.construct_restore_args({"params": abstract_params}),
              partial_restore=True)))
    except (ValueError, KeyError, TypeError) as e:
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise UserError(f"checkpoint {self.directory}/{step} does not match the run's config "
                      f"({first[:300]})") from None
    return restored.state["params"]

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with the target shardings: what orbax restores into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)

