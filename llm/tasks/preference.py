"""Preference tuning on pairs of answers to one prompt (chosen over rejected): a reward model
(task.kind=reward, a scalar head trained with the Bradley-Terry loss) or the policy itself tuned
against its starting point (task.kind=dpo, direct preference optimisation).

Records hold an instruction (and optional input), formatted by the Alpaca template, and the two
answers (data.chosen_field, data.rejected_field).
"""

import dataclasses
import os

import jax
import numpy as np

from llm import evaluation, files, objectives, prompts
from llm import model as model_lib
from llm.data import batches, sources
from llm.errors import UserError
from llm.tasks.base import Context, EvalOptions, RecordTask, register


def preference_examples(records, tokenizer, max_length: int, chosen_field: str = "chosen",
                        rejected_field: str = "rejected") -> tuple[dict, dict]:
  """Pairs of answers to one prompt (the Alpaca template of instruction and input), as
  (examples, report).

  Examples, with N pairs and the two answers (chosen, rejected) on axis 1:
    tokens [N, 2, T]    prompt + answer + end-of-text, padded with end-of-text
    valid [N, 2, T]     the real tokens
    response [N, 2, T]  1 at the answer's tokens and its end-of-text: what a log-probability sums
    weights [N]         1 per pair
  A sequence longer than `max_length` is cut (its end-of-text lost); a record whose prompt
  alone takes `max_length` tokens is dropped. The report counts both: {"kept", "cut",
  "dropped"}, and "rows", the index of each kept record.
  """
  eot = tokenizer.eot_id
  prompt_ids = prompts.encode_prompts(tokenizer, [prompts.record_prompt(r) for r in records])
  answers = [tokenizer.encode_batch([r[field] for r in records])
             for field in (chosen_field, rejected_field)]
  rows, kept, cut = [], [], 0
  for i, prompt in enumerate(prompt_ids):
    if len(prompt) >= max_length:
      continue
    pair = [prompt + answer[i] + [eot] for answer in answers]
    cut += any(len(seq) > max_length for seq in pair)
    rows.append([seq[:max_length] for seq in pair])
    kept.append(i)
  if not rows:
    raise UserError(f"data.max_length={max_length}: every prompt fills it; no preference pair "
                    "is left")
  length = max(len(seq) for pair in rows for seq in pair)
  tokens, valid = (x.reshape(len(rows), 2, length)
                   for x in batches.pad([seq for pair in rows for seq in pair], length, eot))
  response = np.zeros((len(rows), 2, length), np.float32)
  for n, (i, pair) in enumerate(zip(kept, rows)):
    for a, seq in enumerate(pair):
      response[n, a, len(prompt_ids[i]):len(seq)] = 1.0
  examples = {"tokens": tokens, "valid": valid, "response": response,
              "weights": np.ones(len(rows), np.float32)}
  return examples, {"kept": len(rows), "cut": cut, "dropped": len(records) - len(rows),
                    "rows": np.asarray(kept)}


def reference_logps(cfg, model, examples, start, path: str, batch_size: int):
  """log π_ref of both answers of every pair, [N, 2]: the starting model's, computed once
  (with LoRA, the base without its adapters, which start at zero; `start.params`) and kept
  at `path`."""
  n, average = len(examples["weights"]), cfg.task.dpo_average
  if path and os.path.isfile(path):
    with np.load(path) as saved:
      if saved["reference"].shape == (n, 2) and bool(saved["average"]) == average:
        return saved["reference"]
  if start is None:
    raise UserError("DPO needs its reference model's log-probabilities: train with "
                    "init_from set, or keep the run directory's task data")
  params = start.params(model)
  logps = jax.jit(lambda p, b: objectives.sequence_logps(model, p, b, average))
  reference = []
  for start in range(0, n, batch_size):  # every chunk of one shape: one compile
    rows = np.arange(start, start + batch_size) % n
    chunk = {k: examples[k][rows] for k in ("tokens", "response", "weights")}
    reference.append(np.asarray(logps(params, chunk))[:min(batch_size, n - start)])
  reference = np.concatenate(reference)
  if path and jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with files.written(path) as tmp, tmp.open("wb") as f:
      np.savez(f, reference=reference, average=average)
  return reference


class PreferencePairs(RecordTask):
  """What reward models and DPO share: the records, their prompts, the pairs."""
  sequences = 2

  def fields(self):
    return "instruction", self.cfg.data.chosen_field, self.cfg.data.rejected_field

  def tokenizer_texts(self, docs):
    answers = (self.cfg.data.chosen_field, self.cfg.data.rejected_field)
    return sources.first_chars((prompts.record_text(r, answers) for r in docs),
                               self.cfg.tokenizer.train_chars)

  def prompt(self, record: dict) -> str:
    return prompts.record_prompt(record)

  def examples(self, docs, model, context: Context):
    d = self.cfg.data
    examples, report = preference_examples([dict(r) for r in docs], context.tokenizer,
                                           d.max_length, d.chosen_field, d.rejected_field)
    what = (f"preference pairs; {report['cut']} cut to data.max_length={d.max_length}, "
            f"{report['dropped']} dropped as their prompt alone fills it")
    return examples, report["rows"], what


@register
class RewardModel(PreferencePairs):
  kind = "reward"
  produces = "reward"
  families = ("gpt", "bert")

  def build_model(self, vocab_size: int):
    return model_lib.build(self.cfg.model, vocab_size, num_classes=1)

  def objective(self, model):
    return objectives.reward(model)


@register
class DirectPreference(PreferencePairs):
  kind = "dpo"

  def check(self) -> None:
    super().check()
    if not self.cfg.task.beta > 0:
      raise UserError(f"config: task.beta={self.cfg.task.beta!r} is not allowed; use a positive "
                      "value (0.1 is usual)")

  def objective(self, model):
    return objectives.dpo(model, self.cfg.task.beta, self.cfg.task.dpo_average)

  def examples(self, docs, model, context: Context):
    examples, rows, what = super().examples(docs, model, context)
    examples["reference"] = reference_logps(self.cfg, model, examples, context.start,
                                            context.task_data, self.micro_batch())
    return examples, rows, what

  def evaluate(self, run, context: Context, options: EvalOptions) -> dict:
    """The splits' metrics, then greedy responses to the test split beside those of the
    reference model it started from."""
    results, data, docs = self.evaluate_splits(run, context, options)
    reference = dataclasses.replace(run, params=context.start.params(run.model))
    results["test_responses"] = evaluation.write_test_responses(run, data, docs, options,
                                                                reference, context.open_run)
    return results
