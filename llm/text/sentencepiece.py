"""SentencePiece BPE with byte fallback (tokenizer.kind=sentencepiece): trained on the run's text,
or read from a .model file (Llama 2's and Mistral's tokenizers among them)."""

import json
import os
import tempfile
from collections.abc import Iterable

from llm.errors import UserError
from llm.text.tokenizer import register, Tokenizer


def _char_index(text: str) -> list[int]:
  """UTF-8 byte offset -> the index of the character it falls in (and len(text) at the end)."""
  index = [i for i, c in enumerate(text) for _ in c.encode("utf-8")]
  return index + [len(text)]


@register
class SentencePieceTokenizer(Tokenizer):
  kind = "sentencepiece"
  learns_from_text = True
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
  def from_config(cls, t, texts):
    if t.path:
      path = os.path.join(t.path, cls.MODEL_FILE) if os.path.isdir(t.path) else t.path
      return cls(path)
    if texts is None:
      raise UserError("tokenizer.path is empty and there is no text to train a tokenizer on")
    with tempfile.TemporaryDirectory() as tmp:
      return cls.train(texts, t.vocab_size, tmp)

  @classmethod
  def saved_in(cls, directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, cls.MODEL_FILE))

  @classmethod
  def from_saved(cls, directory: str) -> "SentencePieceTokenizer":
    return cls.from_folder(directory, cls.MODEL_FILE)

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

  def hf_files(self, directory: str, max_len: int) -> None:
    """tokenizer.json and tokenizer_config.json: the same tokenizer for transformers'
    AutoTokenizer (and TRL, vLLM), ids equal to ours. A BPE model with byte fallback whose merges
    come from the pieces' ranks (a sentencepiece BPE merges the pair making its best-ranked
    piece first), the model's whitespace rules as a normalizer, its user-defined pieces as
    added tokens, and its control pieces as special tokens."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    proto = sentencepiece_model_pb2.ModelProto.FromString(self._proto)
    spec, kinds = proto.normalizer_spec, sentencepiece_model_pb2.ModelProto.SentencePiece
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE or (
        spec.remove_extra_whitespaces or spec.precompiled_charsmap):
      print("note: this sentencepiece model (not BPE, or normalizing its text) is saved as it is;"
            " transformers' AutoTokenizer does not read it")
      return
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = []
    for piece in proto.pieces:
      if piece.type == kinds.NORMAL and len(piece.piece) > 1:
        text = piece.piece
        merges += [(vocab[text], vocab[text[:k]], vocab[text[k:]], text[:k], text[k:])
                   for k in range(1, len(text)) if text[:k] in vocab and text[k:] in vocab]
    merges.sort()
    unk = proto.pieces[self._sp.unk_id()].piece
    tokenizer = HFTokenizer(models.BPE(vocab, [(left, right) for *_, left, right in merges],
                                       unk_token=unk, byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Prepend("▁")] if spec.add_dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else []))
    tokenizer.add_tokens([AddedToken(p.piece, normalized=False, special=False)
                          for p in proto.pieces if p.type == kinds.USER_DEFINED])
    specials = [p.piece for p in proto.pieces if p.type in (kinds.CONTROL, kinds.UNKNOWN)]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t in specials])
    bos, eos = self.template_tokens["bos_token"], self.template_tokens["eos_token"]
    first, last = ([bos] if self.add_bos else []), ([eos] if self.add_eos else [])
    if first or last:
      tokenizer.post_processor = processors.TemplateProcessing(
          single=" ".join(first + ["$A"] + last),
          special_tokens=[(t, vocab[t]) for t in dict.fromkeys(first + last)])
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "bos_token": bos, "eos_token": eos, "unk_token": unk,
              "add_bos_token": self.add_bos, "add_eos_token": self.add_eos}
    if self._sp.pad_id() >= 0:
      config["pad_token"] = self._sp.id_to_piece(self._sp.pad_id())
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2)

  def fingerprint(self):
    import hashlib
    return "sp-" + hashlib.sha256(self._proto).hexdigest()[:16]
