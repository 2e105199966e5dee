"""Chat templates and special tokens against transformers: rendered conversations, assistant
masks, prompt ids and greedy continuations (llm/text/chat.py, llm/text/prompts.py, llm/text/tokenizer.py)."""

import json
import os

import pytest

from llm.errors import BadRecord
from llm.runs import hf
from llm.text import chat, prompts, tokenizer as tokenizer_lib
from llm.text.gpt2 import GPT2Tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data")
TEMPLATES = os.path.join(DATA, "chat_templates")

# Three tokenizer.json styles, each with its family's special tokens and chat template:
# (special tokens, post-processor's first token, eos, bos, template).
STYLES = {
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>",
               "<|begin_of_text|>", "llama3.jinja"),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>",
              None, "qwen2.jinja"),
    "sentencepiece": (["<unk>", "<s>", "</s>"], "<s>", "</s>", "<s>", "mistral.jinja"),
}


def sms_texts():
  with open(os.path.join(DATA, "sms_spam", "SMSSpamCollection")) as f:
    return [line.split("\t", 1)[1] for line in f]


def save_tokenizer(directory, style: str, vocab_size: int = 300):
  """A tokenizer.json trained on the SMS texts, as the family ships it: byte-level BPE (Llama 3,
  Qwen2) or sentencepiece-style BPE with byte fallback (Llama 2, Mistral), its chat template in
  tokenizer_config.json."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  from tokenizers import trainers
  specials, first, eos, bos, template = STYLES[style]
  if style == "sentencepiece":
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=specials + alphabet,
                                  show_progress=False)
  else:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
  tok.train_from_iterator(sms_texts(), trainer)
  if first:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{first} $A", special_tokens=[(first, tok.token_to_id(first))])
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(TEMPLATES, template)) as f:
    source = f.read()
  settings = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
              "chat_template": source}
  if bos:
    settings["bos_token"] = bos
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(settings, f)
  return directory


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  dirs = {style: save_tokenizer(str(root / style), style) for style in STYLES}
  gpt2 = root / "gpt2"
  GPT2Tokenizer(os.path.join(DATA, "gpt2")).save(str(gpt2), names=GPT2Tokenizer.HF_FILES)
  (gpt2 / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
       "eos_token": "<|endoftext|>", "add_prefix_space": False}))
  # Llama 2 as first released: a sentencepiece tokenizer.model, <s> added by add_bos_token.
  import sentencepiece as spm
  llama2 = root / "llama2"
  llama2.mkdir()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sms_texts()), model_prefix=str(llama2 / "tokenizer"),
      model_type="bpe", vocab_size=400, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
      pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
      minloglevel=2)
  (llama2 / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
       "unk_token": "<unk>", "add_bos_token": True}))
  return {**dirs, "gpt2": str(gpt2), "llama2": str(llama2)}


def ours(directory):
  """The tokenizer as a run reads it from the folder (config.json naming a different
  beginning-of-text, as Qwen2's does: it must not matter)."""
  return hf.load_tokenizer(directory, {"model_type": "llama", "bos_token_id": 1,
                                       "eos_token_id": 2})


def theirs(directory):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(directory)


CONVERSATIONS = {
    "plain": [{"role": "user", "content": "Are you free tonight?"},
              {"role": "assistant", "content": "Yes, call me at 6."},
              {"role": "user", "content": "Great, see you then."},
              {"role": "assistant", "content": " Bye! "}],
    "system": [{"role": "system", "content": "You answer in short texts."},
               {"role": "user", "content": "Where are you?"},
               {"role": "assistant", "content": "On the bus home."}],
}


@pytest.mark.parametrize("style", ["gpt2", "llama3", "qwen2", "sentencepiece", "llama2"])
def test_prompt_ids_equal_transformers_tokenizer(tokenizer_dirs, style):
  tok, reference = ours(tokenizer_dirs[style]), theirs(tokenizer_dirs[style])
  texts = ["Hello world", "Ok lar... Joking wif u oni\n\nNext  line", "ünïcode ☃ text"]
  if style != "llama2":  # transformers' reading of a tokenizer.model drops a leading space
    texts += [" leading space", "a <s> in the text"]  # and reads "<s>" in a text as <s>
  for text in texts:
    assert prompts.encode_prompts(tok, [text])[0] == reference(text).input_ids, text
    assert tok.encode_with_specials(text) == reference(text).input_ids
  # Saved into a run directory and read back: the same ids, the same template.
  tok.save(os.path.join(tokenizer_dirs[style], "..", f"{style}_saved"))
  again = tokenizer_lib.load(os.path.join(tokenizer_dirs[style], "..", f"{style}_saved"))
  assert again.specials() == tok.specials() and again.chat_template == tok.chat_template


@pytest.mark.parametrize("style", ["llama3", "qwen2", "sentencepiece"])
def test_rendered_conversations_equal_apply_chat_template(tokenizer_dirs, style):
  tok, reference = ours(tokenizer_dirs[style]), theirs(tokenizer_dirs[style])
  template = chat.Template.of(tok)
  for name, messages in CONVERSATIONS.items():
    for add_generation_prompt in (False, True):
      shown = messages[:-1] if add_generation_prompt else messages
      text = reference.apply_chat_template(shown, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
      assert template.render(shown, add_generation_prompt) == text, (name, add_generation_prompt)
      expected = reference.apply_chat_template(shown, tokenize=True, return_dict=True,
                                               add_generation_prompt=add_generation_prompt)
      assert tok.encode(text) == list(expected["input_ids"])
      if not add_generation_prompt:
        ids, mask = chat.encode(tok, template, shown, None)
        assert ids == list(expected["input_ids"]) and all(mask)
      # A sampling prompt gets no second beginning-of-text: the template wrote it.
      assert prompts.encode_prompts(tok, [text])[0] == list(expected["input_ids"])
  if style == "qwen2":  # transformers' own masks need {% generation %}; ChatML's by hand:
    ids, mask = chat.encode(tok, template, CONVERSATIONS["plain"])
    trained = "".join(tok.decode([i]) if m else "|" for i, m in zip(ids, mask))
    trained = "|".join(part for part in trained.split("|") if part)
    # decode drops special tokens: the end-of-turn ids are checked by id.
    assert trained == "Yes, call me at 6.\n| Bye! \n"
    end = tok._tok.token_to_id("<|im_end|>")
    assert [i for i, m in zip(ids, mask) if m].count(end) == 2
    _, last_only = chat.encode(tok, template, CONVERSATIONS["plain"], trained_from=3)
    assert sum(last_only) < sum(mask) and tok.decode(
        [i for i, m in zip(ids, last_only) if m]) == " Bye! \n"


def test_chatml_is_the_default_and_bad_conversations_are_named(tokenizer_dirs):
  assert chat.choose("chatml", None) == chat.CHATML
  assert chat.choose("", "{{ x }}") == "{{ x }}"
  template = chat.Template(chat.CHATML)
  messages = CONVERSATIONS["system"]
  assert template.render(messages, True) == (
      "<|im_start|>system\nYou answer in short texts.<|im_end|>\n<|im_start|>user\nWhere are "
      "you?<|im_end|>\n<|im_start|>assistant\nOn the bus home.<|im_end|>\n<|im_start|>"
      "assistant\n")
  assert template.end_of_turn == "<|im_end|>"
  for bad, reason in [([], "empty"), ([{"role": "bot", "content": "x"}], "unknown role 'bot'"),
                      ([{"role": "user"}], "not a")]:
    with pytest.raises(BadRecord, match=reason):
      template.render(bad)
  with pytest.raises(BadRecord, match="no assistant message"):
    chat.encode(ours(tokenizer_dirs["qwen2"]), template,
                [{"role": "user", "content": "hi"}])
  with pytest.raises(Exception, match="no chat template"):
    chat.Template(None)


def save_random_model(directory, vocab_size: int, style: str):
  """A random causal LM of the tokenizer's family beside its tokenizer files: GPT-2 for the
  GPT-2 tokenizer, Qwen2 for Qwen2's, Llama for Llama 3's and the sentencepiece style."""
  import torch
  import transformers
  torch.manual_seed(0)
  if style == "gpt2":
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32,
                                  n_positions=64, initializer_range=0.3)
  else:
    family = transformers.Qwen2Config if style == "qwen2" else transformers.LlamaConfig
    cfg = family(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64, initializer_range=0.3)
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  model.save_pretrained(directory)
  return model


@pytest.mark.parametrize("style", ["gpt2", "llama3", "qwen2", "sentencepiece", "llama2"])
def test_greedy_continuations_equal_transformers_generate(tokenizer_dirs, tmp_path, style):
  """A converted random model continues a plain prompt as transformers' generate does on
  tokenizer(prompt): the same first tokens (beginning-of-text or none), the same ids after."""
  import shutil
  import torch
  from llm import convert
  from llm.inference.sampling import Generator
  from llm.runs import loading
  folder = tmp_path / "hf"
  shutil.copytree(tokenizer_dirs[style], folder)
  reference_tok = theirs(str(folder))
  reference = save_random_model(str(folder), len(reference_tok), style)
  convert.from_hf(str(folder), str(tmp_path / "run"))
  gen = Generator(loading.load(str(tmp_path / "run")))
  prompt = "Free entry in 2 a wkly comp"
  ids = reference_tok(prompt).input_ids
  assert prompts.encode_prompts(gen.tokenizer, [prompt])[0] == ids
  with torch.no_grad():
    # The mask is given: inferred from pad_token_id it would hide a beginning-of-text of id 0.
    out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                             do_sample=False, max_new_tokens=12, eos_token_id=None,
                             pad_token_id=0)
  new_ids = out[0, len(ids):].tolist()
  stops = [new_ids.index(i) for i in gen.stop_ids if i in new_ids]
  new_ids = new_ids[:min(stops)] if stops else new_ids
  assert len(new_ids) >= 4, new_ids
  [[text]] = gen.generate([prompt], max_new_tokens=12, temperature=0.0)
  assert text == gen.tokenizer.decode(new_ids)


@pytest.mark.parametrize("style", ["llama3", "qwen2"])
def test_reward_scoring_reads_an_answer_as_training_did(tokenizer_dirs, style):
  """Scorer's ids for (prompt_text, sampled answer) are the chosen sequence a reward model
  trained on: the template's end of turn after a chat answer, end-of-text after a string."""
  tok = ours(tokenizer_dirs[style])
  question = CONVERSATIONS["system"][:2]
  for record in [{"prompt": question, "chosen": [{"role": "assistant", "content": "Home."}],
                  "rejected": [{"role": "assistant", "content": "?"}]},
                 {"prompt": "Where are you?", "chosen": " Home.", "rejected": "?"},
                 {"instruction": "Say where you are.", "chosen": "Home.", "rejected": "?"}]:
    (chosen, _), _ = prompts.preference_sequences(record, tok)
    answer = prompts.answer_text(record, "chosen")
    assert prompts.scored_sequence(tok, prompts.prompt_text(record, tok), answer) == chosen
