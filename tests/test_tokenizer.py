import os

import pytest

from llm.data import sources
from llm.errors import UserError
from llm.text import tokenizer
from llm.text.gpt2 import GPT2Tokenizer
from llm.text.sentencepiece import SentencePieceTokenizer

VARIED = "Hello, world!  Tabs\tand  spaces\n\nnumbers 12345 3.14, unicode: héllo 世界 🙂, <|endoftext|> end"


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
  texts = sources.first_chars(sources.embedded_corpus()["text"], 10**9)
  return SentencePieceTokenizer.train(texts, 512, str(tmp_path_factory.mktemp("sp")))


def test_sentencepiece_round_trips_any_text(sentencepiece):
  assert sentencepiece.vocab_size == 512
  for text in (VARIED, "def f(x):\n    return x  # comment\n", ""):
    assert sentencepiece.decode(sentencepiece.encode(text)) == text
  # Byte fallback: a character never seen in training still encodes, as its UTF-8 bytes.
  assert len(sentencepiece.encode("ꙮ")) == 3


def test_sentencepiece_saves_and_loads_identically(sentencepiece, tmp_path):
  sentencepiece.save(str(tmp_path))
  loaded = tokenizer.load(str(tmp_path))
  assert loaded.encode(VARIED) == sentencepiece.encode(VARIED)
  assert loaded.fingerprint() == sentencepiece.fingerprint()
  assert (loaded.eot_id, loaded.pad_id) == (sentencepiece.eot_id, sentencepiece.pad_id)


def test_gpt2_bpe_from_files(test_data, tmp_path):
  gpt2 = GPT2Tokenizer(os.path.join(test_data, "gpt2"))
  assert gpt2.encode("Hello, I am") == [15496, 11, 314, 716]
  assert gpt2.eot_id == 50256 and gpt2.vocab_size == 50257
  assert gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]
  assert gpt2.decode(gpt2.encode(VARIED)) == VARIED
  gpt2.save(str(tmp_path))
  assert tokenizer.load(str(tmp_path)).encode(VARIED) == gpt2.encode(VARIED)


def test_gpt2_folder_without_files_fails_clearly(tmp_path):
  with pytest.raises(UserError, match="vocab.bpe"):
    GPT2Tokenizer(str(tmp_path))
