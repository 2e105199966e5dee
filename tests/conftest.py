"""Shared test helpers: tiny configs, the repository's test data."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Many tests compile the same tiny model: XLA's persistent cache, shared with the subprocesses the
# tests start, compiles each computation once per session (the same executables, so the same
# numbers) instead of once per run. Set before jax is imported.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _cache = tempfile.mkdtemp(prefix="llm-tests-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
# The suite compiles far more than it computes: XLA's CPU backend without its LLVM optimisations
# compiles about 40% faster. Every comparison in the suite is between runs under the same flags,
# or against a reference within a tolerance. Inherited by the subprocesses the tests start.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()
TEST_DATA = os.path.join(ROOT, "tests", "data")  # small public files; see tests/data/README.md


def tiny_config(tmp_path, **overrides):
  """A GPT small enough to compile in seconds, on the embedded corpus."""
  from llm.config import base_config
  c = base_config()
  c.model.update(num_layers=2, num_heads=2, d_model=32, d_ff=64, max_len=32)
  c.tokenizer.vocab_size = 512
  c.data.update(max_length=16, stride=16, cache_dir=str(tmp_path / "cache"))
  c.train.update(steps=6, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=2, log_every=1,
                 eval_every=3, eval_batches=2, checkpoint_every=3, peak_flops=1e9)
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def train_classifier_from(tmp_path, init_from: str, trainable: str) -> str:
  """Two steps of a yes/no classifier fine-tuned from `init_from`; returns its run directory."""
  from llm.config import base_config
  from llm.train import train
  rows = ["label,text"] + [f"{('no', 'yes')[i % 2]},sentence number {i}" for i in range(20)]
  (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
  cfg = base_config()
  cfg.init_from = init_from
  cfg.task.kind = "classify"
  cfg.data.update(path=str(tmp_path / "data.csv"), max_length=0, val_fraction=0.2,
                  cache_dir=str(tmp_path / "cache"))
  cfg.train.update(steps=2, batch_size=4, trainable=trainable, log_every=1, eval_every=2,
                   checkpoint_every=2, peak_flops=1e9)
  train(cfg, str(tmp_path / "run"))
  return str(tmp_path / "run")


@pytest.fixture(scope="session")
def test_data():
  return TEST_DATA


def read_metrics(workdir):
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]
