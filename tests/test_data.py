import numpy as np
import pytest

from llm.data import shards, sources, windows, batches as data_batches
from llm.errors import UserError


def test_windows_follow_the_stride():
  tokens = np.arange(20)
  starts = windows.window_starts(len(tokens), max_length=4, stride=3)
  # Windows of 5 tokens (4 inputs + 1 shifted target) starting every 3 tokens, as in the book.
  assert starts.tolist() == [0, 3, 6, 9, 12, 15]
  batches = windows.train_windows(tokens, 4, 3, batch_size=6, grad_accum=1, seed=0)
  batch = next(batches)
  rows = sorted(map(tuple, batch["inputs"][0]))
  assert rows == [tuple(range(s, s + 4)) for s in starts]
  for inputs, targets in zip(batch["inputs"][0], batch["targets"][0]):
    assert (targets == inputs + 1).all()
  assert batch["weights"].shape == (1, 6, 4) and batch["weights"].min() == 1


def test_batches_depend_only_on_seed_and_position():
  tokens = np.arange(1000)
  a = windows.train_windows(tokens, 8, 8, batch_size=4, grad_accum=2, seed=1)
  first = [next(a) for _ in range(32)]  # crosses epochs: 124 windows, 4 per batch
  assert a.state() == {"drawn": 32 * 4}  # counted in examples, so a batch size may change
  for state in ({"drawn": 17 * 4}, {"step": 17}):  # {"step"}: a checkpoint of before
    b = windows.train_windows(tokens, 8, 8, batch_size=4, grad_accum=2, seed=1)
    b.restore(state)
    assert all((next(b)["inputs"] == first[k]["inputs"]).all() for k in range(17, 32))
  halves = windows.train_windows(tokens, 8, 8, batch_size=2, grad_accum=1, seed=1)
  halves.restore({"drawn": 17 * 4})  # resumed with half the batch size: the next examples
  assert (np.concatenate([next(halves)["inputs"][0], next(halves)["inputs"][0]])
          == first[17]["inputs"].reshape(4, 8)).all()
  assert first[0]["inputs"].shape == (2, 2, 8)
  c = windows.train_windows(tokens, 8, 8, batch_size=4, grad_accum=2, seed=2)
  assert not (next(c)["inputs"] == first[0]["inputs"]).all()
  # Each epoch visits every window once, in a new order.
  epoch = np.concatenate([f["inputs"][..., 0].ravel() for f in first])
  assert sorted(epoch[:124].tolist()) == list(range(0, 992, 8))


def test_prefetching_hands_out_the_same_batches_and_the_consumed_position():
  tokens = np.arange(1000)
  plain = windows.train_windows(tokens, 8, 8, batch_size=4, grad_accum=1, seed=1)
  ahead = data_batches.Prefetch(
      windows.train_windows(tokens, 8, 8, batch_size=4, grad_accum=1, seed=1),
      place=lambda b: {**b, "placed": True}, size=3)
  try:
    for step in range(1, 6):
      batch = next(ahead)
      assert batch["placed"] and (batch["inputs"] == next(plain)["inputs"]).all()
      assert ahead.state() == {"drawn": 4 * step}  # not the batches made ahead
  finally:
    ahead.close()

  class Broken:  # its second batch fails
    step = 0
    def __next__(self):
      self.step += 1
      if self.step == 2:
        raise UserError("bad record 7")
      return {"inputs": np.zeros(1)}
    def state(self):
      return {"step": self.step}
  failing = data_batches.Prefetch(Broken())
  next(failing)
  with pytest.raises(UserError, match="bad record 7"):
    next(failing)
  failing.close()


def test_processes_read_disjoint_shares_of_the_global_batch():
  tokens = np.arange(1000)
  whole = next(windows.train_windows(tokens, 8, 8, batch_size=8, grad_accum=2, seed=0))
  parts = [next(windows.train_windows(tokens, 8, 8, batch_size=8, grad_accum=2, seed=0,
                               process_index=p, process_count=2)) for p in range(2)]
  assert (np.concatenate([p["inputs"] for p in parts], axis=1) == whole["inputs"]).all()


def test_eval_batches_count_every_window_once():
  batches = windows.eval_windows(np.arange(42), max_length=4, batch_size=4, num_batches=10)
  assert len(batches) == 3  # 10 windows (stride 4 within 42 tokens) fill 3 batches of 4
  weights = np.concatenate([b["weights"][:, 0] for b in batches])
  assert weights.tolist() == [1] * 10 + [0] * 2


def test_too_little_text_fails_clearly():
  with pytest.raises(UserError, match="fewer than one window"):
    windows.train_windows(np.arange(10), 16, 16, batch_size=2, grad_accum=1, seed=0)
  with pytest.raises(UserError, match="evaluation text has 3 tokens"):
    windows.eval_windows(np.arange(3), 16, 2, 2)


def test_tokens_are_cached(tmp_path, monkeypatch):
  import json
  from llm.text.sentencepiece import SentencePieceTokenizer
  docs = sources.embedded_corpus().select(range(5))
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                               for t in docs["text"]))
  cfg = _data_cfg(path=str(tmp_path / "docs.jsonl"), cache_dir=str(tmp_path / "cache"))
  tok = SentencePieceTokenizer.train(sources.first_chars(docs["text"], 10**9), 512,
                                               str(tmp_path))
  tokens = lambda ds: np.asarray(shards.prepare_tokens(cfg, ds, tok).tokens)
  first = tokens(sources.open_documents(cfg))
  assert first[-1] == tok.eot_id and (first == tok.eot_id).sum() == 5
  assert first.tolist() == sum((tok.encode(t) + [tok.eot_id] for t in docs["text"]), [])
  monkeypatch.setattr(tok, "encode_arrays", lambda _: pytest.fail("tokenized again"))
  assert (tokens(None) == first).all()
  # An edited file is another corpus.
  cached = shards.cache_folder(cfg, tok)
  (tmp_path / "docs.jsonl").write_text('{"text": "new"}\n')
  assert shards.cache_folder(cfg, tok) != cached
  monkeypatch.undo()
  assert len(tokens(sources.open_documents(cfg))) < 10


@pytest.mark.parametrize("name,content", [
    ("docs.txt", "one document\nwith two lines"),
    ("docs.jsonl", '{"text": "first"}\n{"text": "second"}\n'),
    ("docs.csv", "text,label\nfirst,1\nsecond,0\n"),
])
def test_local_files(tmp_path, name, content):
  path = tmp_path / name
  path.write_text(content)
  cfg = _data_cfg(path=str(path))
  ds = sources.open_documents(cfg)
  assert "".join(ds["text"]).replace("\n", "").startswith(("one", "first"))


def test_bad_local_data_fails_clearly(tmp_path):
  with pytest.raises(UserError, match="no such file"):
    sources.open_documents(_data_cfg(path=str(tmp_path / "missing.txt")))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"text": broken\n')
  with pytest.raises(UserError, match="could not read data"):
    sources.open_documents(_data_cfg(path=str(bad)))
  good = tmp_path / "good.jsonl"
  good.write_text('{"body": "ok"}\n')
  with pytest.raises(UserError, match="text_field"):
    sources.open_documents(_data_cfg(path=str(good)))


def _data_cfg(**kw):
  from llm.config import base_config
  cfg = base_config().data
  cfg.update(kw)
  return cfg
