"""Fine-tuning: classification, instruction tuning and LoRA, from a pre-trained run."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, read_metrics, tiny_config
from llm.data import batches
from llm.errors import UserError
from llm.runs import loading
from llm.tasks import classify, instruct
from llm.text import tokenizer as tokenizer_lib
from llm.text.prompts import alpaca_prompt

# Its tests share module fixtures: one pytest-xdist worker runs them all.
pytestmark = pytest.mark.xdist_group("finetune")


ALPACA_HEAD = ("Below is an instruction that describes a task. Write a response that "
               "appropriately completes the request.")


def test_alpaca_prompt_with_and_without_input():
  assert alpaca_prompt("Name a colour.") == (
      ALPACA_HEAD + "\n\n### Instruction:\nName a colour.\n\n### Response:\n")
  assert alpaca_prompt("Translate to French.", "cat") == (
      ALPACA_HEAD + "\n\n### Instruction:\nTranslate to French.\n\n### Input:\ncat"
      "\n\n### Response:\n")


class CharTokenizer(tokenizer_lib.Tokenizer):
  """One token per character (code point % 250), end-of-text 255: easy to count by hand."""
  eot_id = pad_id = 255
  vocab_size = 256

  def encode(self, text):
    return [ord(c) % 250 for c in text]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]


def test_instruction_targets_are_the_response_and_one_end_of_text():
  tok = CharTokenizer()
  records = [{"instruction": "a", "input": "", "output": "xy"},
             {"instruction": "bb", "input": "c", "output": "z"}]
  ex, _ = instruct.instruction_examples(records, tok, max_length=1000)
  p0 = len(alpaca_prompt("a"))
  p1 = len(alpaca_prompt("bb", "c"))
  length = max(p0 + 3, p1 + 2) - 1
  assert ex["inputs"].shape == ex["targets"].shape == ex["weights"].shape == (2, length)
  assert list(ex["lengths"]) == [p0 + 2, p1 + 1]
  # Row 0: targets x, y, end-of-text; then padding (end-of-text, weight 0).
  np.testing.assert_array_equal(np.flatnonzero(ex["weights"][0]), [p0 - 1, p0, p0 + 1])
  assert list(ex["targets"][0, p0 - 1:p0 + 2]) == [ord("x"), ord("y"), 255]
  assert (ex["inputs"][0, p0 + 2:] == 255).all() and (ex["targets"][0, p0 + 2:] == 255).all()
  np.testing.assert_array_equal(np.flatnonzero(ex["weights"][1]), [p1 - 1, p1])
  unmasked, _ = instruct.instruction_examples(records, tok, max_length=1000, train_on="all")
  assert unmasked["weights"][0].sum() == p0 + 2  # the prompt's successors too
  cut, _ = instruct.instruction_examples(records, tok, max_length=10, train_on="all")
  assert cut["inputs"].shape == (2, 10)


def test_masked_loss_equals_hand_computed_value():
  from llm.model.gpt import GPT
  from llm.model.layers import TransformerConfig
  from llm.training import objectives
  model = GPT(TransformerConfig(vocab_size=256, max_len=300, num_layers=1, num_heads=2,
                                d_model=16, d_ff=32))
  records = [{"instruction": "hi", "input": "", "output": "ok"},
             {"instruction": "sum", "input": "1 2", "output": "3"}]
  batch, _ = instruct.instruction_examples(records, CharTokenizer(), 1000)
  del batch["lengths"]
  params = model.init(jax.random.PRNGKey(0), batch["inputs"])["params"]
  sums = objectives.causal_lm(model).loss(params, batch, None, False)
  logp = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, batch["inputs"])))
  by_hand = []
  for r, record in enumerate(records):
    start = len(alpaca_prompt(record["instruction"], record["input"])) - 1
    wanted = [ord(c) for c in record["output"]] + [255]
    by_hand += [-logp[r, start + i, t] for i, t in enumerate(wanted)]
  assert float(sums["weight"]) == len(by_hand) == 5
  np.testing.assert_allclose(float(sums["loss"]) / float(sums["weight"]), np.mean(by_hand),
                             rtol=1e-5)


def test_labels_balance_and_splits():
  assert classify.label_names(["spam", "ham", "spam"]) == ["ham", "spam"]
  assert classify.label_names([1, 0, 2, 2]) == ["0", "1", "2"]
  np.testing.assert_array_equal(classify.label_ids(["spam", "ham", "1"], ["ham", "spam"]),
                                [1, 0, 1])
  with pytest.raises(UserError, match="row 2 has label 'eggs'"):
    classify.label_ids(["ham", "spam", "eggs"], ["ham", "spam"])
  labels = np.array([0] * 90 + [1] * 10)
  kept = classify.balance(labels, seed=0)
  assert np.bincount(labels[kept]).tolist() == [10, 10]
  parts = batches.split_indices(100, 0.1, 0.2, seed=0)
  assert [len(parts[s]) for s in batches.SPLITS] == [70, 10, 20]
  assert len(set(np.concatenate(list(parts.values())))) == 100
  with pytest.raises(UserError, match="the test split is empty"):
    batches.split_indices(3, 0.3, 0.1, seed=0)


def test_lora_with_zero_b_is_the_base_model_and_merges_exactly():
  import flax.linen as nn
  from llm.model import lora
  from llm.model.gpt import GPT
  from llm.model.layers import TransformerConfig
  model = GPT(TransformerConfig(vocab_size=64, max_len=16, num_layers=2, num_heads=2,
                                d_model=16, d_ff=32))
  tokens = jnp.arange(12).reshape(2, 6)
  boxed = model.init(jax.random.PRNGKey(0), tokens)["params"]
  base = nn.meta.unbox(boxed)
  adapted, n = lora.add(boxed, 4, r"(attn/(query|key|value|out)|mlp/(wi|wo))/kernel",
                        jax.random.PRNGKey(1))
  adapted = nn.meta.unbox(adapted)
  assert n == 12
  assert adapted["block_0"]["attn"]["query"]["lora_a"].shape == (16, 4)
  assert adapted["block_0"]["attn"]["out"]["lora_b"].shape == (4, 16)
  assert adapted["block_0"]["attn"]["out"]["lora_a"].shape == (2, 8, 4)
  logits = lambda p: model.apply({"params": p}, tokens)
  np.testing.assert_array_equal(logits(lora.merge(adapted, 2.0)), logits(base))  # B = 0

  # With B != 0, the merged kernel gives what the unmerged x W + s (x A) B gives.
  b = jax.random.normal(jax.random.PRNGKey(2), (4, 2, 8))
  adapted["block_0"]["attn"]["query"]["lora_b"] = b
  merged = lora.merge(adapted, 2.0)
  q = adapted["block_0"]["attn"]["query"]
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 16))
  unmerged = (jnp.tensordot(x, q["kernel"], 1)
              + 2.0 * jnp.tensordot(x @ q["lora_a"], b, 1))
  np.testing.assert_allclose(jnp.tensordot(x, merged["block_0"]["attn"]["query"]["kernel"], 1),
                             unmerged, atol=1e-5)
  assert "lora_a" not in merged["block_0"]["attn"]["query"]


# ---------------------------------------------------------------------------------------------
# Whole runs from a pre-trained tiny GPT


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, test_data):
  """A tiny GPT pre-trained for a few steps with the GPT-2 tokenizer."""
  from llm.runs.trainer import train
  tmp = tmp_path_factory.mktemp("base")
  cfg = tiny_config(tmp, **{"tokenizer.kind": "gpt2",
                            "tokenizer.path": os.path.join(test_data, "gpt2"),
                            "model.max_len": 256, "train.steps": 4})
  train(cfg, str(tmp / "run"))
  return str(tmp / "run")


def finetune_config(tmp_path, base, config_file, arg=None, **overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", config_file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.init_from = base
  c.data.cache_dir = str(tmp_path / "cache")
  c.train.update(peak_flops=1e9)
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def _params(workdir):
  from flax import traverse_util
  return traverse_util.flatten_dict(jax.device_get(loading.load(workdir).params), sep="/")


@pytest.mark.slow
def test_instruction_lora_freezes_the_base_and_merges(tmp_path, base_run, test_data):
  from llm import convert
  from llm.runs import rundir
  from llm.runs.trainer import train
  cfg = finetune_config(tmp_path, base_run, "finetune_instruct.py", "lora", **{
      "data.path": os.path.join(test_data, "instructions", "instruction-examples.json"),
      "data.max_length": 96, "train.steps": 3, "train.batch_size": 4, "train.eval_every": 3,
      "train.lr": 1e-2, "train.min_lr": 1e-2})
  workdir = str(tmp_path / "lora")
  train(cfg, workdir)
  lines = read_metrics(workdir)
  assert {m["split"] for m in lines} == {"train", "eval", "test"}
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["init_from"] == base_run and saved["lora"]["rank"] == 16

  base, tuned = _params(base_run), _params(workdir)
  assert set(base) == set(tuned)
  adapted = [p for p in base if "attn/query/kernel" in p or "mlp/wi/kernel" in p]
  untouched = [p for p in base if p not in adapted and "kernel" not in p]
  assert adapted and untouched
  for path in untouched:  # embeddings, norms, biases: bit for bit the base's
    np.testing.assert_array_equal(tuned[path], base[path], err_msg=path)
  assert all(np.abs(tuned[p] - base[p]).max() > 0 for p in adapted)  # B moved off zero

  # The checkpoint holds the adapters only, not the base weights.
  from llm.training import checkpoint
  ckpt = checkpoint.Checkpointer(workdir, keep=1)
  step_dir = os.path.join(ckpt.directory, str(ckpt.latest_step()))
  ckpt.close()
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(step_dir) for f in fs)
  base_size = sum(v.size * 4 for v in base.values())
  assert size < base_size / 2

  # Merged into a self-contained run directory: the same outputs.
  convert.merge_lora(workdir, str(tmp_path / "merged"))
  merged = _params(str(tmp_path / "merged"))
  for path in base:
    np.testing.assert_array_equal(merged[path], tuned[path], err_msg=path)
  assert rundir.read_config(str(tmp_path / "merged")).init_from == ""

  # The test split's responses, beside their references, ready for judging.
  from llm.evals import splits
  from llm.runs import startup
  out = tmp_path / "responses.jsonl"
  run = loading.load(workdir)
  data, docs = run.task.data_for(run.model, startup.run_context(run))
  written = splits.write_responses(run, data, docs, str(out), max_new_tokens=3,
                                   batch_size=8)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert rows == written and len(rows) == 20
  assert set(rows[0]) == {"instruction", "input", "output", "response"}
  with open(test_data + "/instructions/instruction-examples.json") as f:
    references = {(r["instruction"], r["output"]) for r in json.load(f)}
  assert all((r["instruction"], r["output"]) in references for r in rows)

  # Instructions through the command line: the prompt is formatted, only the response printed.
  proc = subprocess.run([sys.executable, "-m", "llm.generate", f"--workdir={workdir}",
                         "--instruction=Name a colour.", "--max_new_tokens=5",
                         "--temperature=0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert "### Response" not in proc.stdout and "Below is" not in proc.stdout


@pytest.mark.slow
def test_last_block_finetuning_changes_only_the_top(tmp_path, base_run, test_data):
  from llm.runs.trainer import train
  cfg = finetune_config(tmp_path, base_run, "finetune_instruct.py", **{
      "data.path": os.path.join(test_data, "instructions", "instruction-examples.json"),
      "data.max_length": 64, "data.skip_bad_rows": True, "train.steps": 2,
      "train.batch_size": 4, "train.lr": 1e-2,
      "train.min_lr": 1e-2, "train.trainable": "last:1"})
  train(cfg, str(tmp_path / "top"))
  base, tuned = _params(base_run), _params(str(tmp_path / "top"))
  for path in base:
    if path.startswith(("block_1/", "ln_f/")):
      assert np.abs(tuned[path] - base[path]).max() > 0, path
    else:
      np.testing.assert_array_equal(tuned[path], base[path], err_msg=path)


def _separable_csv(path, n=160, seed=0):
  """Two classes told apart by their vocabulary."""
  rng = np.random.default_rng(seed)
  words = {"good": "sunny bright warm happy calm", "bad": "storm cold dark angry loud"}
  rows = ["label,text"]
  for i in range(n):
    label = ("good", "bad")[i % 2]
    rows.append(f"{label},{' '.join(rng.choice(words[label].split(), 6))}")
  path.write_text("\n".join(rows) + "\n")


@pytest.mark.slow
def test_classifier_learns_a_separable_task(tmp_path, base_run):
  from llm.classify import TextClassifier
  from llm.evals import splits
  from llm.runs import rundir, startup
  from llm.runs.trainer import train
  _separable_csv(tmp_path / "data.csv")
  cfg = finetune_config(tmp_path, base_run, "finetune_classify.py", **{
      "data.path": str(tmp_path / "data.csv"), "train.steps": 40, "train.lr": 3e-3,
      "train.min_lr": 3e-3, "train.trainable": "all", "train.eval_every": 20,
      "train.batch_size": 16})
  workdir = str(tmp_path / "clf")
  train(cfg, workdir)
  test = [m for m in read_metrics(workdir) if m["split"] == "test"][-1]
  assert test["accuracy"] >= 0.95
  assert sum(map(sum, test["confusion"])) == 32  # 20% of 160
  assert set(test["per_class"]) == {"bad", "good"}
  assert rundir.read_config(workdir).task.labels == "bad,good"

  run = loading.load(workdir)
  results = splits.evaluate_splits(run, run.task.data_for(run.model,
                                                          startup.run_context(run))[0])
  assert results["test"]["confusion"] == test["confusion"]
  [(label, prob)] = TextClassifier(workdir).classify(["sunny warm happy calm bright sunny"])
  assert label == "good" and 0.5 < prob <= 1.0


@pytest.mark.slow
def test_bad_fine_tuning_data_fails_clearly(tmp_path, base_run):
  from llm.runs.trainer import train
  csv = tmp_path / "data.csv"
  csv.write_text("label,text\nham,hello\nspam,win money\neggs,what\n")
  cfg = finetune_config(tmp_path, base_run, "finetune_classify.py", **{
      "data.path": str(csv), "data.balance": False, "task.labels": "ham,spam"})
  with pytest.raises(UserError, match="row 2 has label 'eggs'"):
    train(cfg, str(tmp_path / "a"))
  cfg = finetune_config(tmp_path, base_run, "finetune_classify.py", **{
      "data.path": str(csv), "data.label_field": "category"})
  with pytest.raises(UserError, match="no field 'category'"):
    train(cfg, str(tmp_path / "b"))
  cfg = finetune_config(tmp_path, base_run, "finetune_classify.py", **{
      "data.path": str(csv), "data.balance": False})
  with pytest.raises(UserError, match="the validation split is empty"):
    train(cfg, str(tmp_path / "c"))
  records = tmp_path / "records.jsonl"
  records.write_text('{"instruction": "x", "response": "y"}\n')
  cfg = finetune_config(tmp_path, base_run, "finetune_instruct.py", **{"data.path": str(records)})
  with pytest.raises(UserError, match="no field 'output'"):
    train(cfg, str(tmp_path / "d"))
  for name in "abcd":
    assert not (tmp_path / name).exists()
