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

from conftest import ROOT, config_file, read_metrics, tiny_config
from llm.errors import UserError
from llm.runs import loading, rundir
from llm.runs.trainer import train
from llm.training import preemption

# Its tests share module fixtures: one pytest-xdist worker runs them all.
pytestmark = [pytest.mark.xdist_group("faults"), pytest.mark.slow]


# Dropout and gradient accumulation on: a resumed run must draw the same masks and micro-batches.
FAULT_RUN = {"model.d_model": 64, "model.d_ff": 128, "model.num_heads": 4, "train.steps": 24,
             "train.checkpoint_every": 2, "train.eval_every": 8, "train.log_every": 1,
             "train.grad_accum": 2, "model.dropout": 0.1}


def _losses(workdir, split="train"):
  return {m["step"]: m["loss"] for m in read_metrics(workdir) if m["split"] == split}


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
  config, workdir = config_file(tmp_path, FAULT_RUN), tmp_path / "run"
  rng = random.Random(0)
  for until_step in (3, 9, 15):  # three kills, while training or saving
    process = _start(config, workdir)
    _wait_for_step(workdir, until_step, process)
    time.sleep(rng.uniform(0.0, 0.3))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=600)
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
  config, workdir = config_file(tmp_path, FAULT_RUN), tmp_path / "run"
  first = _stop_at(config, workdir, 5, lambda p: p.send_signal(signal.SIGTERM))
  second = _stop_at(config, workdir, first + 6, lambda p: p.send_signal(signal.SIGINT))
  assert second > first
  train(tiny_config(tmp_path, **FAULT_RUN), str(workdir))  # resumes to the end
  assert _losses(workdir) == straight


def test_two_processes_stop_together_on_ctrl_c_or_one_host_preempted(tmp_path, straight):
  overrides = {**FAULT_RUN, "mesh.data": 2}
  config, workdir = config_file(tmp_path, overrides), tmp_path / "run"
  launcher = ("env", "DEVICES_PER_PROCESS=1", os.path.join(ROOT, "launch", "local.sh"), "2")

  def preempt_one_host(process):
    children = subprocess.run(["pgrep", "-f", "-s", str(process.pid), "llm.train"],
                              capture_output=True, text=True, timeout=60).stdout.split()
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


# Moments of a start-up (see conftest.signal_in), in the order a fresh run reaches them. The
# last is inside the train loop: the first step's compile, which the run finishes and saves.
START_UP = [("llm.text.sentencepiece:SentencePieceTokenizer.train", "SIGINT"),  # training a tokenizer
            ("llm.data.shards:encode_documents", "SIGTERM"),  # tokenizing the corpus
            ("optax.tree:norm", "SIGTERM")]  # tracing the train step, to compile it


def _leftovers(tmp_path) -> list[str]:
  """Temporary files and folders anywhere under tmp_path: what a stopped write left."""
  return [str(p) for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or "-tmp" in p.name]


def _stopped(config, workdir, launcher=()) -> str:
  """Runs the command to its end: exit 75, one line saying so, no traceback; returns stderr."""
  process = _start(config, workdir, launcher=launcher)
  _, err = process.communicate(timeout=300)
  assert process.returncode == preemption.EXIT_PREEMPTED, err[-3000:]
  said = err.count("nothing is left half-written") + err.count("preempted at step")
  assert said == 1 and "Traceback" not in err and "Fatal" not in err, err[-3000:]
  return err


@pytest.mark.parametrize("processes", [2])  # one process: tests/test_start_up_signals.py
def test_a_signal_at_each_start_up_phase_exits_75_and_the_rerun_trains_the_same(
    tmp_path, straight, processes):
  overrides = {**FAULT_RUN, "mesh.data": processes}
  launcher = () if processes == 1 else (
      "env", "DEVICES_PER_PROCESS=1", os.path.join(ROOT, "launch", "local.sh"), "2")
  workdir = tmp_path / "run"
  for number, (target, signal_name) in enumerate(START_UP):
    config = config_file(tmp_path, overrides, [(target, signal_name)], name=f"phase{number}.py")
    err = _stopped(config, workdir, launcher)
    assert _leftovers(tmp_path) == [], err[-2000:]
    if target.startswith("optax"):  # inside the loop: the step is finished and saved
      assert "preempted at step" in err
    else:  # nothing to save; at once on one process (on several, JAX's service holds a
      assert "stopped by" in err  # SIGTERM until the loop starts: see llm/training/preemption.py)
      assert processes > 1 or not os.path.exists(workdir / rundir.CONFIG)
  finished = _start(config_file(tmp_path, overrides), workdir, launcher=launcher)
  assert finished.wait(timeout=300) == 0, finished.stderr.read()[-3000:]
  resumed = _losses(workdir)
  assert sorted(resumed) == sorted(straight)
  np.testing.assert_allclose([resumed[s] for s in sorted(resumed)],
                             [straight[s] for s in sorted(straight)], rtol=2e-5)


def test_ctrl_c_twice_during_a_save_quits_at_once_and_the_next_start_resumes(tmp_path, straight):
  """The first Ctrl-C as step 2's save starts (saved at step 3); the second as step 3's save is
  under way: exit 130 at once, and step 3 half-written at most."""
  config = config_file(tmp_path, FAULT_RUN, [
      ("llm.training.checkpoint:Checkpointer.save", "SIGINT", 1),
      ("orbax.checkpoint:CheckpointManager.save", "SIGINT", 2, True)])
  workdir = tmp_path / "run"
  process = _start(config, workdir)
  _, err = process.communicate(timeout=300)
  assert process.returncode == preemption.EXIT_INTERRUPTED, err[-3000:]
  assert err.count("SIGINT again: quitting at once") == 1 and "Traceback" not in err, err
  assert _latest_step(workdir) in (2, 3)
  finished = _start(config_file(tmp_path, FAULT_RUN, name="again.py"), workdir)
  assert finished.wait(timeout=300) == 0, finished.stderr.read()[-3000:]
  assert _leftovers(tmp_path) == []
  assert _losses(workdir) == straight


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
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(loading.load(workdir).params))
  with pytest.raises(UserError, match="non-finite"):  # resumed as it is, it stops again
    train(cfg, workdir)


def _poison_batches(monkeypatch, bad_steps):
  """Batches whose loss weights are NaN at `bad_steps` (1-based): non-finite steps on demand."""
  from llm.data import batches
  original = batches.Batches.__next__

  def poisoned(self):
    step = self.drawn // self.batch_size + 1
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


def test_an_evaluation_that_fails_loses_no_training_and_runs_again_on_resume(
    tmp_path, monkeypatch):
  from llm.runs.trainer import Trainer
  cfg = lambda: tiny_config(tmp_path, **{"train.steps": 6, "train.eval_every": 3,
                                          "train.checkpoint_every": 100})
  straight = tmp_path / "straight"
  train(cfg(), str(straight))
  original = Trainer.evaluators

  def failing(self):
    evaluators = original(self)
    def out_of_memory(*args):
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while evaluating")
    return {**evaluators, "eval": out_of_memory}

  monkeypatch.setattr(Trainer, "evaluators", failing)
  workdir = tmp_path / "run"
  with pytest.raises(RuntimeError, match="out of memory"):
    train(cfg(), str(workdir))
  assert _latest_step(workdir) == 3  # saved before it was evaluated
  assert _losses(workdir) == {s: l for s, l in _losses(straight).items() if s <= 3}
  monkeypatch.setattr(Trainer, "evaluators", original)
  train(cfg(), str(workdir))  # resumes from step 3, and evaluates step 3 first
  lines = lambda run: [(m["step"], m["split"], m["loss"]) for m in read_metrics(run)]
  assert lines(workdir) == lines(straight)  # every step and evaluation once, in order


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
  other.wait(timeout=600)
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
  params = loading.load(str(damaged)).params  # sampling falls back too
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


def _refused(cfg, workdir, match: str):
  """train() stops with one UserError matching `match`, and writes nothing in `workdir`."""
  before = sorted(os.listdir(workdir)) if os.path.isdir(workdir) else None
  with pytest.raises(UserError, match=match):
    train(cfg, str(workdir))
  assert (sorted(os.listdir(workdir)) if os.path.isdir(workdir) else None) == before


def test_bad_inputs_are_one_line_naming_the_cause_before_anything_is_written(
    tmp_path, straight_run, capsys):
  records = [{"text": "a sentence of the corpus " * 20} for _ in range(30)]
  number, null = tmp_path / "number.jsonl", tmp_path / "null.jsonl"
  number.write_text("\n".join(json.dumps(r) for r in records[:7] + [{"text": 12345}]
                              + records[8:]))
  null.write_text("\n".join(json.dumps(r) for r in records[:7] + [{"text": None}] + records[8:]))
  on = lambda path, **more: tiny_config(tmp_path, **{"data.path": str(path), **more})
  _refused(on(number), tmp_path / "a", r"number.jsonl: record 8 \(counting from 1\) has "
           "text=12345, not text")
  train(on(null, **{"train.steps": 1, "tokenizer.vocab_size": 280}), str(tmp_path / "b"))
  assert "record 8 of " in capsys.readouterr().out  # said, and trained on the rest

  (tmp_path / "file").write_text("")
  _refused(tiny_config(tmp_path), tmp_path / "file" / "run", "is a file, not a folder")
  (tmp_path / "c" / rundir.METRICS).mkdir(parents=True)
  _refused(tiny_config(tmp_path), tmp_path / "c", "metrics.jsonl should be a file")
  (tmp_path / "short.txt").write_text("abc")
  _refused(on(tmp_path / "short.txt"), tmp_path / "d", r"the text is too short \(3 characters\)")
  mlm = tiny_config(tmp_path, **{"task.kind": "mlm"})
  mlm.init_from = str(straight_run)
  _refused(mlm, tmp_path / "e", "not 'gpt' \\(the model of init_from=")

  resumed = tmp_path / "f"
  train(tiny_config(tmp_path, **{"train.steps": 2}), str(resumed))
  _refused(tiny_config(tmp_path, **{"train.steps": 4, "model.d_model": 64}), resumed,
           "model.d_model=64, but the run being resumed has 32")
  config = json.loads((resumed / rundir.CONFIG).read_text())
  config["data"]["stride"] = 8  # a hand edit
  (resumed / rundir.CONFIG).write_text(json.dumps(config))
  _refused(tiny_config(tmp_path, **{"train.steps": 4}), resumed, "data.stride=16, but the run "
           "being resumed has 8")
  config["data"]["stride"] = 16
  (resumed / rundir.CONFIG).write_text(json.dumps(config))
  capsys.readouterr()
  train(tiny_config(tmp_path, **{"train.steps": 4, "train.batch_size": 4}), str(resumed))
  assert ("train.batch_size: 8 -> 4 (the data goes on with the next example the run has not "
          "seen)") in capsys.readouterr().out


def test_a_batch_that_does_not_split_over_the_mesh_stops_before_anything_is_written(tmp_path):
  config = config_file(tmp_path, {"train.batch_size": 3, "mesh.data": 2})
  process = subprocess.run(
      [sys.executable, "-m", "llm.train", f"--config={config}", f"--workdir={tmp_path / 'run'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"]
           + " --xla_force_host_platform_device_count=2"})
  assert process.returncode == 2
  assert process.stderr.strip().splitlines() == [
      "error: train.batch_size=3 (3 sequences per micro-batch, train.grad_accum=1) does not "
      "split over the mesh's 2 batch shards (mesh.data x mesh.fsdp x mesh.expert = 2 x 1 x 1); "
      "use a multiple of 2"]
  assert not (tmp_path / "run").exists()


def test_to_hf_replaces_only_its_own_export_unless_told_to_overwrite(tmp_path, straight_run):
  from llm import convert
  out = tmp_path / "hf"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="holds other files \\(notes.txt\\); choose an empty "
                                      "folder, or add --overwrite"):
    convert.to_hf(str(straight_run), str(out))
  assert os.listdir(out) == ["notes.txt"]
  convert.to_hf(str(straight_run), str(out), overwrite=True)
  first = sorted(os.listdir(out))
  assert "notes.txt" not in first and "model.safetensors" in first
  (out / "stale.bin").write_text("from an earlier export")
  convert.to_hf(str(straight_run), str(out))  # its own export: replaced whole
  assert sorted(os.listdir(out)) == first
  assert _leftovers(tmp_path) == []
