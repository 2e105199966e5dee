"""Data at corpus scale: shards prepared once (llm.prepare), streaming, documents kept apart."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, TEST_DATA, read_metrics, tiny_config
from llm.data import shards, sources, stream, windows
from llm.errors import UserError
from llm.text.gpt2 import GPT2Tokenizer


@pytest.fixture(scope="module")
def gpt2():
  return GPT2Tokenizer(os.path.join(TEST_DATA, "gpt2"))


@pytest.fixture(scope="module")
def docs():
  return sources.embedded_corpus().select(range(12))


def _expected(docs, tok):
  return np.concatenate([tok.encode(t) + [tok.eot_id] for t in docs["text"]])


def test_shards_hold_every_document_followed_by_end_of_text(tmp_path, docs, gpt2, monkeypatch):
  prepared = shards.prepare(docs, gpt2, "text", str(tmp_path / "s"), documents_per_shard=5,
                                progress=False)
  expected = _expected(docs, gpt2)
  assert [s["documents"] for s in prepared.index["shards"]] == [5, 5, 2]
  assert np.array_equal(np.asarray(prepared.tokens), expected)
  first = prepared.index["shards"][0]["tokens"]  # a read across the first shard's end
  assert np.array_equal(prepared.tokens.read(first - 3, first + 4), expected[first - 3:first + 4])
  part = prepared.tokens.sub(10, 100)
  assert len(part) == 90 and np.array_equal(part.read(5, 20), expected[15:30])
  assert shards.saved_tokenizer(str(tmp_path / "s")).fingerprint() == gpt2.fingerprint()
  # A bucket's shards are read by byte range, not memory-mapped: the same tokens.
  monkeypatch.setattr(shards, "_is_local", lambda path: False)
  remote = shards.open_shards(str(tmp_path / "s"), gpt2)
  assert isinstance(remote.tokens.parts[0], shards._RemoteArray)
  assert np.array_equal(remote.tokens.read(first - 3, first + 4), expected[first - 3:first + 4])


def test_a_killed_preparation_completes_to_the_same_shards(tmp_path, docs, gpt2, monkeypatch):
  whole = tmp_path / "whole"
  shards.prepare(docs, gpt2, "text", str(whole), documents_per_shard=4, progress=False)
  killed = tmp_path / "killed"
  real_encode, encoded = shards.encode_documents, []

  def encode_then_die(texts, *args):
    if len(encoded) == 2:  # killed while the third shard is being written
      raise KeyboardInterrupt
    encoded.append(len(texts))
    return real_encode(texts, *args)

  monkeypatch.setattr(shards, "encode_documents", encode_then_die)
  with pytest.raises(KeyboardInterrupt):
    shards.prepare(docs, gpt2, "text", str(killed), documents_per_shard=4, progress=False)
  assert not [n for n in os.listdir(killed) if n.endswith(".tmp")]  # removed as it stopped
  assert not (killed / "index.json").exists() and (killed / "00001.json").exists()
  with pytest.raises(UserError, match="unfinished"):  # not readable as it is
    shards.open_shards(str(killed), gpt2)
  encoded.clear()
  monkeypatch.setattr(shards, "encode_documents",
                      lambda texts, *a: encoded.append(len(texts)) or real_encode(texts, *a))
  shards.prepare(docs, gpt2, "text", str(killed), documents_per_shard=4, progress=False)
  assert sum(encoded) == 4  # only the shard that was not written is tokenized again
  for name in sorted(os.listdir(whole)):
    if name.endswith((".npy", ".json")):
      assert (whole / name).read_bytes() == (killed / name).read_bytes(), name
  assert not [n for n in os.listdir(killed) if n.endswith(".tmp")]


def test_bad_shard_folders_fail_in_one_line_and_nothing_is_overwritten(tmp_path, docs, gpt2):
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="no complete preparation"):
    shards.open_shards(str(tmp_path / "empty"), gpt2)
  folder = tmp_path / "s"
  shards.prepare(docs, gpt2, "text", str(folder), documents_per_shard=5, progress=False)
  before = {n: (folder / n).read_bytes() for n in os.listdir(folder) if n.endswith(".npy")}
  other = sources.embedded_corpus().select(range(3))
  from llm.text.sentencepiece import SentencePieceTokenizer
  sp = SentencePieceTokenizer.train(sources.first_chars(other["text"], 10**9), 400,
                                    str(tmp_path / "sp"))
  with pytest.raises(UserError, match="another tokenizer"):
    shards.open_shards(str(folder), sp)
  with pytest.raises(UserError, match="another tokenizer"):  # preparing into it does not help
    shards.prepare(docs, sp, "text", str(folder), progress=False)
  shard = folder / "00001.npy"
  shard.write_bytes(before["00001.npy"][:-10])
  with pytest.raises(UserError, match="00001.npy .* truncated"):
    shards.open_shards(str(folder), gpt2)
  # An unfinished preparation of other data is not mixed with this one.
  partial = tmp_path / "partial"
  partial.mkdir()
  (partial / "plan.json").write_text(json.dumps({"format": shards.FORMAT, "documents": 3}))
  with pytest.raises(UserError, match="unfinished preparation of other data"):
    shards.prepare(docs, gpt2, "text", str(partial), progress=False)
  assert os.listdir(partial) == ["plan.json"]
  # Through the command line: one line, exit status 2.
  result = subprocess.run(
      [sys.executable, "-m", "llm.train", "--config=configs/gpt_tiny.py",
       f"--config.data.prepared={tmp_path / 'empty'}", f"--workdir={tmp_path / 'run'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
  assert "no complete preparation" in result.stderr and not (tmp_path / "run").exists()


def test_training_on_prepared_shards_gives_the_losses_of_the_cached_stream(tmp_path):
  from llm import prepare
  from llm.runs.trainer import train
  cfg = tiny_config(tmp_path, **{"train.steps": 2})
  prepared = prepare.prepare(cfg, str(tmp_path / "shards"), documents_per_shard=10,
                           progress=False)
  assert len(prepared.index["shards"]) == 8
  train(cfg, str(tmp_path / "cached"))
  cfg.data.prepared = str(tmp_path / "shards")
  cfg.data.cache_dir = str(tmp_path / "unused")
  train(cfg, str(tmp_path / "prepared"))
  losses = [[m["loss"] for m in read_metrics(tmp_path / run)]
            for run in ("cached", "prepared")]
  assert losses[0] == losses[1]  # bit for bit, eval included
  assert not (tmp_path / "unused").exists()  # nothing tokenized again


def _jsonl(tmp_path, docs, n=30):
  path = tmp_path / "docs.jsonl"
  with open(path, "w") as f:
    for text in docs["text"][:n]:
      f.write(json.dumps({"text": text}) + "\n")
  return path


def test_a_stream_resumes_exactly_and_keeps_the_stream_order(tmp_path, gpt2):
  all_docs = sources.embedded_corpus()
  cfg = tiny_config(tmp_path).data
  cfg.path = str(_jsonl(tmp_path, all_docs))
  expected = _expected(all_docs.select(range(30)), gpt2)
  reference = np.stack([expected[s:s + 17] for s in range(0, 16 * 200, 16)])  # stride 16

  def batches(shuffle_buffer):
    return stream.stream_batches(sources.open_documents(cfg, stream=True, check=False), gpt2,
                                 "text", 16, 16, batch_size=4, grad_accum=2, eval_batches=2,
                                 shuffle_buffer=shuffle_buffer, seed=0)

  # Unshuffled, the stream's windows are the token stream's, in order: first the 2 x 2
  # validation windows, then training.
  train, evals = batches(0)
  assert np.array_equal(np.concatenate([b["inputs"] for b in evals]), reference[:4, :-1])
  got = np.concatenate([next(train)["inputs"].reshape(-1, 16) for _ in range(30)])
  assert np.array_equal(got, reference[4:124, :-1])
  train.windows.close()
  # Shuffled in blocks of 7 windows: the same windows, another order; a resumed stream hands out
  # exactly the batches the uninterrupted one does, across blocks and documents batches.
  train, _ = batches(7)
  first = [next(train) for _ in range(5)]
  state = json.loads(json.dumps(train.state()))  # as a checkpoint keeps it
  rest = [next(train) for _ in range(30)]
  got = np.concatenate([b["inputs"].reshape(-1, 16) for b in first + rest[:2]])
  assert not np.array_equal(got[:28], reference[4:32, :-1])
  assert sorted(map(tuple, got[:28])) == sorted(map(tuple, reference[4:32, :-1]))
  resumed, _ = batches(7)
  resumed.restore(state)
  for want in rest:
    assert np.array_equal(next(resumed)["inputs"], want["inputs"])
  train.windows.close()
  resumed.windows.close()


@pytest.mark.slow
def test_a_streamed_run_with_document_masks_resumes_exactly(tmp_path):
  from llm.runs.trainer import train
  cfg = tiny_config(tmp_path, **{"data.streaming": True, "data.document_masks": True,
                                 "data.shuffle_buffer": 16, "train.steps": 4,
                                 "train.checkpoint_every": 2, "train.eval_every": 2})
  cfg.data.path = str(_jsonl(tmp_path, sources.embedded_corpus(), 40))
  train(cfg, str(tmp_path / "straight"))
  cfg.train.steps = 2
  train(cfg, str(tmp_path / "resumed"))
  cfg.train.steps = 4
  train(cfg, str(tmp_path / "resumed"))
  losses = [{m["step"]: m["loss"] for m in read_metrics(tmp_path / run)}
            for run in ("straight", "resumed")]
  assert losses[0] == losses[1] and len(losses[0]) == 4


def test_document_windows_hold_each_tokens_document_and_position():
  eot = 9
  example = windows.window_examples(np.array([[1, 2, eot, 3, eot, eot, 4, 5, 6]]), eot)
  assert example["documents"].tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
  assert example["positions"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_with_document_masks_a_document_does_not_see_the_one_before(positions):
  import jax
  from llm.model import build
  cfg = tiny_config(pathlib.Path("unused")).model
  cfg.update(positions=positions)
  model = build(cfg, vocab_size=50)
  eot = 49
  rng = np.random.default_rng(0)
  second = rng.integers(0, 49, 10).tolist()
  rows = [rng.integers(0, 49, n).tolist() + [eot] + second for n in (5, 8, 8)]
  rows = [w + [eot] * (20 - len(w)) for w in rows]  # one length; extra documents at the end
  example = windows.window_examples(np.array(rows), eot)
  params = model.init(jax.random.PRNGKey(0), example["inputs"][:1])["params"]
  logits = np.asarray(model.apply({"params": params}, example["inputs"],
                                  positions_BxL=example["positions"],
                                  documents_BxL=example["documents"]))
  starts = [6, 9, 9]  # where the second document starts in each window
  seen = [logits[i, s:s + 10] for i, s in enumerate(starts)]
  np.testing.assert_allclose(seen[0], seen[1], atol=1e-5)  # another length before it
  np.testing.assert_allclose(seen[1], seen[2], atol=1e-5)  # other tokens before it
  plain = np.asarray(model.apply({"params": params}, example["inputs"]))
  assert np.abs(plain[1, 9:19] - plain[2, 9:19]).max() > 1e-3  # without masks, it does
