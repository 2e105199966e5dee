"""How a record becomes the tokens a model reads: one home for record formats, templates and
special tokens, used by the tasks' data, by sampling, scoring, classifying and embedding, so that
training and inference agree.

Records come in the formats the field uses (TRL's, and the book's):

    conversation        {"messages": [{"role": "system" | "user" | "assistant", "content"}, ...]}
    prompt, completion  {"prompt": ..., "completion": ...}, each a string or a message list
    preference          {"prompt": ..., "chosen": ..., "rejected": ...}; strings or message lists
                        (without "prompt": the conversations' shared first messages)
    Alpaca              {"instruction", "input" (optional), "output"}, through the Alpaca
                        template; for preference pairs, with data.chosen_field / rejected_field

Message lists are rendered by the tokenizer's chat template (chat.py); strings are joined as
they are, the completion ending in end-of-text.
"""

import numpy as np

from llm.errors import BadRecord, UserError
from llm.text import chat, tokenizer as tokenizer_lib


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
  """The Alpaca template, up to where the response starts."""
  prompt = ("Below is an instruction that describes a task. Write a response that "
            f"appropriately completes the request.\n\n### Instruction:\n{instruction}")
  if input_text:
    prompt += f"\n\n### Input:\n{input_text}"
  return prompt + "\n\n### Response:\n"


# ---------------------------------------------------------------------------------------------
# Record formats


def record_fields(columns, answers: tuple[str, ...] = ("output",)) -> tuple[str, ...]:
  """The fields a record of these columns must have: its format's. `answers`: what follows an
  Alpaca instruction (an SFT output, or a preference pair's two answers)."""
  if "messages" in columns:
    return ("messages",)
  if "prompt" in columns:
    return ("prompt",) + (("completion",) if answers == ("output",) else answers)
  if "instruction" not in columns and len(answers) == 2 and "chosen" in columns:
    return answers  # preference conversations with an implicit prompt
  return ("instruction",) + answers


def _is_messages(value) -> bool:
  return isinstance(value, list)


def _split_conversation(messages: list) -> tuple[list, list]:
  """(the messages before the last assistant turn, that turn and any after it)."""
  chat.check(messages)
  last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
  if last is None:
    return messages, []
  return messages[:last], messages[last:]


def prompt_text(record: dict, tokenizer) -> str:
  """A record's prompt as the model reads it (the text of `encode_prompts`): a conversation up
  to its last assistant turn with the template's generation prompt, a prompt string, or the
  Alpaca template of the instruction and input."""
  if "messages" in record:
    return chat.Template.of(tokenizer).render(_split_conversation(record["messages"])[0],
                                              add_generation_prompt=True)
  if "prompt" in record:
    prompt = record["prompt"]
    if _is_messages(prompt):
      return chat.Template.of(tokenizer).render(prompt, add_generation_prompt=True)
    return prompt
  if "instruction" not in record and _is_messages(record.get("chosen")):
    prompt, _, _ = _implicit_prompt(record["chosen"], record["rejected"])
    return chat.Template.of(tokenizer).render(prompt, add_generation_prompt=True)
  return alpaca_prompt(record["instruction"], record.get("input") or "")


def answer_text(record: dict, field: str = "output") -> str:
  """A record's reference answer: an Alpaca `field`, the completion, or the last assistant
  turn of a conversation (or of a completion's messages)."""
  value = record.get(field if "instruction" in record else "completion", record.get(field))
  if "messages" in record:
    value = _split_conversation(record["messages"])[1]
  if _is_messages(value):
    return "".join(m["content"] for m in value if m.get("role") == "assistant")
  return "" if value is None else str(value)


def record_text(record: dict, answers: tuple[str, ...] = ("output",)) -> str:
  """All of a record's text, what a tokenizer for it trains on."""
  def texts(value):
    if isinstance(value, list):
      return [str(m.get("content", "")) for m in value if isinstance(m, dict)]
    return [] if value is None else [str(value)]
  if "instruction" in record:
    return alpaca_prompt(record["instruction"], record.get("input") or "") + "\n".join(
        str(record[a]) for a in answers)
  return "\n".join(t for key in ("messages", "prompt", "completion") + answers
                   for t in texts(record.get(key)))


def _implicit_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
  """Preference conversations without a prompt: their shared first messages are it."""
  n = 0
  while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
    n += 1
  while n and chosen[n - 1]["role"] == "assistant":  # an answer starts at an assistant turn
    n -= 1
  return chosen[:n], chosen[n:], rejected[n:]


def _joined(tokenizer, prompt: str, answer: str, train_all: bool):
  """A string prompt and answer: the tokenizer's start tokens, the prompt's ids, the answer's
  and end-of-text; the answer and end-of-text are the targets (all of it with `train_all`)."""
  prompt_ids = encode_prompts(tokenizer, [prompt])[0]
  answer_ids = tokenizer.encode(answer) + [tokenizer.eot_id]
  return prompt_ids + answer_ids, [train_all] * len(prompt_ids) + [True] * len(answer_ids)


def _messages(tokenizer, prompt: list, answer: list, train_on: str):
  """A prompt and answer as messages, rendered whole; the answer's assistant turns are the
  targets (every assistant turn with train_on="assistant" on a conversation, all tokens with
  "all")."""
  messages = prompt + answer
  trained_from = {"all": None, "completion": len(prompt)}.get(train_on, 0)
  return chat.encode(tokenizer, chat.Template.of(tokenizer), messages, trained_from)


def sft_sequence(record: dict, tokenizer, train_on: str) -> tuple[list[int], list[bool]]:
  """An SFT record's ids and which tokens are targets (`task.train_on`: the assistant's turns,
  the completion alone, or all). Raises BadRecord for a record it cannot use."""
  if "messages" in record:
    prompt, answer = _split_conversation(record["messages"])
    return _messages(tokenizer, prompt, answer, train_on)
  if "prompt" in record:
    prompt, completion = record["prompt"], record.get("completion")
    if _is_messages(prompt) or _is_messages(completion):
      if not (_is_messages(prompt) and _is_messages(completion)):
        raise BadRecord("its prompt and completion must both be strings or both "
                                   "message lists")
      # On prompt/completion records the assistant's turns are the completion's.
      return _messages(tokenizer, prompt, completion,
                       "all" if train_on == "all" else "completion")
    return _joined(tokenizer, prompt, str(completion), train_on == "all")
  return _joined(tokenizer, alpaca_prompt(record["instruction"], record.get("input") or ""),
                 str(record["output"]), train_on == "all")


def preference_sequences(record: dict, tokenizer, chosen_field: str = "chosen",
                         rejected_field: str = "rejected"):
  """A preference record's two sequences (chosen, rejected), each (ids, whether each token is
  the answer's: what a log-probability sums). Raises BadRecord."""
  if "instruction" in record:
    prompt = alpaca_prompt(record["instruction"], record.get("input") or "")
    return [_joined(tokenizer, prompt, str(record[f]), False)
            for f in (chosen_field, rejected_field)]
  chosen, rejected = record[chosen_field], record[rejected_field]
  if "prompt" not in record:
    if not (_is_messages(chosen) and _is_messages(rejected)):
      raise BadRecord("without a prompt, chosen and rejected must be conversations")
    prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
  else:
    prompt = record["prompt"]
  if _is_messages(prompt) or _is_messages(chosen):
    if not (_is_messages(prompt) and _is_messages(chosen) and _is_messages(rejected)):
      raise BadRecord("its prompt and answers must all be strings or all message "
                                 "lists")
    return [_messages(tokenizer, prompt, answer, "completion") for answer in (chosen, rejected)]
  return [_joined(tokenizer, prompt, str(answer), False) for answer in (chosen, rejected)]


def scored_sequence(tokenizer, prompt: str, answer: str) -> list[int]:
  """A prompt (`prompt_text`'s) and a sampled answer as a reward model trained on such records
  read them: a chat prompt (it ends with the template's generation prompt) gets the answer and
  the template's end of turn, rendered as one text; any other prompt the answer and
  end-of-text."""
  template = chat.Template.of(tokenizer) if tokenizer.chat_template else None
  if template and template.generation_prompt and prompt.endswith(template.generation_prompt):
    return tokenizer.encode(prompt + answer + template.after_answer)
  return _joined(tokenizer, prompt, answer, False)[0]


def encode_records(records, encode, skip_bad: bool):
  """([encode(record) for each usable record], their indices). A record that raises BadRecord
  stops the run with one line naming it, or with `skip_bad` (data.skip_bad_rows) is counted
  and left out."""
  encoded, kept, bad = [], [], []
  for i, record in enumerate(records):
    try:
      encoded.append(encode(record))
      kept.append(i)
    except BadRecord as e:
      bad.append((i, str(e)))
  if bad and not skip_bad:
    i, reason = bad[0]
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise UserError(f"record {i + 1} (counting from 1){more}: {reason}; fix it, or set "
                    "data.skip_bad_rows=True to leave such records out")
  if bad:
    print(f"note: left out {len(bad)} of {len(records)} records (the first, record "
          f"{bad[0][0] + 1}: {bad[0][1]})")
  if not encoded:
    raise UserError("no record is left to train on")
  return encoded, np.asarray(kept)


# ---------------------------------------------------------------------------------------------
# Token ids


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
  """Prompts as a decoder reads them: the tokens the tokenizer puts before a text
  (`Tokenizer.specials`: Llama 3's <|begin_of_text|>) unless the text already begins with them
  (a chat template writes them itself), then the prompt's ids."""
  before, _ = tokenizer.specials()
  encoded = tokenizer.encode_batch(prompts)
  return [ids if ids[:len(before)] == before else before + ids for ids in encoded]


def stop_ids(tokenizer) -> list[int]:
  """The tokens a sampled answer ends at: end-of-text, and the chat template's end of turn
  where it is one token (ChatML's <|im_end|>, Llama 3's <|eot_id|>)."""
  ids = [tokenizer.eot_id]
  if tokenizer.chat_template:
    try:
      end = tokenizer.encode(chat.Template.of(tokenizer).end_of_turn)
    except (UserError, BadRecord, ValueError):  # a template that cannot render a probe turn
      return ids
    if len(end) == 1 and end[0] not in ids:
      ids.append(end[0])
  return ids


def encode_texts(texts: list[str], tokenizer, max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Texts as a classifier or encoder reads them: right-padded ids [n, L] (L: the longest text,
  at most max_length) and their validity mask."""
  rows = [tokenizer.for_encoder(ids, max_length) for ids in tokenizer.encode_batch(texts)]
  return tokenizer_lib.pad(rows, max(map(len, rows)), tokenizer.pad_id)
