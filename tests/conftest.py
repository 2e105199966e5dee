"""Shared test helpers: tiny configs, the repository's test data."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


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


@pytest.fixture(scope="session")
def shared_data():
  assert os.path.isdir(SHARED_DATA), f"test data missing: {SHARED_DATA}"
  return SHARED_DATA


def read_metrics(workdir):
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]
