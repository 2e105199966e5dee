"""A signal at random moments of start-up: during imports, reading, tokenizing, the reference
pass, rollouts and the first compile, of LM, DPO and GRPO runs. Its own file (not test_faults's
worker group): it shares no fixture with those tests, and runs beside them."""

import os
import random
import signal
import time

import pytest

from conftest import config_file, read_metrics
from llm.runs import rundir
from llm.training import preemption
from test_faults import _latest_step, _leftovers, _start

pytestmark = pytest.mark.slow


def test_a_signal_at_random_moments_of_start_up_exits_75_and_the_rerun_resumes(
    tmp_path, base_run, records):
  """20 starts signalled at seeded moments, in turn LM, DPO and GRPO: 15 in the first four
  seconds (importing, reading, training a tokenizer, tokenizing, the DPO reference pass), 5
  within a second and a half of the line the train loop prints as it starts (the first step's
  compile: where XLA's compile thread once crashed the exit)."""
  rng = random.Random(0)
  makes = {"lm": ("tiny_config",), "dpo": ("preference_config", base_run, records, "dpo"),
           "grpo": ("test_rl.rl_config", base_run, records)}
  outcomes = {"stopped by": 0, "preempted at step": 0}  # before the loop, and in it
  deadline = time.time() + 900  # the loop stops by itself
  for number in range(20):
    assert time.time() < deadline, f"{number} starts in 15 minutes"
    kind = ("lm", "dpo", "grpo")[number % 3]
    overrides = {"train.steps": 10_000, "train.checkpoint_every": 1}  # never ends on its own
    (tmp_path / kind).mkdir(exist_ok=True)
    config = config_file(tmp_path / kind, overrides, name="signalled.py", make=makes[kind])
    process = _start(config, tmp_path / kind / "run")
    if number % 4 == 1:  # starts 1, 5, 9, 13, 17: DPO, GRPO, LM, DPO, GRPO
      for line in process.stdout:  # "N parameters; M tokens per step; starting at step S"
        if "tokens per step" in line:
          break
      time.sleep(rng.uniform(0.0, 1.5))
    else:
      time.sleep(rng.uniform(0.0, 4.0))
    process.send_signal(rng.choice([signal.SIGTERM, signal.SIGINT]))
    _, err = process.communicate(timeout=300)
    assert process.returncode == preemption.EXIT_PREEMPTED, (kind, err[-3000:])
    said = {line: err.count(line) for line in outcomes}
    assert sum(said.values()) == 1, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert _leftovers(tmp_path) == [], err[-2000:]
    outcomes = {line: outcomes[line] + said[line] for line in outcomes}
  assert min(outcomes.values()) >= 2, outcomes  # both phases were hit
  for kind, make in makes.items():  # the same command, let run: it resumes and ends
    workdir = tmp_path / kind / "run"
    saved = (_latest_step(workdir) if os.path.isdir(workdir / rundir.CHECKPOINTS) else 0) or 0
    config = config_file(tmp_path / kind, {"train.steps": saved + 2}, name="end.py", make=make)
    finished = _start(config, workdir)
    _, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err[-3000:]
    steps = [m["step"] for m in read_metrics(workdir) if m["split"] == "train"]
    assert steps == list(range(1, saved + 3)), (kind, steps)  # each step once
