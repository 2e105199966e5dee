"""Checkpoints of a run: orbax CheckpointManager steps under DIR/checkpoints (rundir.checkpointer).

Each step holds the train state (params, optimizer state, step, RNG) and the data iterator's
position. Orbax writes a step in the background into a temporary folder and renames it when it
is complete, so a run killed mid-save leaves the previous checkpoints as they were. A step that
was damaged afterwards (a file truncated or deleted) is skipped on restore, with a warning, for
the newest one that loads.

Checkpoints load whichever way the blocks were laid out when they were saved (unrolled
block_0 ... or scanned `blocks`, model.scan_layers): they are read in their own layout and
converted to the config's on the devices.
"""

import contextlib
import errno
import os
import re

import jax
import orbax.checkpoint as ocp
from etils import epath

from llm.errors import UserError
from llm.model import layers


class Checkpointer:

  def __init__(self, directory: str, keep: int, trains: bool = False):
    """`trains`: opened by the run that saves here (holding its lock), which removes what a
    save stopped halfway left; a reader must not, a save may be in progress."""
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=trains))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    """Starts saving `step` (orbax finishes it in the background while training goes on)."""
    with _disk_errors(self.directory, step):
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def restore(self, abstract_state) -> tuple[int, dict, dict]:
    """(step, state, data position) of the newest checkpoint that loads, restored straight into
    `abstract_state`'s shardings (any mesh, any device count)."""
    def restore(step):
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(self._as_saved(step, abstract_state)),
          data=ocp.args.JsonRestore()))
      return _relayout(restored.state, abstract_state), restored.data
    step, (state, data) = self._newest_that_loads(restore, "this config")
    return step, state, data

  def restore_params(self, abstract_params, key: str = "params") -> dict:
    """The newest loadable checkpoint's parameters alone (`key`: "params", or "ema" for their
    moving average), without the optimizer state: for sampling and evaluation."""
    return self.restore_parts({key: abstract_params})[key]

  def restore_parts(self, abstract_parts: dict) -> dict:
    """Some of the newest loadable checkpoint's state: {key: its abstract tree}, e.g. the
    parameters and the optimizer state that schedule-free's evaluation point needs."""
    def restore(step):
      saved = {k: self._as_saved(step, v) for k, v in abstract_parts.items()}
      parts = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              saved, restore_args=ocp.checkpoint_utils.construct_restore_args(saved),
              partial_restore=True))).state
      return {k: _relayout(parts[k], v) for k, v in abstract_parts.items()}
    return self._newest_that_loads(restore, "the run's config")[1]

  def _as_saved(self, step: int, abstract):
    """`abstract` in the block layout of checkpoint `step`."""
    metadata = ocp.StandardCheckpointHandler().metadata(
        epath.Path(self.directory) / str(step) / "state")
    scanned = layers.is_scanned(metadata.tree)
    return abstract if scanned is None else layers.to_layout(abstract, scanned)

  def _newest_that_loads(self, restore, what: str):
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise UserError(f"{self.directory} holds no checkpoint yet")
    reasons = []
    for step in steps:
      try:
        return step, restore(step)
      except Exception as e:  # orbax and tensorstore raise many types
        if not _is_damage(e):
          raise UserError(f"checkpoint {self.directory}/{step} does not match {what} "
                          f"({_first_line(e)[:300]}); use the run's own config.json or a new "
                          "--workdir") from None
        reasons.append((step, _first_line(e)))  # damaged: a file missing or cut short
      print(f"warning: checkpoint {self.directory}/{step} does not load "
            f"({reasons[-1][1][:200]}); trying the one before")
    raise UserError(f"no checkpoint in {self.directory} loads; the newest, step {steps[0]}: "
                    f"{reasons[0][1][:300]}")

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for a save in progress to finish."""
    with _disk_errors(self.directory, self.manager.latest_step()):
      self.manager.wait_until_finished()
    self.manager.close()


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _is_damage(e: Exception) -> bool:
  """A file of the checkpoint missing or unreadable (rather than a tree that does not fit)."""
  return isinstance(e, OSError) or bool(re.search(
      r"NOT_FOUND|DATA_LOSS|OUT_OF_RANGE|Error (reading|opening)|No such file", str(e)))


@contextlib.contextmanager
def _disk_errors(directory: str, step):
  """An OSError while saving (a full disk, an unwritable folder) as one line; the checkpoints
  saved before it stay intact."""
  try:
    yield
  except Exception as error:  # orbax may wrap the OSError of its background save
    cause = error
    while cause is not None and not isinstance(cause, OSError):
      cause = cause.__cause__ or cause.__context__
    if cause is None:
      raise
    reason = "the disk is full" if cause.errno == errno.ENOSPC else (
        cause.strerror or _first_line(cause))
    raise UserError(f"could not save checkpoint {step} in {directory}: {reason}; the "
                    "checkpoints saved before it are intact; make room and run the same command "
                    "again to resume") from None


def _relayout(tree, abstract):
  """A restored tree in `abstract`'s block layout, placed on its shardings."""
  if layers.is_scanned(tree) == layers.is_scanned(abstract):
    return tree
  to_layout = lambda t: layers.to_layout(t, layers.is_scanned(abstract))
  return jax.jit(to_layout, out_shardings=jax.tree.map(lambda a: a.sharding, abstract))(tree)


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with the target shardings: what orbax restores into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)
