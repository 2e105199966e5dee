"""Hugging Face model folders, read and written: config.json, the safetensors weights and the
tokenizer files, as this codebase's model config, tokenizer and parameter tree (each family's
names and layouts: hf_weights.py). `python -m llm.convert` is its command line; `init_from`
reads folders here.
"""

import json
import os

import numpy as np

from llm import config as config_lib
from llm import model as model_lib
from llm.errors import UserError
from llm.model import layers
from llm.runs import hf_llama, hf_weights
from llm.text import gpt2, huggingface, sentencepiece, tokenizer as tokenizer_lib



HF_WEIGHTS = "model.safetensors"


HF_WEIGHTS_INDEX = "model.safetensors.index.json"


HF_TORCH_WEIGHTS = "pytorch_model.bin"


def locate(name_or_path: str) -> str:
  """A local folder as it is; otherwise a hub name, downloaded into the hub cache."""
  if os.path.isdir(name_or_path):
    return name_or_path
  if os.path.exists(name_or_path):
    raise UserError(f"{name_or_path} is a file, not a run directory nor a model folder")
  if name_or_path.startswith((".", "/", "~")):
    raise UserError(f"{name_or_path}: no such folder")
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(name_or_path, allow_patterns=[
        "config.json", HF_WEIGHTS, HF_WEIGHTS_INDEX, "model-*.safetensors", "vocab.json",
        "merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
        "tokenizer.model"])
  except Exception as e:  # offline, unknown name, gated repository: many error types
    raise UserError(f"{name_or_path!r} is neither a local folder nor a model the Hugging Face "
                    f"hub could give ({type(e).__name__}); offline, pass a local folder") from None


def read_hf_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"{directory} has no config.json: not a Hugging Face model folder")
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise UserError(f"{path} is not valid JSON ({e})") from None


def read_tensors(directory: str, allow_torch_bin: bool = False) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint as float32 numpy arrays, by its Hugging Face name."""
  from safetensors import safe_open
  index = os.path.join(directory, HF_WEIGHTS_INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.isfile(os.path.join(directory, HF_WEIGHTS)):
    files = [HF_WEIGHTS]
  elif os.path.isfile(os.path.join(directory, HF_TORCH_WEIGHTS)):
    if not allow_torch_bin:
      raise UserError(f"{directory} holds only {HF_TORCH_WEIGHTS}, a pickle that can run code "
                      "when read; pass --allow_torch_bin to read it with torch.load("
                      "weights_only=True), or convert it to safetensors first")
    import torch
    state = torch.load(os.path.join(directory, HF_TORCH_WEIGHTS), map_location="cpu",
                       weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}
  else:
    raise UserError(f"{directory} has no {HF_WEIGHTS} (nor {HF_TORCH_WEIGHTS})")
  tensors = {}
  for name in files:
    # "flax" reads bfloat16 too, which numpy alone cannot.
    with safe_open(os.path.join(directory, name), framework="flax") as f:
      for key in f.keys():
        tensors[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
  return tensors


def model_values(hf: dict) -> dict:
  """The `model` section of a run config for a transformers config.json."""
  if hf.get("model_type") not in hf_weights.ARCHITECTURES:
    raise UserError(f"config.json has model_type={hf.get('model_type')!r}; this converter reads "
                    f"{', '.join(hf_weights.ARCHITECTURES)}")
  try:
    return hf_weights.ARCHITECTURES[hf["model_type"]][0](hf)
  except KeyError as e:
    raise UserError(f"config.json has no {e.args[0]!r}, which a {hf['model_type']} config "
                    "needs") from None


def load_tokenizer(directory: str, hf: dict) -> tokenizer_lib.Tokenizer:
  """A Hugging Face folder's tokenizer, with the chat template it ships."""
  return tokenizer_lib.with_chat_template(_load_tokenizer(directory, hf), directory)


def _load_tokenizer(directory: str, hf: dict) -> tokenizer_lib.Tokenizer:
  if hf["model_type"] == "bert":  # vocab.txt, or the vocabulary inside tokenizer.json
    settings = os.path.join(directory, "tokenizer_config.json")
    lowercase = json.load(open(settings)).get("do_lower_case", True) if os.path.isfile(
        settings) else True
    if os.path.isfile(os.path.join(directory, "vocab.txt")):
      return huggingface.WordPieceTokenizer.from_file(os.path.join(directory, "vocab.txt"),
                                                      lowercase)
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
      raise UserError(f"{directory} has neither vocab.txt nor tokenizer.json")
    with open(path, encoding="utf-8") as f:
      spec = json.load(f)
    lowercase = (spec.get("normalizer") or {}).get("lowercase", lowercase)
    return huggingface.WordPieceTokenizer(spec["model"]["vocab"], lowercase)
  if hf["model_type"] in hf_llama.LLAMA_FAMILY:
    if os.path.isfile(os.path.join(directory, huggingface.HFTokenizer.FILE)):
      return huggingface.HFTokenizer.from_folder(directory, hf)
    if os.path.isfile(os.path.join(directory, "tokenizer.model")):  # Llama 2's sentencepiece
      settings = tokenizer_lib.read_tokenizer_config(directory)
      return sentencepiece.SentencePieceTokenizer(
          os.path.join(directory, "tokenizer.model"),
          add_bos=settings.get("add_bos_token", True),  # transformers' LlamaTokenizer defaults
          add_eos=settings.get("add_eos_token", False))
  return gpt2.GPT2Tokenizer(directory)


def load(name_or_path: str, allow_torch_bin: bool = False):
  """A Hugging Face folder (or hub name) -> (model section values, tokenizer, params)."""
  import flax.linen as nn
  import jax
  directory = locate(name_or_path)
  hf = read_hf_config(directory)
  values = model_values(hf)
  tokenizer = load_tokenizer(directory, hf)
  model_cfg = config_lib.base_config().model
  model_cfg.update(values)
  model = model_lib.build(model_cfg, tokenizer.vocab_size)
  if model.cfg.vocab_size != values["vocab_size"]:
    raise UserError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but "
                    f"config.json's vocab_size is {values['vocab_size']}")
  params_from_hf = hf_weights.ARCHITECTURES[hf["model_type"]][1]
  params = params_from_hf(read_tensors(directory, allow_torch_bin), model.cfg, directory)
  init = lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 1), np.int32))["params"]
  missing = sorted(set(jax.eval_shape(init)) - set(params))
  if missing:  # heads the checkpoint does not have (a BertModel): fresh ones
    print(f"note: {directory} has no {', '.join(missing)}; these start fresh")
    fresh = jax.device_get(nn.meta.unbox(init()))
    params.update({name: fresh[name] for name in missing})
  return values, tokenizer, params


def save(out: str, model_cfg, model_shape, tokenizer, params) -> int:
  """Writes a folder transformers reads (AutoModelForCausalLM for GPT-2 and Llama-style models,
  BertForPreTraining for BERT): config.json, model.safetensors and the tokenizer's files.
  Returns the tensor count."""
  from safetensors.numpy import save_file
  params = layers.to_layout(params, scanned=False)  # Hugging Face numbers its layers
  hf_config, tensors = hf_weights.to_hf(model_cfg, model_shape, params, tokenizer)
  os.makedirs(out, exist_ok=True)
  save_file(tensors, os.path.join(out, HF_WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  if isinstance(tokenizer, gpt2.GPT2Tokenizer):
    tokenizer.save(out, names=gpt2.GPT2Tokenizer.HF_FILES)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_cfg.max_len,
                 "bos_token": tokenizer_lib.ENDOFTEXT, "eos_token": tokenizer_lib.ENDOFTEXT,
                 "unk_token": tokenizer_lib.ENDOFTEXT, "add_prefix_space": False}, f, indent=2)
  elif isinstance(tokenizer, huggingface.HFTokenizer):
    tokenizer.save(out)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "PreTrainedTokenizerFast",
                 "model_max_length": model_cfg.max_len, **tokenizer.special_tokens()}, f,
                indent=2)
  elif isinstance(tokenizer, huggingface.WordPieceTokenizer):
    tokenizer.save(out)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": tokenizer.lowercase,
                 "model_max_length": model_cfg.max_len}, f, indent=2)
  elif isinstance(tokenizer, sentencepiece.SentencePieceTokenizer):
    tokenizer.save(out)
    tokenizer.hf_files(out, model_cfg.max_len)
  else:
    tokenizer.save(out)
    print(f"note: the run's {tokenizer.kind} tokenizer is saved as it is; transformers' "
          "AutoTokenizer does not read it")
  return len(tensors)
