"""Tokenizers of the Hugging Face `tokenizers` library: BERT's WordPiece (tokenizer.kind=wordpiece),
trained on the run's text or read from vocab.txt, and any tokenizer.json (tokenizer.kind=hf: Llama
3, Mistral, Qwen2, SmolLM)."""

import json
import os
from collections.abc import Iterable

from llm.errors import UserError
from llm.text.tokenizer import read_tokenizer_config, register, Tokenizer


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


@register
class WordPieceTokenizer(_TokenizersLibrary):
  """BERT's WordPiece through the `tokenizers` library: BERT's normaliser (lower-casing and
  accent stripping when `lowercase`), its pre-tokenizer, and [PAD] [UNK] [CLS] [SEP] [MASK].

  `encode` gives the text's pieces alone; models add [CLS] / [SEP] where they need them.
  """
  kind = "wordpiece"
  learns_from_text = True
  bert_specials = True
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
  def from_config(cls, t, texts):
    if t.path:
      return cls.from_file(os.path.join(t.path, cls.VOCAB_FILE) if os.path.isdir(t.path)
                           else t.path, t.lowercase)
    if texts is None:
      raise UserError("tokenizer.path is empty and there is no text to train a tokenizer on")
    return cls.train(texts, t.vocab_size, t.lowercase)

  @classmethod
  def saved_in(cls, directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, cls.VOCAB_FILE))

  @classmethod
  def from_saved(cls, directory: str) -> "WordPieceTokenizer":
    settings = os.path.join(directory, cls.SETTINGS_FILE)
    lowercase = json.load(open(settings))["lowercase"] if os.path.isfile(settings) else True
    return cls.from_file(os.path.join(directory, cls.VOCAB_FILE), lowercase)

  def config_values(self) -> dict:
    return {**super().config_values(), "lowercase": self.lowercase}

  def for_encoder(self, ids: list[int], max_length: int) -> list[int]:
    return [self.cls_id] + ids[:max_length - 2] + [self.sep_id]

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


@register
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
  def from_config(cls, t, texts):
    if not t.path:
      raise UserError("tokenizer.kind=hf reads an existing tokenizer.json: set tokenizer.path to "
                      "its folder")
    return cls.from_folder(t.path if os.path.isdir(t.path) else os.path.dirname(t.path))

  @classmethod
  def saved_in(cls, directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, cls.SPECIALS_FILE))

  @classmethod
  def from_saved(cls, directory: str) -> "HFTokenizer":
    return cls.from_folder(directory)

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
