"""Shared test helpers: tiny configs, the repository's test data."""

import json
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
# LLM_TESTS_DEFAULT_XLA=1 keeps XLA's defaults (test_optim checks optax equality under them).
if not os.environ.get("LLM_TESTS_DEFAULT_XLA"):
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()
# The suite runs on the CPU: libtpu (installed for the ahead-of-time TPU compiles) would
# otherwise look for a TPU at every start, and say so on stderr, here and in every subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
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
    *sections, name = key.split(".")
    node = c
    for section in sections:
      node = node[section]
    node[name] = value
  return c


def signal_in(target: str, signal_name: str, nth: int = 1, after: bool = False) -> None:
  """Makes this process send itself `signal_name` as the `nth` call of `target`
  ("module:attribute", e.g. "llm.text.sentencepiece:SentencePieceTokenizer.train") starts (or, `after`,
  returns), as a scheduler or a Ctrl-C could at that moment. For a config file of a command
  the test starts (`config_file`)."""
  import functools
  import importlib
  import itertools
  import signal
  module, attribute = target.split(":")
  owner = importlib.import_module(module)
  *path, name = attribute.split(".")
  for part in path:
    owner = getattr(owner, part)
  original, calls = getattr(owner, name), itertools.count(1)

  @functools.wraps(original)
  def signalled(*args, **kwargs):
    now = next(calls) == nth
    if now and not after:
      os.kill(os.getpid(), getattr(signal, signal_name))
    result = original(*args, **kwargs)
    if now and after:
      os.kill(os.getpid(), getattr(signal, signal_name))
    return result

  setattr(owner, name, signalled)


def config_file(tmp_path, overrides: dict, signals=(), name="fault_config.py",
                make=("tiny_config",)) -> str:
  """A config file for a command the test starts (`python -m llm.train`), holding
  make[0](tmp_path, *make[1:], **overrides) (a config function of this file, or "module.function"
  of the tests' folder); `signals`: the arguments of `signal_in` calls, so that the command's
  process sends itself those signals."""
  function, *args = make
  module, _, function = function.rpartition(".")
  path = tmp_path / name
  path.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
      "import pathlib\n"
      "from conftest import signal_in\n"
      f"from {module or 'conftest'} import {function}\n"
      + "".join(f"signal_in(*{tuple(spec)!r})\n" for spec in signals) +
      "def get_config(arg=None):\n"
      f"  return {function}(pathlib.Path({str(tmp_path)!r}), *{args!r}, **{overrides!r})\n")
  return str(path)


def train_classifier_from(tmp_path, init_from: str, trainable: str) -> str:
  """Two steps of a yes/no classifier fine-tuned from `init_from`; returns its run directory."""
  from llm.config import base_config
  from llm.runs.trainer import train
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
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def records(tmp_path_factory, test_data):
  """The first 48 of the 200 preference records (polite chosen, impolite rejected)."""
  with open(os.path.join(test_data, "preference", "preference-examples.json")) as f:
    rows = json.load(f)[:48]
  path = tmp_path_factory.mktemp("records") / "preference.json"
  path.write_text(json.dumps(rows))
  return str(path)


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, records):
  """A tiny random GPT with a tokenizer of the records' text, as a run directory: the policy's
  and the reward model's start."""
  import flax.linen as nn
  import jax
  import numpy as np
  from llm import model as model_lib
  from llm.runs import rundir
  from llm.text import sentencepiece
  tmp = tmp_path_factory.mktemp("base")
  with open(records) as f:
    texts = [" ".join(r.values()) for r in json.load(f)]
  tokenizer = sentencepiece.SentencePieceTokenizer.train(texts, 512, str(tmp / "tokenizer"))
  cfg = tiny_config(tmp, **{"model.max_len": 128})
  model = model_lib.build(cfg.model, tokenizer.vocab_size)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 1), np.int32))["params"])
  rundir.write(str(tmp / "run"), cfg, tokenizer, params)
  return str(tmp / "run")


def preference_config(tmp_path, base, records, kind, **overrides):
  from llm import config as config_lib
  c = config_lib.base_config()
  c.init_from = base
  c.task.kind = kind
  c.data.update(path=records, max_length=128, val_fraction=0.25, test_fraction=0.1,
                cache_dir=str(tmp_path / "cache"))
  c.train.update(steps=6, batch_size=8, lr=2e-3, min_lr=2e-3, warmup_steps=0, log_every=1,
                 eval_every=6, checkpoint_every=3, peak_flops=1e9)
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c
