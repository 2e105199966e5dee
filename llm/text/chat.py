"""Conversations: lists of {"role", "content"} messages, rendered by a chat template (the Jinja
template a tokenizer ships, as Llama 3, Qwen2 and Mistral do) exactly as transformers'
`apply_chat_template` renders and tokenizes them, and which tokens are the assistant's.

    template = chat.Template(tokenizer.chat_template, tokenizer.template_tokens)
    text = template.render(messages, add_generation_prompt=True)
    ids, targets = chat.encode(tokenizer, template, messages)  # targets: the assistant's
"""

import datetime
import functools
import json
import os

from llm.errors import BadRecord, UserError

ROLES = ("system", "user", "assistant", "tool")

# ChatML (Qwen2's turns, without its default system prompt): the template for a tokenizer that
# has none and for models trained here.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


def choose(setting: str, shipped: str | None) -> str | None:
  """The template `tokenizer.chat_template` asks for: "" the tokenizer's own (`shipped`),
  "chatml" the built-in ChatML, else a Jinja file's."""
  if not setting:
    return shipped
  if setting == "chatml":
    return CHATML
  if not os.path.isfile(setting):
    raise UserError(f"tokenizer.chat_template={setting!r}: use \"\" (the tokenizer's own), "
                    "\"chatml\" or the path of a Jinja template file")
  with open(setting, encoding="utf-8") as f:
    source = f.read()
  _compile(source, f"tokenizer.chat_template={setting}")  # a syntax error names its line here
  return source


@functools.lru_cache(maxsize=8)
def _compile(source: str, origin: str = "the chat template"):
  """The template compiled as transformers compiles it: a sandbox, trim_blocks and
  lstrip_blocks, loop controls, its tojson, raise_exception and strftime_now. `origin` names
  it in the error of a template that does not compile."""
  import jinja2
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, \
      sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                  separators=separators, sort_keys=sort_keys)
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise UserError(f"{origin}: line {e.lineno}: {e.message}") from None
  except jinja2.exceptions.TemplateError as e:
    raise UserError(f"{origin} does not compile: {e}") from None


class Template:
  """A chat template with the special tokens it may name (bos_token, eos_token, ...)."""

  def __init__(self, source: str | None, tokens: dict | None = None):
    if not source:
      raise UserError("the tokenizer has no chat template; set tokenizer.chat_template=chatml "
                      "(or the path of a Jinja template) to train or sample conversations")
    self.source, self.tokens = source, dict(tokens or {})
    self._template = _compile(source)

  @classmethod
  def of(cls, tokenizer) -> "Template":
    return cls(tokenizer.chat_template, tokenizer.template_tokens)

  def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text: transformers' apply_chat_template(tokenize=False)."""
    import jinja2
    check(messages)
    try:
      return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **self.tokens)
    except jinja2.exceptions.TemplateError as e:
      raise BadRecord(f"the chat template does not render it: {e}") from None
    except Exception as e:  # a template reading a key the message lacks, ...
      raise BadRecord(f"the chat template does not render it ({type(e).__name__}: {e})") \
          from None

  def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, each assistant message's (start, end) in it): the text the
    template adds for that message after the conversation before it with a generation prompt,
    its end-of-turn included. A template that renders earlier turns differently once more
    follow (Mistral's moves the system prompt) is searched for the message's text and its
    end-of-turn instead."""
    text = self.render(messages)
    spans, searched = [], 0
    for i, message in enumerate(messages):
      if message["role"] != "assistant":
        continue
      before = self.render(messages[:i], add_generation_prompt=True) if i else ""
      upto = self.render(messages[:i + 1])
      if upto.startswith(before) and text.startswith(upto):
        start, end = len(before), len(upto)
      elif upto.startswith(before) and upto[len(before):] in text[searched:]:
        start = text.index(upto[len(before):], searched)
        end = start + len(upto) - len(before)
      else:
        content = str(message["content"]).strip()
        start = text.find(content, searched)
        if start < 0 or not content:
          raise BadRecord(f"the template does not render assistant message {i} where it "
                                "can be found")
        end = start + len(content)
        follows = text[end:].lstrip(" ")
        if self.end_of_turn and follows.startswith(self.end_of_turn):
          end = len(text) - len(follows) + len(self.end_of_turn)
      spans.append((start, end))
      searched = end
    return text, spans

  @functools.cached_property
  def after_answer(self) -> str:
    """What the template writes after an assistant message, whitespace included (ChatML's
    "<|im_end|>\n")."""
    probe = "\x00answer\x00"
    text = self.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}])
    return text[text.index(probe) + len(probe):]

  @property
  def end_of_turn(self) -> str:
    """The end of an assistant's turn (ChatML's "<|im_end|>"): where a sampled answer stops."""
    return self.after_answer.strip()

  @functools.cached_property
  def generation_prompt(self) -> str:
    """What add_generation_prompt appends (ChatML's "<|im_start|>assistant\n")."""
    question = [{"role": "user", "content": "q"}]
    plain, prompted = self.render(question), self.render(question, add_generation_prompt=True)
    return prompted[len(plain):] if prompted.startswith(plain) else ""


def check(messages) -> None:
  """Raises BadRecord unless `messages` is a non-empty list of role/content messages."""
  if not isinstance(messages, list):
    raise BadRecord(f"the conversation is {_short(messages)}, not a list of "
                    "{\"role\", \"content\"} messages")
  if not messages:
    raise BadRecord("the conversation is empty")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise BadRecord(f"message {i} is not a {{\"role\", \"content\"}} object")
    if m["role"] not in ROLES:
      raise BadRecord(f"message {i} has the unknown role {m['role']!r} (use one of "
                      f"{', '.join(ROLES)})")
    if not isinstance(m["content"], str):
      raise BadRecord(f"message {i} has content={_short(m['content'])}, not text")


def _short(value) -> str:
  text = json.dumps(value)
  return text if len(text) <= 40 else text[:37] + "..."


def token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
  """Whether each token (its character `offsets`) overlaps one of the `spans`: transformers'
  rule for assistant masks."""
  mask, s = [], 0
  for start, end in offsets:
    while s < len(spans) and start >= spans[s][1]:
      s += 1
    mask.append(s < len(spans) and end > spans[s][0])
  return mask


def encode(tokenizer, template: Template, messages: list[dict],
           trained_from: int | None = 0) -> tuple[list[int], list[bool]]:
  """A conversation's ids (apply_chat_template's: the template writes the special tokens) and
  which of them the loss sees: the assistant turns from message `trained_from` on (each with
  its end-of-turn), or every token (None)."""
  text, spans = template.assistant_spans(messages)
  ids, offsets = tokenizer.encode_offsets(text)
  if trained_from is None:
    return ids, [True] * len(ids)
  assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
  spans = [span for i, span in zip(assistant, spans) if i >= trained_from]
  if not spans:
    raise BadRecord("it has no assistant message to learn from")
  return ids, token_mask(offsets, spans)
