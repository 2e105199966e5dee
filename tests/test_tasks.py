"""A task is one module: a task defined only here, with a config key of its own, trains,
evaluates, checkpoints and resumes through the normal code path (tests/test_layout.py checks
that nothing outside llm/tasks/ compares task.kind)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import read_metrics, tiny_config
from llm import tasks
from llm import config as config_lib
from llm.data import batches
from llm.runs import loading, startup
from llm.runs.rundir import read_config
from llm.runs.trainer import train
from llm.training import objectives

@tasks.register
class CopyThePrompt(tasks.RecordTask):
  """The first task.copy_length tokens of a document, end-of-text, then the same tokens again:
  the model learns to copy. Only the copy is a target."""
  kind = "copy"
  keys = {"copy_length": (7, "tokens of the prompt that the model learns to copy")}

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
    tok, half = context.tokenizer, self.cfg.task.copy_length
    rows = [ids[:half] for ids in tok.encode_batch(docs["text"]) if len(ids) >= half]
    sequence = np.array([r + [tok.eot_id] + r for r in rows], np.int32)
    copy = np.zeros((len(rows), 2 * half), np.float32)
    copy[:, half:] = 1.0  # the targets after the end-of-text
    examples = {"sequence": sequence, "copy": copy, "weights": np.ones(len(rows), np.float32)}
    return examples, np.arange(len(rows)), "prompts to copy"

  def sequence_length(self, examples):
    return 2 * self.cfg.task.copy_length


def _copy_config(tmp_path, **overrides):
  return tiny_config(tmp_path, **{"task.kind": "copy", "data.val_fraction": 0.2,
                                  "data.test_fraction": 0.1, **overrides})


@pytest.mark.slow
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

  # The task's own key is a config key like any other: documented, and read by the task. The
  # schema says what a batch holds: one sequence of 2 x task.copy_length inputs per example.
  assert config_lib.base_config().task.copy_length == 7
  assert config_lib.describe_keys()["task.copy_length"] == (
      "copy: tokens of the prompt that the model learns to copy")
  assert read_config(straight).task.copy_length == 7
  s = startup.setup(_copy_config(tmp_path, **{"task.copy_length": 5}))
  data = s.task.data(s.docs, s.task.build_model(s.tokenizer.vocab_size), tasks.Context(s.tokenizer))
  assert data.schema.length == 10 and data.schema.tokens == 10
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


def test_the_lm_tasks_batches_match_its_schema(tmp_path):
  cfg = tiny_config(tmp_path, **{"train.batch_size": 4})
  s = startup.setup(cfg)
  data = s.task.data(s.docs, None, tasks.Context(s.tokenizer))
  batch = next(data.batches)
  data.schema.check(batch, batch_axes=2)
  assert data.schema.length == 16 and batch["inputs"].shape == (1, 4, 16)
  assert isinstance(data.batches, batches.Batches)
  assert set(tasks.kinds()) >= {"lm", "mlm", "classify", "instruct", "reward", "dpo"}
