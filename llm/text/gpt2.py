"""OpenAI's GPT-2 byte-level BPE (tokenizer.kind=gpt2) through tiktoken, built offline from its
files."""

import concurrent.futures
import functools
import json
import os

from llm.errors import UserError
from llm.text.tokenizer import ENDOFTEXT, register, Tokenizer

# GPT-2's pre-tokenizer pattern, as tiktoken's "gpt2" encoding defines it.
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)"""
                r"""|\s""")


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from bytes to printable characters, in which its files are written."""
  printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
  shifted = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


@register
class GPT2Tokenizer(Tokenizer):
  """GPT-2 byte-level BPE (50,257 tokens; <|endoftext|> is 50256), encoded by tiktoken.

  Reads OpenAI's `encoder.json` + `vocab.bpe`, Hugging Face's `vocab.json` + `merges.txt`, or a
  `tokenizer.json`; with no folder, tiktoken's own copy (downloaded once). Saves OpenAI's pair.
  """
  kind = "gpt2"
  load_priority = 1  # its files are the most generic (a tokenizer.json alone): tried last
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
  def from_config(cls, t, texts):
    if t.path and not os.path.isdir(t.path):
      raise UserError(f"tokenizer.path={t.path!r}: GPT-2 BPE wants a folder holding "
                      "encoder.json + vocab.bpe or vocab.json + merges.txt")
    return cls(t.path or None)

  @classmethod
  def saved_in(cls, directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, name))
               for name in cls.FILES + cls.HF_FILES + ("tokenizer.json",))

  @classmethod
  def from_saved(cls, directory: str) -> "GPT2Tokenizer":
    return cls(directory)

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
