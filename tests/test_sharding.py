"""Sharding over 8 fake CPU devices and multi-host over 2 local processes.

Every configuration runs in a subprocess: the device count is fixed when JAX starts.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, read_metrics

# Its tests share module fixtures: one pytest-xdist worker runs them all.
pytestmark = [pytest.mark.xdist_group("sharding"), pytest.mark.slow]


HELPER = os.path.join(ROOT, "tests", "mesh_runs.py")


def _env(devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} " \
                     f"--xla_force_host_platform_device_count={devices}"
  return env


def _mesh_runs(tmp_path, devices, steps, *meshes, env=None):
  out = tmp_path / f"out-{devices}-{'-'.join(meshes)}.json"
  result = subprocess.run([sys.executable, HELPER, str(out), str(tmp_path), str(steps), *meshes],
                          env={**_env(devices), **(env or {})}, capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(out.read_text())


def _close(a, b):
  assert a.keys() == b.keys()
  np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-5)


@pytest.fixture(scope="module")
def rl_env(base_run, records):
  """Where the meshes' online RL runs (MESH:rl) start from."""
  return {"RL_BASE_RUN": base_run, "RL_RECORDS": records}


@pytest.fixture(scope="module")
def single_device_runs(tmp_path_factory, rl_env):
  return _mesh_runs(tmp_path_factory.mktemp("one"), 1, 6, "1x1x1", "1x1x1:llama", "1x1x1:rl",
                    "1x1x1x1:moe", "1x1x1x1:moe:cap",
                    env=rl_env)


@pytest.fixture(scope="module")
def single_device(single_device_runs):
  return single_device_runs["1x1x1"]


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory, rl_env):
  return _mesh_runs(tmp_path_factory.mktemp("eight"), 8, 6, "2x2x2", "2x2x2:llama", "2x2x2:rl",
                    "2x1x2x2:moe", "2x1x2x2:moe:cap",
                    env=rl_env)


def test_every_mesh_gives_the_single_device_losses(eight_devices, single_device_runs):
  runs = eight_devices
  _close(runs["2x2x2"]["losses"], single_device_runs["1x1x1"]["losses"])
  # Llama's blocks too, with its 2 key/value heads split over the tensor axis.
  _close(runs["2x2x2:llama"]["losses"], single_device_runs["1x1x1:llama"]["losses"])
  assert runs["2x2x2:llama"]["key_spec"] == ["fsdp", "tensor", None]
  # 2x2x2 has all three axes at once: data, fsdp and tensor parallelism. The token embedding
  # [vocab 512, embed 64] is really split: vocab over tensor, embed over fsdp.
  assert runs["2x2x2"]["wte_spec"] == ["tensor", "fsdp"]
  assert runs["2x2x2"]["wte_shard"] == [256, 32]


def test_experts_split_over_devices_give_the_single_device_losses(eight_devices,
                                                                 single_device_runs):
  """A mixture of experts (scanned, rematerialised, its router bias moving) on data x expert x
  tensor = 2 x 2 x 2: tokens travel to their experts by all-to-all, each expert's width is split
  over tensor; the losses are one device's, and so is greedy sampling. With a capacity (the
  experts as one batched product) too."""
  moe = eight_devices["2x1x2x2:moe"]
  _close(moe["losses"], single_device_runs["1x1x1x1:moe"]["losses"])
  _close(eight_devices["2x1x2x2:moe:cap"]["losses"],
         single_device_runs["1x1x1x1:moe:cap"]["losses"])
  assert moe["expert_spec"] == [None, "expert", "fsdp", "tensor"]  # [layers, E, D, F]
  assert moe["generate_equal"]


def test_sampling_with_parameters_split_over_devices(eight_devices):
  assert eight_devices["2x2x2"]["generate_spec"] == ["tensor", "fsdp"]
  assert eight_devices["2x2x2"]["generate_equal"]


def test_attention_split_over_devices(eight_devices):
  # Values and gradients of the TPU kernel (Pallas's interpreter here), split over 2x2x2, equal
  # XLA's attention on one device.
  out_error, grad_error = eight_devices["2x2x2"]["splash_errors"]
  assert out_error < 2e-6 and grad_error < 2e-6


def test_online_rl_on_a_mesh_gives_the_single_device_steps(eight_devices, single_device_runs):
  """GRPO's rollouts sampled with parameters split over 2x2x2, then two optimizer passes over
  each, and the held-out prompts answered: the same completions, rewards, losses and
  evaluation as on one device."""
  one, eight = single_device_runs["1x1x1:rl"], eight_devices["2x2x2:rl"]
  assert one.keys() == eight.keys() == {*(f"train {s}" for s in range(1, 7)), "eval 6"}
  np.testing.assert_allclose([eight[s] for s in one], [one[s] for s in one], rtol=1e-4,
                             atol=1e-6)
  # The second pass's ratio π/π_old has moved from 1: the rollout's log-probabilities were kept.
  assert one["train 1"][2] > 0


def test_checkpoint_moves_between_meshes_and_layer_layouts(tmp_path, single_device):
  # Steps 1-3 on 2x2x2 with scanned layers, then the same directory resumes on one device,
  # unrolled, for steps 4-6: every loss is the single-device unrolled run's.
  _mesh_runs(tmp_path, 8, 3, "2x2x2:scan")
  os.rename(tmp_path / "run-2x2x2:scan", tmp_path / "run-1x1x1")
  resumed = _mesh_runs(tmp_path, 1, 6, "1x1x1")["1x1x1"]
  _close(resumed["losses"], single_device["losses"])


def test_two_processes_reading_their_shards_equal_one(tmp_path, eight_devices):
  """Each of 2 processes reads its share of each batch from prepared shards (memory-mapped);
  together they train as 1 process on the token stream it tokenized itself."""
  from mesh_runs import sharding_config
  from llm import prepare
  shards = str(tmp_path / "shards")
  prepare.prepare(sharding_config(tmp_path, "2x2x2", 6), shards, documents_per_shard=10,
                  progress=False)
  one = eight_devices["2x2x2"]["losses"]
  workdir = tmp_path / "multi"
  code = ("import sys, pathlib; sys.path.insert(0, 'tests'); from mesh_runs import sharding_config;"
          "from llm.runs.trainer import train; from llm.training import sharding; from absl import flags;"
          "sharding.define_distributed_flags(); flags.FLAGS(sys.argv);"
          "sharding.initialize_distributed();"
          f"cfg = sharding_config(pathlib.Path({str(tmp_path)!r}), '2x2x2', 6);"
          f"cfg.data.prepared = {shards!r}; cfg.data.cache_dir = 'nowhere';"
          f"train(cfg, {str(workdir)!r})")
  result = subprocess.run(
      ["launch/local.sh", "2", sys.executable, "-c", code], cwd=ROOT, capture_output=True,
      text=True, env=dict(os.environ, DEVICES_PER_PROCESS="4"), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  multi = {m["step"]: m["loss"] for m in read_metrics(workdir) if m["split"] == "train"}
  _close({str(k): v for k, v in multi.items()}, one)
  assert not os.path.exists(os.path.join(ROOT, "nowhere"))  # nothing tokenized
