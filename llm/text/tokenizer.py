"""Tokenizers behind one interface: encode, decode, vocab_size, eot_id, pad_id, save, and the
special tokens and chat template they come with.

- sentencepiece: BPE with byte fallback, trained on the run's text or loaded from a .model file.
- gpt2: OpenAI's GPT-2 BPE through tiktoken, built offline from encoder.json + vocab.bpe.
- wordpiece: BERT's WordPiece through `tokenizers`, trained on the run's text or from vocab.txt.
- hf: any tokenizer.json of the `tokenizers` library (Llama 3, Mistral, Qwen2, SmolLM).

`build` makes the one a config asks for; `load` reads the copy a run saved in DIR/tokenizer/.
"""

import concurrent.futures
import functools
import json
import os
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np

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
  bos_id: int | None = None  # the model's beginning-of-text token, where it has one
  chat_template: str | None = None  # the Jinja template conversations are rendered with
  # The names a chat template knows the special tokens by (transformers' special_tokens_map).
  template_tokens: dict = {}

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


class SentencePieceTokenizer(Tokenizer):
  kind = "sentencepiece"
  MODEL_FILE = "sentencepiece.model"
  SETTINGS_FILE = "sentencepiece.json"  # which special tokens it adds

  def __init__(self, model_file: str, add_bos: bool = False, add_eos: bool = False):
    """`add_bos`/`add_eos`: the tokenizer puts <s> before / </s> after a text, as Llama 2's
    does (its tokenizer_config.json's add_bos_token); one trained here adds neither."""
    import sentencepiece as spm
    if not os.path.isfile(model_file):
      raise UserError(f"tokenizer.path: no sentencepiece model at {model_file}")
    self.add_bos, self.add_eos = add_bos, add_eos
    with open(model_file, "rb") as f:
      self._proto = f.read()
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self.vocab_size = self._sp.get_piece_size()
    self.eot_id = self._sp.eos_id()
    self.template_tokens = {"bos_token": self._sp.id_to_piece(self._sp.bos_id()),
                            "eos_token": self._sp.id_to_piece(self.eot_id)}
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eot_id

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, directory: str) -> "SentencePieceTokenizer":
    """BPE with byte fallback: any text encodes, unseen characters as their UTF-8 bytes."""
    import sentencepiece as spm
    os.makedirs(directory, exist_ok=True)
    # One training sentence per line; newlines become a piece of their own.
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(lines),
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
      chars = sum(len(line) for line in lines)
      if "Vocabulary size too high" in reason:
        reason = (f"the text is too short ({chars:,} characters) for {vocab_size} pieces; give "
                  f"it more text, or a smaller tokenizer.vocab_size ({reason})")
      raise UserError(f"could not train a sentencepiece tokenizer with tokenizer.vocab_size="
                      f"{vocab_size} on this text: {reason}") from None
    os.remove(os.path.join(directory, "sentencepiece.vocab"))
    return cls(os.path.join(directory, cls.MODEL_FILE))

  @classmethod
  def from_folder(cls, directory: str, model_file: str) -> "SentencePieceTokenizer":
    settings = {}
    if os.path.isfile(os.path.join(directory, cls.SETTINGS_FILE)):
      with open(os.path.join(directory, cls.SETTINGS_FILE)) as f:
        settings = json.load(f)
    return cls(os.path.join(directory, model_file), **settings)

  def specials(self):
    return ([self._sp.bos_id()] if self.add_bos else []), ([self.eot_id] if self.add_eos else [])

  def encode(self, text):
    return self._sp.encode(text)

  def encode_batch(self, texts):
    return self._sp.encode(list(texts))

  def encode_offsets(self, text):
    pieces = self._sp.encode(text, return_type="proto").pieces
    char_at = _char_index(text)  # sentencepiece counts in UTF-8 bytes
    return [p.id for p in pieces], [(char_at[p.begin], char_at[p.end]) for p in pieces]

  def decode(self, ids):
    return self._sp.decode([int(i) for i in ids])

  def _save_files(self, directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, self.MODEL_FILE), "wb") as f:
      f.write(self._proto)
    if self.add_bos or self.add_eos:
      with open(os.path.join(directory, self.SETTINGS_FILE), "w") as f:
        json.dump({"add_bos": self.add_bos, "add_eos": self.add_eos}, f)

  def fingerprint(self):
    import hashlib
    return "sp-" + hashlib.sha256(self._proto).hexdigest()[:16]


def _char_index(text: str) -> list[int]:
  """UTF-8 byte offset -> the index of the character it falls in (and len(text) at the end)."""
  index = [i for i, c in enumerate(text) for _ in c.encode("utf-8")]
  return index + [len(text)]


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from bytes to printable characters, in which its files are written."""
  printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
  shifted = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


class GPT2Tokenizer(Tokenizer):
  """GPT-2 byte-level BPE (50,257 tokens; <|endoftext|> is 50256), encoded by tiktoken.

  Reads OpenAI's `encoder.json` + `vocab.bpe`, Hugging Face's `vocab.json` + `merges.txt`, or a
  `tokenizer.json`; with no folder, tiktoken's own copy (downloaded once). Saves OpenAI's pair.
  """
  kind = "gpt2"
  FILES = ("encoder.json", "vocab.bpe")
  HF_FILES = ("vocab.json", "merges.txt")

  def __init__(self, directory: str | None = None):
    import tiktoken
    if directory is None:
      try:
        enc = tiktoken.get_encoding("gpt2")
      except Exception as e:  # network errors come in many types
        raise UserError(f"could not fetch tiktoken's gpt2 encoding ({type(e).__name__}); offline, "
                        "set tokenizer.path to a folder with encoder.json and vocab.bpe") from None
      self.vocab, self.merges = self._files_from_ranks(enc._mergeable_ranks)
      self.vocab[ENDOFTEXT] = enc.eot_token
    else:
      self.vocab, self.merges = self._read_files(directory)
    if len(self.vocab) < 257:
      raise UserError(f"tokenizer: {directory} holds {len(self.vocab)} tokens, fewer than GPT-2's "
                      "256 bytes + <|endoftext|>")
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    specials = {t: i for t, i in self.vocab.items() if t.startswith("<|") and t.endswith("|>")}
    ranks = {bytes(byte_of[c] for c in t): i for t, i in self.vocab.items() if t not in specials}
    for n, (a, b) in enumerate(self.merges):
      if self.vocab.get(a + b) != 256 + n:
        raise UserError(f"tokenizer: merge {n} ({a} {b}) does not make token {256 + n}; "
                        "only GPT-2-style BPE files (ids in merge order) are supported")
    self._enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                  special_tokens=specials)
    self.vocab_size = self._enc.n_vocab
    self.eot_id = specials.get(ENDOFTEXT, self.vocab_size - 1)
    self.template_tokens = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT}  # as transformers
    self.pad_id = self.eot_id  # GPT-2 has no pad token; padding positions carry no loss

  @classmethod
  def _read_files(cls, directory: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    for vocab_name, merges_name in (cls.FILES, cls.HF_FILES):
      vocab_path, merges_path = (os.path.join(directory, n) for n in (vocab_name, merges_name))
      if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        with open(vocab_path, encoding="utf-8") as f:
          vocab = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
          lines = f.read().split("\n")
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#v")]
        return vocab, merges
    path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        spec = json.load(f)
      model = spec["model"]
      specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
      merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
      return {**model["vocab"], **specials}, merges
    raise UserError(f"tokenizer: {directory} has neither encoder.json + vocab.bpe, vocab.json + "
                    "merges.txt nor tokenizer.json")

  @staticmethod
  def _files_from_ranks(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken keeps only token ranks: recover the merge that made each token."""
    char = _bytes_to_unicode()
    text = lambda piece: "".join(char[b] for b in piece)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
      if len(token) == 1:
        continue
      parts = [token[i:i + 1] for i in range(len(token))]
      while len(parts) > 2:  # BPE with the merges made before this token: ends in two parts
        i = min(range(len(parts) - 1),
                key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 30))
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
      merges.append((text(parts[0]), text(parts[1])))
    return {text(t): r for t, r in ranks.items()}, merges

  def encode(self, text):
    return self._enc.encode(text, allowed_special="all")

  def encode_batch(self, texts):
    return self._enc.encode_batch(list(texts), allowed_special="all")

  def encode_arrays(self, texts):
    # tiktoken's arrays skip the Python integers: tokenizing on all cores, nothing else
    # holds Python's lock. The threads last (each new thread would take memory of its own).
    if not hasattr(self, "_pool"):
      self._pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count(), "tokenize")
    return list(self._pool.map(functools.partial(self._enc.encode_to_numpy,
                                                 allowed_special="all"), texts))

  def encode_offsets(self, text):
    ids = self.encode(text)
    _, starts = self._enc.decode_with_offsets(ids)
    return ids, list(zip(starts, starts[1:] + [len(text)]))

  def decode(self, ids):
    return self._enc.decode([int(i) for i in ids])

  def _save_files(self, directory, names=FILES):
    """OpenAI's file names by default; `HF_FILES` for a Hugging Face folder."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, names[0]), "w", encoding="utf-8") as f:
      json.dump(self.vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, names[1]), "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))

  def fingerprint(self):
    import hashlib
    digest = hashlib.sha256(json.dumps([self.vocab, self.merges], sort_keys=True).encode())
    return "gpt2-" + digest.hexdigest()[:16]


class _TokenizersLibrary(Tokenizer):
  """A tokenizer held by the `tokenizers` library (self._tok): the text's tokens alone, with no
  special tokens added; special tokens are left out when decoding."""

  def encode(self, text):
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts):
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def encode_offsets(self, text):
    encoding = self._tok.encode(text, add_special_tokens=False)
    return encoding.ids, encoding.offsets

  def decode(self, ids):
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class WordPieceTokenizer(_TokenizersLibrary):
  """BERT's WordPiece through the `tokenizers` library: BERT's normaliser (lower-casing and
  accent stripping when `lowercase`), its pre-tokenizer, and [PAD] [UNK] [CLS] [SEP] [MASK].

  `encode` gives the text's pieces alone; models add [CLS] / [SEP] where they need them.
  """
  kind = "wordpiece"
  VOCAB_FILE = "vocab.txt"
  SETTINGS_FILE = "wordpiece.json"
  SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

  def __init__(self, vocab: dict[str, int], lowercase: bool = True):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers
    missing = [t for t in self.SPECIALS if t not in vocab]
    if missing:
      raise UserError(f"tokenizer: the WordPiece vocabulary lacks {', '.join(missing)}")
    self.vocab, self.lowercase = vocab, lowercase
    self._tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]",
                                             max_input_chars_per_word=100))
    self._tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    self._tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    self._tok.decoder = decoders.WordPiece(prefix="##")
    self._tok.add_special_tokens(list(self.SPECIALS))  # "[MASK]" in text is the token, as in BERT
    self.vocab_size = len(vocab)
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        vocab[t] for t in self.SPECIALS)
    self.eot_id = self.sep_id  # ends a text
    self.special_ids = frozenset((self.pad_id, self.cls_id, self.sep_id, self.mask_id))

  @classmethod
  def from_file(cls, path: str, lowercase: bool = True) -> "WordPieceTokenizer":
    if not os.path.isfile(path):
      raise UserError(f"tokenizer.path: no WordPiece vocab.txt at {path}")
    with open(path, encoding="utf-8") as f:
      tokens = [line.rstrip("\n") for line in f]
    return cls({t: i for i, t in enumerate(tokens) if t}, lowercase)

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, lowercase: bool) -> "WordPieceTokenizer":
    from tokenizers import Tokenizer as HFTokenizer, models, normalizers, pre_tokenizers, trainers
    tok = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    texts = list(texts)
    # The trainer numbers "##c" pieces in hash-map order and breaks ties between merges by
    # those numbers, so the vocabulary changes from run to run (huggingface/tokenizers#1794).
    # Numbering every "##c" up front, sorted, makes training deterministic.
    chars = {c for text in texts for c in tok.normalizer.normalize_str(text) if not c.isspace()}
    continuations = [f"##{c}" for c in sorted(chars)]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(cls.SPECIALS) + continuations,
        show_progress=False))
    return cls(tok.get_vocab(), lowercase)

  def _save_files(self, directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, self.VOCAB_FILE), "w", encoding="utf-8") as f:
      f.writelines(t + "\n" for t, _ in sorted(self.vocab.items(), key=lambda kv: kv[1]))
    with open(os.path.join(directory, self.SETTINGS_FILE), "w") as f:
      json.dump({"lowercase": self.lowercase}, f)

  def fingerprint(self):
    import hashlib
    digest = hashlib.sha256(json.dumps([sorted(self.vocab.items()), self.lowercase]).encode())
    return "wp-" + digest.hexdigest()[:16]


class HFTokenizer(_TokenizersLibrary):
  """A tokenizer.json of the Hugging Face `tokenizers` library, as Llama 3, Mistral, Qwen2 and
  SmolLM ship theirs (byte-level or sentencepiece-style BPE), with the model's end-of-text and
  beginning-of-text tokens.

  `encode` gives the text's tokens alone; the file's post-processor says which special tokens
  a text gets (`specials`).
  """
  kind = "hf"
  FILE = "tokenizer.json"
  SPECIALS_FILE = "special_tokens.json"

  def __init__(self, path: str, eot_id: int, bos_id: int | None = None,
               template_tokens: dict | None = None):
    from tokenizers import Tokenizer as Loaded
    try:
      self._tok = Loaded.from_file(path)
    except Exception as e:  # the library raises a plain Exception for a bad file
      raise UserError(f"tokenizer: {path} is not a tokenizers tokenizer.json ({e})") from None
    with open(path, "rb") as f:
      self._json = f.read()
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.eot_id, self.bos_id = eot_id, bos_id
    self.pad_id = eot_id
    names = {"eos_token": self._tok.id_to_token(eot_id)}
    if bos_id is not None:
      names["bos_token"] = self._tok.id_to_token(bos_id)
    self.template_tokens = {**names, **(template_tokens or {})}

  def specials(self):
    # What the post-processor adds around a text, read off one encoding with and without it.
    bare = self._tok.encode("a", add_special_tokens=False).ids
    full = self._tok.encode("a").ids
    start = next(i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare)
    return full[:start], full[start + len(bare):]

  def encode_with_specials(self, text):
    return self._tok.encode(text).ids

  @classmethod
  def from_folder(cls, directory: str, hf_config: dict | None = None) -> "HFTokenizer":
    """tokenizer.json with its special tokens: from our special_tokens.json, else the ids in
    transformers' config.json, else the token names in tokenizer_config.json."""
    path = os.path.join(directory, cls.FILE)
    if not os.path.isfile(path):
      raise UserError(f"tokenizer.path: no {cls.FILE} in {directory}")
    settings = read_tokenizer_config(directory)
    names = {k: v["content"] if isinstance(v, dict) else v for k, v in settings.items()
             if k in ("bos_token", "eos_token", "unk_token", "pad_token") and v}
    ours = os.path.join(directory, cls.SPECIALS_FILE)
    if os.path.isfile(ours):
      with open(ours) as f:
        ids = json.load(f)
      return cls(path, ids["eot_id"], ids.get("bos_id"), ids.get("template_tokens"))
    hf_config = dict(hf_config or {})
    tok = cls(path, 0)
    ids = {}
    for role in ("eos", "bos"):
      value = hf_config.get(f"{role}_token_id")
      if isinstance(value, list):  # several end tokens (Llama 3 instruct): the first
        value = value[0]
      if value is None and names.get(f"{role}_token"):
        value = tok._tok.token_to_id(names[f"{role}_token"])
      ids[role] = value
    if ids["eos"] is None:
      raise UserError(f"{directory}: neither config.json nor tokenizer_config.json names the "
                      "end-of-text token (eos_token_id / eos_token)")
    return cls(path, ids["eos"], ids["bos"], names)

  def special_tokens(self) -> dict:
    """transformers' names for the end- and beginning-of-text tokens."""
    return {k: v for k, v in self.template_tokens.items() if k in ("eos_token", "bos_token")}

  def _save_files(self, directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, self.FILE), "wb") as f:
      f.write(self._json)
    with open(os.path.join(directory, self.SPECIALS_FILE), "w") as f:
      json.dump({"eot_id": self.eot_id, "bos_id": self.bos_id,
                 "template_tokens": self.template_tokens}, f)

  def fingerprint(self):
    import hashlib
    digest = hashlib.sha256(self._json + json.dumps([self.eot_id, self.bos_id]).encode())
    return "hf-" + digest.hexdigest()[:16]


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

  `texts` trains a sentencepiece model when `cfg.tokenizer.path` is empty.
  """
  tok = _build(cfg, texts)
  if cfg.tokenizer.path:
    path = cfg.tokenizer.path
    with_chat_template(tok, path if os.path.isdir(path) else os.path.dirname(path))
  tok.save(directory)
  return tok


def _build(cfg, texts):
  t = cfg.tokenizer
  if t.kind == "sentencepiece":
    if t.path:
      path = os.path.join(t.path, SentencePieceTokenizer.MODEL_FILE) if os.path.isdir(
          t.path) else t.path
      return SentencePieceTokenizer(path)
    if texts is None:
      raise UserError("tokenizer.path is empty and there is no text to train a tokenizer on")
    with tempfile.TemporaryDirectory() as tmp:
      return SentencePieceTokenizer.train(texts, t.vocab_size, tmp)
  if t.kind == "gpt2":
    if t.path and not os.path.isdir(t.path):
      raise UserError(f"tokenizer.path={t.path!r}: GPT-2 BPE wants a folder holding "
                      "encoder.json + vocab.bpe or vocab.json + merges.txt")
    return GPT2Tokenizer(t.path or None)
  if t.kind == "wordpiece":
    if t.path:
      path = (os.path.join(t.path, WordPieceTokenizer.VOCAB_FILE) if os.path.isdir(t.path)
              else t.path)
      tok = WordPieceTokenizer.from_file(path, t.lowercase)
    elif texts is None:
      raise UserError("tokenizer.path is empty and there is no text to train a tokenizer on")
    else:
      tok = WordPieceTokenizer.train(texts, t.vocab_size, t.lowercase)
    return tok
  if t.kind == "hf":
    if not t.path:
      raise UserError("tokenizer.kind=hf reads an existing tokenizer.json: set tokenizer.path to "
                      "its folder")
    return HFTokenizer.from_folder(t.path if os.path.isdir(t.path) else os.path.dirname(t.path))
  raise UserError(f"tokenizer.kind={t.kind!r} is unknown")


def load(directory: str) -> Tokenizer:
  """The tokenizer a run saved in DIR/tokenizer/, with its chat template."""
  return with_chat_template(_load(directory), directory)


def _load(directory: str) -> Tokenizer:
  if os.path.isfile(os.path.join(directory, HFTokenizer.SPECIALS_FILE)):
    return HFTokenizer.from_folder(directory)
  if os.path.isfile(os.path.join(directory, SentencePieceTokenizer.MODEL_FILE)):
    return SentencePieceTokenizer.from_folder(directory, SentencePieceTokenizer.MODEL_FILE)
  if os.path.isfile(os.path.join(directory, WordPieceTokenizer.VOCAB_FILE)):
    settings = os.path.join(directory, WordPieceTokenizer.SETTINGS_FILE)
    lowercase = json.load(open(settings))["lowercase"] if os.path.isfile(settings) else True
    return WordPieceTokenizer.from_file(os.path.join(directory, WordPieceTokenizer.VOCAB_FILE),
                                        lowercase)
  if any(os.path.isfile(os.path.join(directory, name))
         for name in GPT2Tokenizer.FILES + GPT2Tokenizer.HF_FILES + ("tokenizer.json",)):
    return GPT2Tokenizer(directory)
  raise UserError(f"no tokenizer files in {directory}")
