"""Llama-family blocks as switches: rotary positions, RMSNorm, the gated MLP, grouped-query
attention; Llama (and Qwen2) checkpoints to and from Hugging Face, against transformers."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import config as config_lib
from llm import model as model_lib
from llm.inference import sampling
from llm.model import layers

import torch  # test dependencies (requirements-test.txt): a missing one fails, never skips
import transformers

LLAMA = {"positions": "rope", "norm": "rmsnorm", "mlp": "gated", "activation": "silu",
         "use_bias": False, "tie_embeddings": False}


def _model(**changes):
  cfg = config_lib.base_config().model
  cfg.update({"num_layers": 2, "num_heads": 4, "d_model": 32, "d_ff": 48, "max_len": 24,
              **changes})
  return model_lib.build(cfg, 97)


def _random_params(model, seed=0):
  """Matrices large enough that greedy decoding does not just repeat a token."""
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))[
      "params"])
  return jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x, params)


def test_rope_rotates_each_pair_by_position_times_frequency():
  H, theta = 4, 100.0
  cfg = layers.TransformerConfig(vocab_size=1, max_len=8, num_layers=1, num_heads=1, d_model=H,
                                 d_ff=1, rope_theta=theta)
  x = jnp.asarray([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, H)
  for position in (1, 5):
    out = layers.rope(x, jnp.asarray([[position]]), layers.rope_frequencies(cfg)).ravel()
    # pairs (0, 2) and (1, 3) turn by position / theta^(0/4) and position / theta^(2/4)
    expected = []
    for i, (a, b) in enumerate(((1.0, 3.0), (2.0, 4.0))):
      angle = position / theta ** (2 * i / H)
      expected.append((a * np.cos(angle) - b * np.sin(angle), a * np.sin(angle) + b * np.cos(angle)))
    np.testing.assert_allclose(out, [expected[0][0], expected[1][0], expected[0][1],
                                     expected[1][1]], rtol=1e-6)


def test_rope_scores_depend_only_on_the_distance():
  cfg = layers.TransformerConfig(vocab_size=1, max_len=64, num_layers=1, num_heads=2, d_model=16,
                                 d_ff=1, rope_scaling=(8.0, 1.0, 4.0, 16))
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.float32) for _ in range(2))
  inv_freq = layers.rope_frequencies(cfg)

  def scores(shift):
    positions = jnp.arange(6)[None] + shift
    return jnp.einsum("blnh,bsnh->bnls", layers.rope(q, positions, inv_freq),
                      layers.rope(k, positions, inv_freq))

  np.testing.assert_allclose(scores(0), scores(37), atol=1e-4)
  assert not np.allclose(scores(0), jnp.einsum("blnh,bsnh->bnls", q, k), atol=1e-2)


GRID = {
    "llama_gqa": dict(LLAMA, num_kv_heads=2),
    "mqa_sinusoidal_gated_gelu": dict(positions="sinusoidal", mlp="gated", activation="gelu",
                                      num_kv_heads=1),
    "nope_rmsnorm_scanned": dict(positions="none", norm="rmsnorm", scan_layers=True),
}


@pytest.mark.parametrize("switches", GRID)
def test_cached_decoding_and_padding_hold_for_every_block(switches):
  model = _model(**GRID[switches])
  params = _random_params(model)
  prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
  prompt = np.zeros((2, 5), np.int32)
  valid = np.zeros((2, 5), bool)
  for row, ids in enumerate(prompts):  # left-padded
    prompt[row, 5 - len(ids):], valid[row, 5 - len(ids):] = ids, True

  def generate(prompt, valid, use_cache):
    return np.asarray(sampling.generate_tokens(
        model, params, prompt, valid, jax.random.PRNGKey(0), -1, max_new_tokens=6,
        temperature=0.0, top_k=0, top_p=1.0, use_cache=use_cache))

  cached = generate(prompt, valid, True)
  np.testing.assert_array_equal(cached, generate(prompt, valid, False))
  alone = generate(np.asarray([prompts[0]], np.int32), np.ones((1, 3), bool), True)
  np.testing.assert_array_equal(cached[:1], alone)
  assert len(set(cached.ravel().tolist())) > 1  # a model that says something


def test_gqa_with_all_heads_is_mha_and_its_cache_is_smaller():
  mha, gqa_all, gqa = _model(**LLAMA), _model(**LLAMA, num_kv_heads=4), _model(**LLAMA,
                                                                                num_kv_heads=1)
  params = _random_params(mha)
  tokens = jnp.asarray([[1, 2, 3, 4]])
  assert (mha.apply({"params": params}, tokens) == gqa_all.apply({"params": params},
                                                                  tokens)).all()

  def cache_bytes(model):
    cache = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 24), jnp.int32),
                                              decode=True)["cache"])
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)
               if x.ndim == 4)  # keys and values

  assert cache_bytes(gqa) * 4 == cache_bytes(mha)


# ---------------------------------------------------------------------------------------------
# Hugging Face Llama and Qwen2


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, test_data=os.path.join(os.path.dirname(__file__), "data")):
  """A small byte-level BPE tokenizer.json with <s> and </s>, as Llama 3 and SmolLM ship one."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  directory = tmp_path_factory.mktemp("tokenizer")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  with open(os.path.join(test_data, "sms_spam", "SMSSpamCollection")) as f:
    texts = [line.split("\t", 1)[1] for line in f]
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))
  return directory


HF_SHAPES = {
    "llama_gqa_untied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_mha_tied_llama3_rope": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True,
                                                 rope_theta=500000.0, rope_scaling={
                                                     "rope_type": "llama3", "factor": 4.0,
                                                     "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 16})),
    "qwen2_qkv_bias": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # Mixtures of experts: Mixtral (softmax over the top 2), Qwen3-MoE (QK norm, a head width
    # of its own, no renormalisation, the first block dense).
    "mixtral": ("mixtral", dict(num_key_value_heads=2, num_local_experts=4,
                                num_experts_per_tok=2)),
    "qwen3_moe": ("qwen3_moe", dict(num_key_value_heads=2, head_dim=12, num_experts=4,
                                    num_experts_per_tok=2, moe_intermediate_size=24,
                                    norm_topk_prob=False, mlp_only_layers=[0])),
}


def _save_hf(directory, tokenizer_dir, kind, **config):
  import shutil
  torch.manual_seed(0)
  classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
             "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
             "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM)}
  config_class, model_class = classes[kind]
  cfg = config_class(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, bos_token_id=0,
                     eos_token_id=1, initializer_range=0.2, **config)
  model = model_class(cfg).eval()
  with torch.no_grad():  # biases and norm scales start at zero or one: make them count
    for name, p in model.named_parameters():
      if name.endswith("bias") or name.endswith("norm.weight"):
        p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
  model.save_pretrained(directory)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(directory, name))
  return model


@pytest.mark.parametrize("shape", HF_SHAPES)
def test_llama_family_imports_and_exports_with_transformers_parity(tmp_path, tokenizer_dir, shape):
  from llm.runs import hf
  kind, config = HF_SHAPES[shape]
  reference = _save_hf(tmp_path / "hf", tokenizer_dir, kind, **config)
  values, tokenizer, params = hf.load(str(tmp_path / "hf"))
  assert tokenizer.eot_id == 1 and tokenizer.bos_id == 0 and tokenizer.vocab_size == 300
  model_cfg = config_lib.base_config().model
  model_cfg.update(values)
  model = model_lib.build(model_cfg, tokenizer.vocab_size)
  ids = np.random.default_rng(0).integers(0, 300, (2, 20))
  with torch.no_grad():
    expected = reference(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(model.apply({"params": params}, ids))
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)

  # Greedy decoding with the KV cache equals transformers' generate, token for token.
  prompt = ids[:1, :6]
  with torch.no_grad():
    theirs = reference.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False,
                                eos_token_id=None, pad_token_id=0).numpy()[0, 6:]
  mine = sampling.generate_tokens(model, params, prompt, np.ones_like(prompt, bool),
                                  jax.random.PRNGKey(0), -1, max_new_tokens=8, temperature=0.0,
                                  top_k=0, top_p=1.0, use_cache=True)
  np.testing.assert_array_equal(np.asarray(mine)[0], theirs)

  # Export: transformers reads the folder back, logits and tokenizer included.
  hf.save(str(tmp_path / "out"), model_cfg, model.cfg, tokenizer, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  assert type(reloaded) is type(reference)
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(torch.tensor(ids)).logits.numpy(), expected, atol=1e-4)
  text = "Free entry in 2 a wkly comp to win FA Cup final tkts"
  their_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
  assert their_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
  assert their_tokenizer.eos_token_id == tokenizer.eot_id
  # A run keeps it (DIR/tokenizer) and reads it back; tokenizer.kind=hf builds it from a folder.
  from llm.text import tokenizer as tokenizer_lib
  tokenizer.save(str(tmp_path / "kept"))
  for again in (tokenizer_lib.load(str(tmp_path / "kept")), tokenizer_lib.build(
      config_lib.replace(config_lib.base_config(), {"tokenizer.kind": "hf",
                                                    "tokenizer.path": str(tokenizer_dir)}),
      None, str(tmp_path / "built"))):
    assert (again.encode(text), again.eot_id, again.bos_id) == (tokenizer.encode(text), 1, 0)


# ---------------------------------------------------------------------------------------------
# Comparing runs


def test_compare_and_plot_draw_the_runs_and_name_what_differs(tmp_path, test_data):
  import matplotlib.image
  from conftest import tiny_config
  from llm import compare, plot
  from llm.runs import rundir
  from llm.text import gpt2
  runs, tokenizer = {}, gpt2.GPT2Tokenizer(os.path.join(test_data, "gpt2"))
  for i, (name, switches) in enumerate((("gpt", {}), ("rope", {"model.positions": "rope",
                                                               "model.norm": "rmsnorm"}))):
    runs[name] = str(tmp_path / name)  # a run's directory as training leaves it
    rundir.start(runs[name], tiny_config(tmp_path, **switches), tokenizer)
    with open(rundir.path(runs[name], rundir.METRICS), "w") as f:
      for step in range(1, 5):
        f.write(json.dumps({"step": step, "split": "train", "loss": 6.0 - step / (i + 2),
                            "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 1000.0 + i}) + "\n")
      f.write(json.dumps({"step": 4, "split": "eval", "loss": 5.5 - i}) + "\n")
  opened = [compare.RunSummary(runs["gpt"]), compare.RunSummary(runs["rope"])]
  assert compare.differing_keys(opened) == ["model.norm", "model.positions"]
  table = compare.table(opened).splitlines()
  assert table[0].split()[:3] == ["run", "model.norm", "model.positions"]
  gpt_row, rope_row = table[2].split(), table[3].split()
  assert gpt_row == ["gpt", "layernorm", "learned", gpt_row[3], "4.0000", "5.5000", "1,000"]
  assert rope_row[:3] == ["rope", "rmsnorm", "rope"] and rope_row[5] == "4.5000"
  # no position embedding (32 x 32) and no norm biases (5 x 32) in the rotary RMSNorm model
  assert int(gpt_row[3].replace(",", "")) - int(rope_row[3].replace(",", "")) == 32 * 32 + 5 * 32
  compare.plot(opened, str(tmp_path / "compare.png"))
  plot.plot(runs["rope"], str(tmp_path / "curves.png"))
  for png in ("compare.png", "curves.png"):
    height, width, _ = matplotlib.image.imread(str(tmp_path / png)).shape
    assert width > 1000 and height > 300
