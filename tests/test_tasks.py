"""A task is one module: a task defined only here trains, evaluates, checkpoints and resumes
through the normal code path; and no module outside llm/tasks/ compares task.kind."""

import ast
import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, read_metrics, tiny_config
from llm import tasks
from llm.data import batches
from llm.runs import loading, startup
from llm.runs.trainer import train
from llm.training import objectives

HALF = 7  # tokens to copy


@tasks.register
class CopyThePrompt(tasks.RecordTask):
  """The first HALF tokens of a document, end-of-text, then the same tokens again: the model
  learns to copy. Only the copy is a target."""
  kind = "copy"

  def load(self):
    return super().load().select(range(60))

  def objective(self, model):
    def loss(params, batch, dropout_rng, train):
      logits_BxLxV = model.apply({"params": params}, batch["sequence"][:, :-1],
                                 deterministic=not train)
      targets_BxL = batch["sequence"][:, 1:]
      ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
      mask_BxL = batch["copy"] * batch["weights"][:, None]
      hit_BxL = (jnp.argmax(logits_BxLxV, -1) == targets_BxL) * mask_BxL
      return {"loss": jnp.sum(ce_BxL * mask_BxL), "weight": jnp.sum(mask_BxL),
              "correct": jnp.sum(hit_BxL)}

    def summarize(sums):
      weight = max(float(sums["weight"]), 1.0)
      return {"loss": float(sums["loss"]) / weight,
              "copy_accuracy": float(sums["correct"]) / weight}

    return objectives.Objective(loss, summarize, terms=(("loss", "copy", 1.0),))

  def examples(self, docs, model, context):
    tok = context.tokenizer
    rows = [ids[:HALF] for ids in tok.encode_batch(docs["text"]) if len(ids) >= HALF]
    sequence = np.array([r + [tok.eot_id] + r for r in rows], np.int32)
    copy = np.zeros((len(rows), 2 * HALF), np.float32)
    copy[:, HALF:] = 1.0  # the targets after the end-of-text
    examples = {"sequence": sequence, "copy": copy, "weights": np.ones(len(rows), np.float32)}
    return examples, np.arange(len(rows)), "prompts to copy"

  def sequence_length(self, examples):
    return 2 * HALF


def _copy_config(tmp_path, **overrides):
  return tiny_config(tmp_path, **{"task.kind": "copy", "data.val_fraction": 0.2,
                                  "data.test_fraction": 0.1, **overrides})


def test_a_task_defined_in_one_file_trains_evaluates_and_resumes(tmp_path, capsys):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train(_copy_config(tmp_path), straight)
  train(_copy_config(tmp_path, **{"train.steps": 3}), resumed)
  train(_copy_config(tmp_path), resumed)  # resumes at step 3

  lines = read_metrics(straight)
  train_losses = {m["step"]: m["loss"] for m in lines if m["split"] == "train"}
  assert sorted(train_losses) == [1, 2, 3, 4, 5, 6]
  assert all("copy_accuracy" in m for m in lines)
  assert train_losses == {m["step"]: m["loss"] for m in read_metrics(resumed)
                          if m["split"] == "train"}
  assert [m["step"] for m in lines if m["split"] == "eval"] == [3, 6]
  test_line = [m for m in lines if m["split"] == "test"][-1]
  assert test_line["step"] == 6 and 0.0 <= test_line["copy_accuracy"] <= 1.0

  # The schema says what a batch holds: one sequence of 2 x HALF inputs per example.
  s = startup.setup(_copy_config(tmp_path))
  data = s.task.data(s.docs, s.task.build_model(s.tokenizer.vocab_size), tasks.Context(s.tokenizer))
  assert data.schema.length == 2 * HALF and data.schema.tokens == 2 * HALF
  assert set(data.schema.arrays) == {"sequence", "copy", "weights"}
  data.schema.check(next(data.batches), batch_axes=2)
  with pytest.raises(ValueError, match="schema"):
    data.schema.check({"sequence": np.zeros((1, 8, 3), np.int32)}, batch_axes=2)
  assert len(data.splits["test"]) == 6  # of 60 records

  # llm.evaluate's path: the run opened, its task evaluated on its own splits.
  capsys.readouterr()
  run = loading.load(straight)
  assert isinstance(run.task, CopyThePrompt)
  results = run.task.evaluate(run, startup.run_context(run), tasks.EvalOptions())
  assert results["test"]["loss"] == pytest.approx(test_line["loss"], rel=1e-5)
  assert "test: loss" in capsys.readouterr().out


def test_an_unknown_task_names_the_closest():
  from llm.errors import UserError
  with pytest.raises(UserError, match="task.kind='instrct'.*did you mean 'instruct'"):
    tasks.get("instrct")


def _compares_task_kind(tree) -> list[int]:
  """Lines where `<anything>.task.kind` is compared (==, !=, in, not in) to something."""
  def is_task_kind(node):
    return (isinstance(node, ast.Attribute) and node.attr == "kind"
            and isinstance(node.value, ast.Attribute) and node.value.attr == "task")
  return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Compare)
          and any(is_task_kind(part) for part in [node.left, *node.comparators])]


def test_no_module_outside_the_tasks_compares_task_kind():
  found = {}
  for folder, _, files in os.walk(os.path.join(ROOT, "llm")):
    for name in files:
      path = os.path.join(folder, name)
      if name.endswith(".py") and os.sep + "tasks" + os.sep not in path:
        lines = _compares_task_kind(ast.parse(open(path).read()))
        if lines:
          found[os.path.relpath(path, ROOT)] = lines
  assert found == {}
  # The check itself finds a comparison.
  assert _compares_task_kind(ast.parse("if cfg.task.kind == 'lm': pass")) == [1]
  assert _compares_task_kind(ast.parse("x = 'lm' not in run.cfg.task.kind")) == [1]


def test_the_lm_tasks_batches_match_its_schema(tmp_path):
  cfg = tiny_config(tmp_path, **{"train.batch_size": 4})
  s = startup.setup(cfg)
  data = s.task.data(s.docs, None, tasks.Context(s.tokenizer))
  batch = next(data.batches)
  data.schema.check(batch, batch_axes=2)
  assert data.schema.length == 16 and batch["inputs"].shape == (1, 4, 16)
  assert isinstance(data.batches, batches.Batches)
  assert set(tasks.kinds()) >= {"lm", "mlm", "classify", "instruct", "reward", "dpo"}
