"""Tokenizers behind one interface: encode, decode, vocab_size, eot_id, pad_id, save.

- sentencepiece: BPE with byte fallback, trained on the run's text or loaded from a .model file.
- gpt2: OpenAI's GPT-2 BPE through tiktoken, built offline from encoder.json + vocab.bpe.

`build` makes the one a config asks for; `load` reads the copy a run saved in DIR/tokenizer/.
"""

import json
import os
import shutil
from collections.abc import Iterable, Sequence

from llm.errors import UserError

ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenizer pattern, as tiktoken's "gpt2" encoding defines it.
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)"""
                r"""|\s""")


class Tokenizer:
  kind: str
  vocab_size: int
  eot_id: int  # ends a document; also what generation stops at
  pad_id: int

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  def save(self, directory: str) -> None:
    """Writes the files `load(directory)` reads back."""
    raise NotImplementedError

  def fingerprint(self) -> str:
    """Changes whenever encoding could change: keys the tokenized-data cache."""
    raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
  kind = "sentencepiece"
  MODEL_FILE = "sentencepiece.model"

  def __init__(self, model_file: str):
    import sentencepiece as spm
    if not os.path.isfile(model_file):
      raise UserError(f"tokenizer.path: no sentencepiece model at {model_file}")
    with open(model_file, "rb") as f:
      self._proto = f.read()
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self.vocab_size = self._sp.get_piece_size()
    self.eot_id = self._sp.eos_id()
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eot_id

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, directory: str) -> "SentencePieceTokenizer":
    """BPE with byte fallback: any text encodes, unseen characters as their UTF-8 bytes."""
    import sentencepiece as spm
    os.makedirs(directory, exist_ok=True)
    # One training sentence per line; newlines become a piece of their own.
    lines = (line for text in texts for line in text.split("\n") if line.strip())
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=lines,
          model_prefix=os.path.join(directory, "sentencepiece"),
          model_type="bpe",
          vocab_size=vocab_size,
          byte_fallback=True,
          character_coverage=0.9995,
          normalization_rule_name="identity",  # keep the text as it is: code, spacing, case
          remove_extra_whitespaces=False,
          add_dummy_prefix=False,  # text is continued, not started: no invented space
          allow_whitespace_only_pieces=True,
          split_digits=True,
          user_defined_symbols=["\n"],
          unk_id=0, bos_id=1, eos_id=2, pad_id=3,
          max_sentence_length=1 << 16,
          minloglevel=2,
      )
    except RuntimeError as e:  # sentencepiece says what to change, after an internal prefix
      reason = str(e).strip().rsplit("] ", 1)[-1]
      raise UserError(f"could not train a sentencepiece tokenizer with tokenizer.vocab_size="
                      f"{vocab_size} on this text: {reason}") from None
    os.remove(os.path.join(directory, "sentencepiece.vocab"))
    return cls(os.path.join(directory, cls.MODEL_FILE))

  def encode(self, text):
    return self._sp.encode(text)

  def encode_batch(self, texts):
    return self._sp.encode(list(texts))

  def decode(self, ids):
    return self._sp.decode([int(i) for i in ids])

  def save(self, directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, self.MODEL_FILE), "wb") as f:
      f.write(self._proto)

  def fingerprint(self):
    import hashlib
    return "sp-" + hashlib.sha256(self._proto).hexdigest()[:16]


class GPT2Tokenizer(Tokenizer):
  """GPT-2 byte-level BPE (50,257 tokens; <|endoftext|> is 50256) through tiktoken."""
  kind = "gpt2"
  FILES = ("encoder.json", "vocab.bpe")
  TIKTOKEN_MARKER = "tiktoken.json"

  def __init__(self, directory: str | None = None):
    import tiktoken
    self._directory = directory
    if directory is None:  # tiktoken's own copy, downloaded once and cached
      try:
        self._enc = tiktoken.get_encoding("gpt2")
      except Exception as e:  # network errors come in many types
        raise UserError(f"could not fetch tiktoken's gpt2 encoding ({type(e).__name__}); offline, "
                        "set tokenizer.path to a folder with encoder.json and vocab.bpe") from None
    else:
      from tiktoken.load import data_gym_to_mergeable_bpe_ranks
      paths = [os.path.join(directory, name) for name in self.FILES]
      missing = [p for p in paths if not os.path.isfile(p)]
      if missing:
        raise UserError(f"tokenizer.path: GPT-2 BPE needs {', '.join(self.FILES)}; "
                        f"missing {', '.join(missing)}")
      ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=paths[1], encoder_json_file=paths[0])
      self._enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                    special_tokens={ENDOFTEXT: len(ranks)})
    self.vocab_size = self._enc.n_vocab
    self.eot_id = self._enc.eot_token
    self.pad_id = self.eot_id  # GPT-2 has no pad token; padding positions carry no loss

  def encode(self, text):
    return self._enc.encode(text, allowed_special="all")

  def encode_batch(self, texts):
    return self._enc.encode_batch(list(texts), allowed_special="all")

  def decode(self, ids):
    return self._enc.decode([int(i) for i in ids])

  def save(self, directory):
    os.makedirs(directory, exist_ok=True)
    if self._directory is not None:
      for name in self.FILES:
        shutil.copyfile(os.path.join(self._directory, name), os.path.join(directory, name))
      return
    with open(os.path.join(directory, self.TIKTOKEN_MARKER), "w") as f:
      json.dump({"encoding": "gpt2"}, f)  # tiktoken's own copy: loaded again by name

  def fingerprint(self):
    return "gpt2"


def build(cfg, texts: Iterable[str] | None, directory: str) -> Tokenizer:
  """The tokenizer `cfg.tokenizer` asks for, saved into `directory` (a run's DIR/tokenizer).

  `texts` trains a sentencepiece model when `cfg.tokenizer.path` is empty.
  """
  t = cfg.tokenizer
  if t.kind == "sentencepiece":
    if t.path:
      path = os.path.join(t.path, SentencePieceTokenizer.MODEL_FILE) if os.path.isdir(
          t.path) else t.path
      tok = SentencePieceTokenizer(path)
      tok.save(directory)
      return tok
    if texts is None:
      raise UserError("tokenizer.path is empty and there is no text to train a tokenizer on")
    return SentencePieceTokenizer.train(texts, t.vocab_size, directory)
  if t.kind == "gpt2":
    if t.path and not os.path.isdir(t.path):
      raise UserError(f"tokenizer.path={t.path!r}: GPT-2 BPE wants a folder holding "
                      "encoder.json and vocab.bpe")
    tok = GPT2Tokenizer(t.path or None)
    tok.save(directory)
    return tok
  raise UserError(f"tokenizer.kind={t.kind!r} is not available yet; use sentencepiece or gpt2")


def load(directory: str) -> Tokenizer:
  """The tokenizer a run saved in DIR/tokenizer/."""
  if os.path.isfile(os.path.join(directory, SentencePieceTokenizer.MODEL_FILE)):
    return SentencePieceTokenizer(os.path.join(directory, SentencePieceTokenizer.MODEL_FILE))
  if os.path.isfile(os.path.join(directory, "encoder.json")):
    return GPT2Tokenizer(directory)
  if os.path.isfile(os.path.join(directory, GPT2Tokenizer.TIKTOKEN_MARKER)):
    return GPT2Tokenizer(None)
  raise UserError(f"no tokenizer files in {directory}")
