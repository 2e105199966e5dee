"""How a prompt becomes the tokens a model reads: one home for templates and the first token,
used by the tasks' data, by sampling, scoring, classifying and embedding, so that training and
inference agree.
"""

import numpy as np

from llm.data import batches


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
  """The Alpaca template, up to where the response starts."""
  prompt = ("Below is an instruction that describes a task. Write a response that "
            f"appropriately completes the request.\n\n### Instruction:\n{instruction}")
  if input_text:
    prompt += f"\n\n### Input:\n{input_text}"
  return prompt + "\n\n### Response:\n"


def record_prompt(record: dict) -> str:
  """An instruction record's (instruction, optional input) prompt."""
  return alpaca_prompt(record["instruction"], record.get("input") or "")


def record_text(record: dict, answer_fields) -> str:
  """A record's prompt followed by its answers: the text a tokenizer for it trains on."""
  return record_prompt(record) + "\n".join(record[field] for field in answer_fields)


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
  """Prompts as a decoder reads them: the tokenizer's beginning-of-text token (Llama's <s>),
  where it has one, then the prompt's ids."""
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  return [bos + ids for ids in tokenizer.encode_batch(prompts)]


def with_specials(ids: list[int], tokenizer, max_length: int) -> list[int]:
  """A text's ids as an encoder or classifier reads them: [CLS] ids [SEP] for WordPiece (BERT),
  else as they are; cut to max_length."""
  if tokenizer.kind == "wordpiece":
    return [tokenizer.cls_id] + ids[:max_length - 2] + [tokenizer.sep_id]
  return ids[:max_length] or [tokenizer.pad_id]


def encode_texts(texts: list[str], tokenizer, max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Texts as a classifier or encoder reads them: right-padded ids [n, L] (L: the longest text,
  at most max_length) and their validity mask."""
  rows = [with_specials(ids, tokenizer, max_length) for ids in tokenizer.encode_batch(texts)]
  return batches.pad(rows, max(map(len, rows)), tokenizer.pad_id)
