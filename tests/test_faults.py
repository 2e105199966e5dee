"""Faults: kills, preemption, divergence, damaged checkpoints, a full disk, two runs at once."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, read_metrics, tiny_config
from llm import preemption, rundir, runs
from llm.errors import UserError
from llm.train import train

# Its tests share module fixtures: one pytest-xdist worker runs them all.
pytestmark = pytest.mark.xdist_group("faults")


# Dropout and gradient accumulation on: a resumed run must draw the same masks and micro-batches.
FAULT_RUN = {"model.d_model": 64, "model.d_ff": 128, "model.num_heads": 4, "train.steps": 24,
             "train.checkpoint_every": 2, "train.eval_every": 8, "train.log_every": 1,
             "train.grad_accum": 2, "model.dropout": 0.1}


def _losses(workdir, split="train"):
  return {m["step"]: m["loss"] for m in read_metrics(workdir) if m["split"] == split}


def _config_file(tmp_path, overrides: dict) -> str:
  """A config file for `python -m llm.train` holding tiny_config(overrides)."""
  path = tmp_path / "fault_config.py"
  path.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
      "import pathlib\n"
      "from conftest import tiny_config\n"
      "def get_config(arg=None):\n"
      f"  return tiny_config(pathlib.Path({str(tmp_path)!r}), **{overrides!r})\n")
  return str(path)


def _start(config: str, workdir, *extra, launcher=()):
  return subprocess.Popen([*launcher, sys.executable, "-m", "llm.train", f"--config={config}",
                           f"--workdir={workdir}", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_step(workdir, step: int, process, timeout=120):
  """Until metrics.jsonl holds a train line of `step` (or the process ends)."""
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None:
    metrics = rundir.path(str(workdir), rundir.METRICS)
    if os.path.exists(metrics) and any(f'"step": {step}, "split": "train"' in line
                                       for line in open(metrics)):
      return
    time.sleep(0.05)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """An uninterrupted run."""
  tmp = tmp_path_factory.mktemp("straight")
  train(tiny_config(tmp, **FAULT_RUN), str(tmp / "run"))
  return tmp / "run"


@pytest.fixture(scope="module")
def straight(straight_run):
  """The training losses of the uninterrupted run."""
  return _losses(straight_run)


def test_kill_9_at_random_moments_loses_nothing(tmp_path, straight, straight_run):
  config, workdir = _config_file(tmp_path, FAULT_RUN), tmp_path / "run"
  rng = random.Random(0)
  for until_step in (3, 9, 15):  # three kills, while training or saving
    process = _start(config, workdir)
    _wait_for_step(workdir, until_step, process)
    time.sleep(rng.uniform(0.0, 0.3))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
  finished = _start(config, workdir)
  assert finished.wait(timeout=300) == 0, finished.stderr.read()[-3000:]
  assert _losses(workdir) == straight  # bit for bit
  assert _losses(workdir, "eval") == _losses(straight_run, "eval")
  steps = [m["step"] for m in read_metrics(workdir) if m["split"] == "train"]
  assert steps == sorted(set(steps)) == list(range(1, 25))  # each step exactly once


def _stop_at(config, workdir, step, send, launcher=()) -> int:
  """Starts (or resumes) the run, signals it once `step` is logged; returns the step it saved."""
  process = _start(config, workdir, launcher=launcher)
  _wait_for_step(workdir, step, process)
  send(process)
  _, err = process.communicate(timeout=180)
  assert process.returncode == preemption.EXIT_PREEMPTED, err[-3000:]
  stopped_at = max(_losses(workdir))
  assert err.count(f"preempted at step {stopped_at}, saved; run the same command to resume") == 1
  assert "Traceback" not in err
  assert _latest_step(workdir) == stopped_at < 24
  return stopped_at


def test_sigterm_and_ctrl_c_save_the_current_step_and_exit_for_requeueing(tmp_path, straight):
  config, workdir = _config_file(tmp_path, FAULT_RUN), tmp_path / "run"
  first = _stop_at(config, workdir, 5, lambda p: p.send_signal(signal.SIGTERM))
  second = _stop_at(config, workdir, first + 6, lambda p: p.send_signal(signal.SIGINT))
  assert second > first
  train(tiny_config(tmp_path, **FAULT_RUN), str(workdir))  # resumes to the end
  assert _losses(workdir) == straight


def test_two_processes_stop_together_on_ctrl_c_or_one_host_preempted(tmp_path, straight):
  overrides = {**FAULT_RUN, "mesh.data": 2}
  config, workdir = _config_file(tmp_path, overrides), tmp_path / "run"
  launcher = ("env", "DEVICES_PER_PROCESS=1", os.path.join(ROOT, "launch", "local.sh"), "2")

  def preempt_one_host(process):
    children = subprocess.run(["pgrep", "-f", "-s", str(process.pid), "llm.train"],
                              capture_output=True, text=True).stdout.split()
    os.kill(int(children[-1]), signal.SIGTERM)

  first = _stop_at(config, workdir, 5, lambda p: os.killpg(p.pid, signal.SIGINT), launcher)
  second = _stop_at(config, workdir, first + 6, preempt_one_host, launcher)
  assert second > first
  finished = _start(config, workdir, launcher=launcher)
  assert finished.wait(timeout=300) == 0, finished.stderr.read()[-3000:]
  resumed = _losses(workdir)
  assert sorted(resumed) == sorted(straight)  # 2 x 1 devices: the 1-device losses, to rounding
  np.testing.assert_allclose([resumed[s] for s in sorted(resumed)],
                             [straight[s] for s in sorted(straight)], rtol=2e-5)


def _latest_step(workdir):
  ckpt = rundir.checkpointer(str(workdir))
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


@pytest.mark.parametrize("log_every, checkpoint_every", [(10, 3), (1, 2)])
def test_divergence_never_saves_a_non_finite_checkpoint(tmp_path, log_every, checkpoint_every):
  import jax
  workdir = str(tmp_path / "run")
  cfg = tiny_config(tmp_path, **{"train.lr": 1e6, "train.steps": 12,
                                 "train.log_every": log_every,
                                 "train.checkpoint_every": checkpoint_every})
  with pytest.raises(UserError, match=r"non-finite at step \d+; that step was not applied"):
    train(cfg, workdir)
  assert _latest_step(workdir)  # what was saved before the divergence is there, and finite
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(runs.load(workdir).params))
  with pytest.raises(UserError, match="non-finite"):  # resumed as it is, it stops again
    train(cfg, workdir)


def _poison_batches(monkeypatch, bad_steps):
  """Batches whose loss weights are NaN at `bad_steps` (1-based): non-finite steps on demand."""
  from llm.data import batches
  original = batches.Batches.__next__

  def poisoned(self):
    step = self.step + 1
    batch = original(self)
    if step in bad_steps:
      batch["weights"] = batch["weights"] * np.nan
    return batch

  monkeypatch.setattr(batches.Batches, "__next__", poisoned)


def test_skip_mode_skips_bad_steps_and_recovers(tmp_path, monkeypatch):
  _poison_batches(monkeypatch, {4, 5})
  workdir = str(tmp_path / "run")
  cfg = tiny_config(tmp_path, **{"train.steps": 8, "train.on_nonfinite": "skip",
                                 "train.max_nonfinite": 3})
  train(cfg, workdir)
  lines = {m["step"]: m for m in read_metrics(workdir) if m["split"] == "train"}
  assert lines[4]["loss"] is None and lines[5]["loss"] is None
  assert [lines[s]["skipped_steps"] for s in (3, 4, 5, 8)] == [0, 1, 2, 2]
  assert all(np.isfinite(lines[s]["loss"]) for s in (6, 7, 8))
  assert lines[8]["loss"] < lines[1]["loss"]
  # Three in a row (the limit) stop the run, naming the step.
  _poison_batches(monkeypatch, {2, 3, 4})
  with pytest.raises(UserError, match=r"non-finite at step 4 \(3 in a row\)"):
    train(cfg, str(tmp_path / "run2"))


def test_a_second_run_on_a_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  other = subprocess.Popen(["sleep", "60"])
  import socket
  lock = workdir / rundir.LOCK
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid}))
  cfg = tiny_config(tmp_path, **{"train.steps": 2})
  with pytest.raises(UserError, match=f"in use by another run \\(process {other.pid}"):
    train(cfg, str(workdir))
  assert os.listdir(workdir) == [rundir.LOCK]  # nothing written
  other.kill()
  other.wait()
  train(cfg, str(workdir))  # the holder is gone: its lock is taken over
  assert "taking over" in capsys.readouterr().out
  assert not lock.exists()


def test_metrics_keep_each_step_once_across_restarts_and_torn_lines(tmp_path, capsys):
  workdir = tmp_path / "run"
  cfg = tiny_config(tmp_path, **{"train.steps": 4, "train.checkpoint_every": 4})
  train(cfg, str(workdir))
  # As if killed before the first checkpoint and mid-write: old lines and a torn one.
  import shutil
  shutil.rmtree(workdir / rundir.CHECKPOINTS)
  with open(workdir / rundir.METRICS, "a") as f:
    f.write('{"step": 3, "split": "tr')
  train(cfg, str(workdir))
  assert "torn" in capsys.readouterr().out
  steps = [m["step"] for m in read_metrics(workdir) if m["split"] == "train"]
  assert steps == [1, 2, 3, 4]


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
  cfg = tiny_config(tmp_path, **{"train.steps": 9, "train.checkpoint_every": 3})
  straight, damaged = tmp_path / "straight", tmp_path / "damaged"
  train(cfg, str(straight))
  train(cfg, str(damaged))
  for folder, _, names in os.walk(damaged / rundir.CHECKPOINTS / "9"):
    for name in names:  # every data file cut in half, as a disk fault would
      if os.path.basename(folder) == "d":
        path = os.path.join(folder, name)
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
  params = runs.load(str(damaged)).params  # sampling falls back too
  assert "checkpoints/9 does not load" in capsys.readouterr().out
  assert params
  train(tiny_config(tmp_path, **{"train.steps": 9, "train.checkpoint_every": 3}), str(damaged))
  assert _losses(damaged) == _losses(straight)


def test_a_full_disk_is_one_line_and_keeps_the_saved_checkpoints(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  original = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 6:
      raise OSError(errno.ENOSPC, "No space left on device")
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  workdir = str(tmp_path / "run")
  cfg = tiny_config(tmp_path, **{"train.steps": 9, "train.checkpoint_every": 3})
  with pytest.raises(UserError, match="could not save checkpoint 6 .*: the disk is full; the "
                                      "checkpoints saved before it are intact"):
    train(cfg, workdir)
  assert _latest_step(workdir) == 3
  monkeypatch.setattr(ocp.CheckpointManager, "save", original)
  train(cfg, workdir)  # room again: it resumes
  assert _latest_step(workdir) == 9
