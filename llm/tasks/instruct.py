"""Instruction tuning (task.kind=instruct): next-token prediction on Alpaca records (instruction,
optional input, output) through the Alpaca template, the prompt masked out of the loss."""

import numpy as np

from llm import evaluation, objectives, prompts
from llm.data import batches, sources
from llm.tasks.base import Context, EvalOptions, RecordTask, register


def instruction_examples(records, tokenizer, max_length: int, mask_prompt: bool) -> dict:
  """Prompt + response + end-of-text, as LM inputs/targets/weights padded with end-of-text.

  Targets are the response and its end-of-text (and the prompt unless `mask_prompt`); padding
  is never a target. Sequences are cut to max_length + 1 tokens.
  """
  eot = tokenizer.eot_id
  prompt_ids = prompts.encode_prompts(tokenizer, [prompts.record_prompt(r) for r in records])
  responses = tokenizer.encode_batch([r["output"] for r in records])
  rows = [(p + r + [eot])[:max_length + 1] for p, r in zip(prompt_ids, responses)]
  length = max(map(len, rows)) - 1
  seq, _ = batches.pad(rows, length + 1, eot)
  weights = np.zeros((len(rows), length), np.float32)
  for i, (p, row) in enumerate(zip(prompt_ids, rows)):
    # The target at position len(p) - 1 is the response's first token.
    first = len(p) - 1 if mask_prompt else 0
    weights[i, first:len(row) - 1] = 1.0
  return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "weights": weights}


@register
class InstructionTuning(RecordTask):
  kind = "instruct"
  answer_fields = ("output",)  # what follows the prompt in a record

  def fields(self):
    return ("instruction",) + self.answer_fields

  def tokenizer_texts(self, docs):
    return sources.first_chars((prompts.record_text(r, self.answer_fields) for r in docs),
                               self.cfg.tokenizer.train_chars)

  def prompt(self, record: dict) -> str:
    return prompts.record_prompt(record)

  def objective(self, model):
    return objectives.causal_lm(model, self.cfg.model.logits_chunk)

  def examples(self, docs, model, context: Context):
    examples = instruction_examples([dict(r) for r in docs], context.tokenizer,
                                    self.cfg.data.max_length, self.cfg.task.mask_prompt)
    return examples, np.arange(len(docs)), "instructions"

  def sequence_length(self, examples: dict) -> int:
    return examples["inputs"].shape[-1]

  def evaluate(self, run, context: Context, options: EvalOptions) -> dict:
    """The splits' metrics, then greedy responses to the test split written beside the
    records (DIR/test_responses.jsonl) and judged (evaluation.judge)."""
    results, data, docs = self.evaluate_splits(run, context, options)
    results["test_responses"] = evaluation.write_test_responses(run, data, docs, options,
                                                                open_run=context.open_run)
    return results
