"""Tokenizers behind one interface (encode, decode, vocab_size, eot_id, pad_id, save, and the
special tokens and chat template they come with), and the registry that maps tokenizer.kind to
a class:

- sentencepiece (sentencepiece.py): BPE with byte fallback, trained on the run's text or loaded.
- gpt2 (gpt2.py): OpenAI's GPT-2 BPE through tiktoken, built offline from encoder.json + vocab.bpe.
- wordpiece, hf (huggingface.py): BERT's WordPiece through `tokenizers`, trained on the run's
  text or from vocab.txt; any tokenizer.json (Llama 3, Mistral, Qwen2, SmolLM).

`build` makes the one a config asks for; `load` reads the copy a run saved in DIR/tokenizer/.
Nothing outside llm/text/ compares tokenizer.kind: a tokenizer says what differs (its
`learns_from_text`, `for_encoder`, `config_values`).
"""

import json
import os
from collections.abc import Iterable, Sequence
from typing import ClassVar

import numpy as np

from llm.errors import UserError

ENDOFTEXT = "<|endoftext|>"


class Tokenizer:
  kind: str
  vocab_size: int
  eot_id: int  # ends a document; also what generation stops at
  pad_id: int
  bos_id: int | None = None  # the model's beginning-of-text token, where it has one
  chat_template: str | None = None  # the Jinja template conversations are rendered with
  # The names a chat template knows the special tokens by (transformers' special_tokens_map).
  template_tokens: dict = {}
  learns_from_text: ClassVar[bool] = False  # trained on the run's text when tokenizer.path is ""
  bert_specials: ClassVar[bool] = False  # has BERT's [CLS], [SEP] and [MASK]
  load_priority: ClassVar[int] = 0  # `load` asks the kinds whether a folder is theirs in this order

  @classmethod
  def from_config(cls, t, texts: Iterable[str] | None) -> "Tokenizer":
    """The tokenizer the config's `tokenizer` section `t` asks for (trained on `texts` where it
    learns from text and t.path is empty)."""
    raise NotImplementedError

  @classmethod
  def saved_in(cls, directory: str) -> bool:
    """Whether `directory` holds this kind's saved files."""
    raise NotImplementedError

  @classmethod
  def from_saved(cls, directory: str) -> "Tokenizer":
    raise NotImplementedError

  def config_values(self) -> dict:
    """The config's `tokenizer` section that reads this tokenizer back."""
    return {"kind": self.kind}

  def for_encoder(self, ids: list[int], max_length: int) -> list[int]:
    """A text's ids as an encoder or classifier reads them, cut to max_length: as they are here;
    BERT's WordPiece adds [CLS] and [SEP]."""
    return ids[:max_length] or [self.pad_id]

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def specials(self) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's own rules put before and after a text (transformers'
    `tokenizer(text)`: Llama 3's <|begin_of_text|> before). The one place that decides it:
    only a tokenizer.json has such rules (its post-processor); the others add none."""
    return [], []

  def encode_with_specials(self, text: str) -> list[int]:
    """A text as the tokenizer itself encodes it, with its special tokens: what
    lm-evaluation-harness scores and what transformers' `generate` is given."""
    before, after = self.specials()
    return before + self.encode(text) + after

  def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode(text)` and the (start, end) character span each token covers."""
    raise NotImplementedError

  def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode_batch` as one integer array per text: what preparing a corpus writes."""
    return [np.asarray(ids, np.int64) for ids in self.encode_batch(texts)]

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  def save(self, directory: str, **kwargs) -> None:
    """Writes the files `load(directory)` reads back, the chat template among them."""
    self._save_files(directory, **kwargs)
    save_chat_template(self, directory)

  def _save_files(self, directory: str) -> None:
    raise NotImplementedError

  def fingerprint(self) -> str:
    """Changes whenever encoding could change: keys the tokenized-data cache."""
    raise NotImplementedError


_REGISTRY: dict[str, type[Tokenizer]] = {}


def register(cls: type[Tokenizer]) -> type[Tokenizer]:
  """Class decorator: tokenizer.kind=cls.kind now builds this class."""
  _REGISTRY[cls.kind] = cls
  return cls


def kinds() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(kind: str) -> type[Tokenizer]:
  if kind not in _REGISTRY:
    raise UserError(f"config: tokenizer.kind={kind!r} is not allowed; use one of {kinds()}")
  return _REGISTRY[kind]


def pad(rows: list[list[int]], length: int, pad_id: int,
        left: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Rows of ids padded to `length`, on the right (or the `left`: prompts to continue, every
  one ending at the same slot): (tokens [N, length] int32, valid [N, length])."""
  tokens = np.full((len(rows), length), pad_id, np.int32)
  valid = np.zeros((len(rows), length), bool)
  for r, ids in enumerate(rows):
    where = slice(length - len(ids), length) if left else slice(0, len(ids))
    tokens[r, where], valid[r, where] = ids, True
  return tokens, valid


# ---------------------------------------------------------------------------------------------
# Chat templates: kept beside a tokenizer's files, as transformers keeps them

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def read_tokenizer_config(directory: str) -> dict:
  path = os.path.join(directory, "tokenizer_config.json")
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_chat_template(directory: str) -> str | None:
  """The chat template a tokenizer folder ships: chat_template.jinja (what transformers writes
  today), else tokenizer_config.json's `chat_template` (a string, or named templates: the
  "default" one)."""
  path = os.path.join(directory, CHAT_TEMPLATE_FILE)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  template = read_tokenizer_config(directory).get("chat_template")
  if isinstance(template, list):
    template = {t["name"]: t["template"] for t in template}.get("default")
  return template or None


def save_chat_template(tokenizer: Tokenizer, directory: str) -> None:
  if tokenizer.chat_template:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CHAT_TEMPLATE_FILE), "w", encoding="utf-8") as f:
      f.write(tokenizer.chat_template)


def with_chat_template(tokenizer: Tokenizer, directory: str) -> Tokenizer:
  """`tokenizer` with the chat template that `directory` (its files) ships, if any."""
  tokenizer.chat_template = read_chat_template(directory) or tokenizer.chat_template
  return tokenizer


def build(cfg, texts: Iterable[str] | None, directory: str) -> Tokenizer:
  """The tokenizer `cfg.tokenizer` asks for (with the chat template its folder ships), saved
  into `directory` (a run's DIR/tokenizer).

  `texts` trains one when the kind learns from text and `cfg.tokenizer.path` is empty.
  """
  tok = get(cfg.tokenizer.kind).from_config(cfg.tokenizer, texts)
  if cfg.tokenizer.path:
    path = cfg.tokenizer.path
    with_chat_template(tok, path if os.path.isdir(path) else os.path.dirname(path))
  tok.save(directory)
  return tok


def load(directory: str) -> Tokenizer:
  """The tokenizer a run saved in DIR/tokenizer/, with its chat template."""
  for cls in sorted(_REGISTRY.values(), key=lambda c: c.load_priority):
    if cls.saved_in(directory):
      return with_chat_template(cls.from_saved(directory), directory)
  raise UserError(f"no tokenizer files in {directory}")
