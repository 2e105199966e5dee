"""Instruction and chat tuning (task.kind=instruct): next-token prediction on records of any
format prompts.py reads (conversations, prompt/completion, Alpaca), the loss on what
`task.train_on` chooses (by default the assistant's turns: the prompt is masked out)."""

import numpy as np

from llm.data import packing, sources
from llm.errors import BadRecord, UserError
from llm.evals import splits
from llm.tasks.base import Context, EvalOptions, RecordTask, register
from llm.text import prompts, tokenizer as tokenizer_lib
from llm.training import objectives

TRAIN_ON = ("assistant", "completion", "all")


def instruction_examples(records, tokenizer, max_length: int, train_on: str = "assistant",
                         skip_bad: bool = False) -> tuple[dict, np.ndarray]:
  """(LM inputs/targets/weights padded with end-of-text, [N, T], and each example's record).

  A record's tokens are its prompt and answer as prompts.sft_sequence makes them, cut to
  max_length + 1; the targets chosen by `train_on` have weight 1, padding never. The examples
  also hold `lengths` [N], each one's real positions (what packing moves).
  """
  def encode(record):
    ids, trained = prompts.sft_sequence(record, tokenizer, train_on)
    ids, trained = ids[:max_length + 1], trained[:max_length + 1]
    if not any(trained[1:]):
      raise BadRecord(f"data.max_length={max_length} cuts away all that it trains on")
    return ids, trained

  encoded, kept = prompts.encode_records(records, encode, skip_bad)
  length = max(len(ids) for ids, _ in encoded) - 1
  seq, _ = tokenizer_lib.pad([ids for ids, _ in encoded], length + 1, tokenizer.eot_id)
  weights = np.zeros((len(encoded), length), np.float32)
  for i, (ids, trained) in enumerate(encoded):
    weights[i, :len(ids) - 1] = trained[1:]  # the target at t is token t + 1
  lengths = np.asarray([len(ids) - 1 for ids, _ in encoded], np.int32)
  return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "weights": weights,
          "lengths": lengths}, kept


@register
class InstructionTuning(RecordTask):
  kind = "instruct"
  keys = {"train_on": ("assistant", 'what the loss sees: "assistant" (every assistant turn, a '
                       "completion, an Alpaca response; with its end of turn), \"completion\" "
                       '(a conversation\'s last assistant turn) or "all"')}
  answer_fields = ("output",)  # what follows an Alpaca instruction
  packs = True

  def check(self):
    super().check()
    if self.cfg.task.train_on not in TRAIN_ON:
      raise UserError(f"config: task.train_on={self.cfg.task.train_on!r} is not "
                              f"allowed; use one of {', '.join(TRAIN_ON)}")

  def fields(self):
    return lambda columns: prompts.record_fields(columns, self.answer_fields)

  def tokenizer_texts(self, docs):
    return sources.first_chars((prompts.record_text(r, self.answer_fields) for r in docs),
                               self.cfg.tokenizer.train_chars)

  def prompt(self, record: dict, tokenizer) -> str:
    return prompts.prompt_text(record, tokenizer)

  def objective(self, model):
    return objectives.causal_lm(model, self.cfg.model.logits_chunk,
                                self.cfg.train.z_loss)

  def examples(self, docs, model, context: Context):
    examples, rows = instruction_examples([dict(r) for r in docs], context.tokenizer,
                                          self.cfg.data.max_length, self.cfg.task.train_on,
                                          self.cfg.data.skip_bad_rows)
    return examples, rows, "instructions"

  def pack(self, examples: dict, pad_id: int, length: int) -> dict:
    return packing.pack_lm(examples, examples["lengths"], pad_id, length)

  def sequence_length(self, examples: dict) -> int:
    return examples["inputs"].shape[-1]

  def evaluate(self, run, context: Context, options: EvalOptions) -> dict:
    """The splits' metrics, then greedy responses to the test split written beside the
    records (DIR/test_responses.jsonl) and judged (splits.judge)."""
    results, data, docs = self.evaluate_splits(run, context, options)
    results["test_responses"] = splits.write_test_responses(run, data, docs, options,
                                                            open_run=context.open_run)
    return results
