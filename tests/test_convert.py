"""GPT-2 to and from Hugging Face: parity with transformers on small random models, offline."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, train_classifier_from

import torch  # test dependencies (requirements-test.txt): a missing one fails, never skips
import transformers

VARIED_TEXT = ("Héllo wörld! 你好, мир 🙂  tabs\tand   spaces\n\n\nnumbers 3.14159 1,000,000 "
               "x=42;y = -7 it's we'll they're <|endoftext|>next document   trailing  ")


def save_hf_gpt2(directory, test_data, seed=0, init=0.02, **config):
  """A random GPT2LMHeadModel with the GPT-2 tokenizer, saved the way transformers saves."""
  from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
  torch.manual_seed(seed)
  cfg = GPT2Config(vocab_size=50257, initializer_range=init, **config)
  model = GPT2LMHeadModel(cfg).eval()
  model.save_pretrained(directory)
  gpt2 = os.path.join(test_data, "gpt2")
  GPT2TokenizerFast(vocab=os.path.join(gpt2, "encoder.json"),
                    merges=os.path.join(gpt2, "vocab.bpe")).save_pretrained(directory)
  return model


def hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def our_logits(workdir, ids):
  from llm.runs import loading
  run = loading.load(workdir)
  return np.asarray(run.model.apply({"params": run.params}, ids))


SHAPES = {
    "untied": dict(n_layer=2, n_head=4, n_embd=64, n_positions=48, tie_word_embeddings=False),
    "tied": dict(n_layer=3, n_head=2, n_embd=32, n_positions=40, n_inner=48,
                 layer_norm_epsilon=1e-6, activation_function="gelu"),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_converted_logits_equal_transformers_and_export_reloads(tmp_path, test_data, shape):
  from llm import convert
  hf_dir, run_dir, out_dir = tmp_path / "hf", tmp_path / "run", tmp_path / "out"
  reference = save_hf_gpt2(hf_dir, test_data, **SHAPES[shape])
  convert.from_hf(str(hf_dir), str(run_dir))
  ids = np.random.default_rng(0).integers(0, 50257, (2, 24))
  expected = hf_logits(reference, ids)
  np.testing.assert_allclose(our_logits(str(run_dir), ids), expected, atol=1e-4, rtol=0)

  convert.to_hf(str(run_dir), str(out_dir))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
  np.testing.assert_allclose(hf_logits(reloaded, ids), expected, atol=1e-4, rtol=0)
  assert reloaded.config.tie_word_embeddings == (shape == "tied")
  hf_tok = transformers.AutoTokenizer.from_pretrained(out_dir)
  assert hf_tok(VARIED_TEXT)["input_ids"] == hf_tok.encode(VARIED_TEXT)  # loads and encodes
  from llm.text import tokenizer as tokenizer_lib
  assert tokenizer_lib.load(str(run_dir / "tokenizer")).encode(VARIED_TEXT) == hf_tok.encode(
      VARIED_TEXT)


def test_vocabulary_padding_is_dropped_on_export(tmp_path, test_data):
  """A checkpoint padded to 50304 rows imports; the export has the tokenizer's 50257 again."""
  from transformers import GPT2Config, GPT2LMHeadModel
  from llm import convert
  torch.manual_seed(1)
  padded = GPT2LMHeadModel(GPT2Config(vocab_size=50304, n_layer=1, n_head=2, n_embd=32,
                                      n_positions=32)).eval()
  save_hf_gpt2(tmp_path / "hf", test_data)  # the tokenizer files
  padded.save_pretrained(tmp_path / "hf")
  convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
  ids = np.random.default_rng(1).integers(0, 50257, (1, 16))
  np.testing.assert_allclose(our_logits(str(tmp_path / "run"), ids), hf_logits(padded, ids),
                             atol=1e-4, rtol=0)
  convert.to_hf(str(tmp_path / "run"), str(tmp_path / "out"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert reloaded.config.vocab_size == 50257
  np.testing.assert_allclose(hf_logits(reloaded, ids), hf_logits(padded, ids)[..., :50257],
                             atol=1e-4, rtol=0)


def test_gpt2_bpe_equals_transformers_tokenizer(test_data):
  from transformers import GPT2TokenizerFast
  from llm.text.gpt2 import GPT2Tokenizer
  gpt2 = os.path.join(test_data, "gpt2")
  ours = GPT2Tokenizer(gpt2)
  theirs = GPT2TokenizerFast(vocab=os.path.join(gpt2, "encoder.json"),
                             merges=os.path.join(gpt2, "vocab.bpe"))
  for text in (VARIED_TEXT, VARIED_TEXT * 3, " leading space", "\n\n", "a" * 300, ""):
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ours.decode(ids) == theirs.decode(ids) == text
  assert ours.encode("<|endoftext|>") == [50256]


def test_evaluate_equals_transformers_loss(tmp_path, test_data):
  """llm.evaluate's loss is transformers' mean next-token loss over the same windows."""
  from llm import convert
  from llm.runs import loading
  reference = save_hf_gpt2(tmp_path / "hf", test_data, n_layer=1, n_head=2, n_embd=32,
                           n_positions=32)
  convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
  text = (VARIED_TEXT + " ") * 8
  (tmp_path / "story.txt").write_text(text)
  run = loading.load(str(tmp_path / "run"))
  result = run.task.perplexity(run, str(tmp_path / "story.txt"), max_length=32, batch_size=3,
                               cache_dir=str(tmp_path / "cache"))
  stream = run.tokenizer.encode(text) + [run.tokenizer.eot_id]
  windows = [torch.tensor([stream[s:s + 33]]) for s in range(0, len(stream) - 32, 32)]
  with torch.no_grad():  # labels = inputs: transformers shifts them itself
    losses = [reference(w[:, :-1], labels=w[:, :-1]).loss.item() * 31 +
              -reference(w[:, :-1]).logits[0, -1].log_softmax(-1)[w[0, -1]].item()
              for w in windows]  # + the window's last target, which transformers drops
  assert result["tokens"] == 32 * len(windows)
  np.testing.assert_allclose(result["loss"], sum(losses) / result["tokens"], rtol=1e-5)
  assert abs(result["loss"] - np.log(50257)) < 0.5  # a random model: about ln(V)


def _rewrite(directory, change):
  from safetensors.numpy import load_file, save_file
  path = os.path.join(directory, "model.safetensors")
  tensors = load_file(path)
  change(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def test_missing_or_mismatched_tensor_is_named(tmp_path, test_data):
  from llm import convert
  from llm.errors import UserError
  save_hf_gpt2(tmp_path / "hf", test_data, n_layer=2, n_head=2, n_embd=32, n_positions=32)
  missing = "transformer.h.1.mlp.c_fc.bias"
  _rewrite(tmp_path / "hf", lambda t: t.pop(missing))
  with pytest.raises(UserError, match="tensor h.1.mlp.c_fc.bias is missing"):
    convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()

  save_hf_gpt2(tmp_path / "hf2", test_data, n_layer=2, n_head=2, n_embd=32, n_positions=32)
  _rewrite(tmp_path / "hf2", lambda t: t.update(
      {"transformer.h.0.attn.c_proj.weight": np.zeros((32, 16), np.float32)}))
  with pytest.raises(UserError, match=r"tensor h.0.attn.c_proj.weight has shape \(32, 16\)"):
    convert.from_hf(str(tmp_path / "hf2"), str(tmp_path / "run"))

  # The command line says the same in one line, exit code 2.
  proc = subprocess.run([sys.executable, "-m", "llm.convert", f"--from_hf={tmp_path / 'hf'}",
                         f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"error: {tmp_path / 'hf'}: tensor h.1.mlp.c_fc.bias is missing (config.json expects it "
      "with shape (128,))"]
  with open(tmp_path / "hf2" / "config.json") as f:
    assert json.load(f)["n_layer"] == 2  # the input folder is left as it was


def test_hf_folder_works_as_init_from(tmp_path, test_data):
  """Fine-tuning straight from a Hugging Face folder: the backbone is the converted GPT-2."""
  from flax import traverse_util
  from llm import convert
  from llm.runs import loading, rundir
  save_hf_gpt2(tmp_path / "hf", test_data, n_layer=1, n_head=2, n_embd=32, n_positions=64)
  workdir = train_classifier_from(tmp_path, str(tmp_path / "hf"), "head")
  assert rundir.read_config(workdir).model.max_len == 64  # the source's shape
  tuned = traverse_util.flatten_dict(loading.load(workdir).params, sep="/")
  convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "converted"))
  base = traverse_util.flatten_dict(loading.load(str(tmp_path / "converted")).params, sep="/")
  assert {p for p in tuned if not p.startswith("head/")} == {"backbone/" + p for p in base}
  for path, value in base.items():
    np.testing.assert_array_equal(tuned["backbone/" + path], value)


def test_a_trained_sentencepiece_tokenizer_exports_for_transformers(tmp_path, base_run, records):
  """A run of ours (its BPE trained here) as a folder transformers, TRL and vLLM load: the same
  ids from AutoTokenizer, the same logits from AutoModelForCausalLM."""
  from llm import convert
  from llm.runs import loading
  convert.to_hf(base_run, str(tmp_path / "hf"))
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  ours = loading.load(base_run).tokenizer
  texts = [VARIED_TEXT] + [" ".join(map(str, r.values())) for r in json.load(open(records))[:20]]
  for text in texts:
    assert hf_tok(text)["input_ids"] == ours.encode(text), text
    assert hf_tok.decode(ours.encode(text)) == ours.decode(ours.encode(text))
  assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (ours.eot_id, ours.pad_id)
  ids = np.asarray([ours.encode(texts[1])[:40], ours.encode(texts[2])[:40]])
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
  np.testing.assert_allclose(hf_logits(model, ids), our_logits(base_run, ids), atol=1e-4, rtol=0)
