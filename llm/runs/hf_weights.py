"""Each Hugging Face family's config.json and tensor names, both ways: GPT-2 and BERT here, the
Llama family (Mistral, Qwen2, Qwen3 and the mixtures of experts Mixtral and Qwen3-MoE) in
hf_llama.py; `ARCHITECTURES` and `to_hf` choose among them.

Layouts. Hugging Face GPT-2 stores its linear maps as Conv1D weights [in, out] and the query, key
and value maps fused into one `c_attn` [D, 3D]; BERT and Llama store nn.Linear weights [out, in].
Here each is a Dense kernel [in, out] split by heads (query [D, N, H], out [N, H, D]). A BERT
checkpoint without pre-training heads (BertModel) loads as an encoder with fresh MLM/NSP heads.
"""

import numpy as np

from llm.errors import UserError
from llm.runs.hf_llama import (LLAMA_FAMILY, llama_hf_config, llama_model_config,
                               llama_params_from_hf, llama_params_to_hf)
from llm.runs.hf_tensors import flat_numpy, Tensors

# transformers' names for the GELU variants (all tanh approximations but "gelu").
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


# Buffers older transformers versions saved with the weights: the causal mask, not parameters.
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")


def gpt2_model_config(hf: dict) -> dict:
  """The `model` section of a run config for a transformers GPT2Config."""
  if hf.get("model_type") != "gpt2":
    raise UserError(f"config.json has model_type={hf.get('model_type')!r}; this converter reads "
                    "gpt2")
  for key, default in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
    if hf.get(key, default) != default:
      raise UserError(f"config.json sets {key}={hf[key]!r}, which this GPT-2 does not implement")
  activation = hf.get("activation_function", "gelu_new")
  if activation not in HF_ACTIVATIONS:
    raise UserError(f"config.json: activation_function={activation!r} is not one of "
                    f"{sorted(HF_ACTIVATIONS)}")
  d_model = hf["n_embd"]
  return dict(kind="gpt", num_layers=hf["n_layer"], num_heads=hf["n_head"], d_model=d_model,
              d_ff=hf.get("n_inner") or 4 * d_model,
              max_len=hf.get("n_positions", hf.get("n_ctx", 1024)), vocab_size=hf["vocab_size"],
              tie_embeddings=hf.get("tie_word_embeddings", True), use_bias=True,
              ln_eps=hf.get("layer_norm_epsilon", 1e-5), activation=HF_ACTIVATIONS[activation],
              dropout=0.0)


def gpt2_params_from_hf(tensors: dict[str, np.ndarray], m, directory: str = "checkpoint") -> dict:
  """Hugging Face GPT-2 tensors -> this GPT's parameter tree (model config `m`)."""
  # Saved from GPT2LMHeadModel the names start with "transformer."; from GPT2Model they do not.
  tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
  t = Tensors(tensors, directory, ignore=_GPT2_BUFFERS)
  D, N, H, F, V = m.d_model, m.num_heads, m.head_dim, m.d_ff, m.vocab_size

  def ln(prefix):
    return {"scale": t.take(prefix + ".weight", (D,)), "bias": t.take(prefix + ".bias", (D,))}

  params = {"wte": {"embedding": t.take("wte.weight", (V, D))},
            "wpe": {"embedding": t.take("wpe.weight", (m.max_len, D))},
            "ln_f": ln("ln_f")}
  for i in range(m.num_layers):
    h = f"h.{i}."
    qkv_w = np.split(t.take(h + "attn.c_attn.weight", (D, 3 * D)), 3, axis=1)
    qkv_b = np.split(t.take(h + "attn.c_attn.bias", (3 * D,)), 3)
    attn = {name: {"kernel": w.reshape(D, N, H), "bias": b.reshape(N, H)}
            for name, w, b in zip(("query", "key", "value"), qkv_w, qkv_b)}
    attn["out"] = {"kernel": t.take(h + "attn.c_proj.weight", (D, D)).reshape(N, H, D),
                   "bias": t.take(h + "attn.c_proj.bias", (D,))}
    params[f"block_{i}"] = {
        "ln_attn": ln(h + "ln_1"), "attn": attn, "ln_mlp": ln(h + "ln_2"),
        "mlp": {"wi": {"kernel": t.take(h + "mlp.c_fc.weight", (D, F)),
                       "bias": t.take(h + "mlp.c_fc.bias", (F,))},
                "wo": {"kernel": t.take(h + "mlp.c_proj.weight", (F, D)),
                       "bias": t.take(h + "mlp.c_proj.bias", (D,))}}}
  if not m.tie_embeddings:
    params["lm_head"] = {"kernel": t.take("lm_head.weight", (V, D)).T}
  else:
    t.unused.discard("lm_head.weight")  # some tied checkpoints store the copy as well
  t.check_all_used()
  return params


def gpt2_params_to_hf(params, m, vocab_size: int) -> dict[str, np.ndarray]:
  """The inverse of `gpt2_params_from_hf`; rows past `vocab_size` (padding) are dropped."""
  p = flat_numpy(params)
  D = m.d_model
  out = {"transformer.wte.weight": p["wte/embedding"][:vocab_size],
         "transformer.wpe.weight": p["wpe/embedding"]}

  def ln(ours, theirs):
    out[theirs + ".weight"], out[theirs + ".bias"] = p[ours + "/scale"], p[ours + "/bias"]

  ln("ln_f", "transformer.ln_f")
  for i in range(m.num_layers):
    b, h = f"block_{i}/", f"transformer.h.{i}."
    ln(b + "ln_attn", h + "ln_1")
    ln(b + "ln_mlp", h + "ln_2")
    qkv = ("query", "key", "value")
    out[h + "attn.c_attn.weight"] = np.concatenate(
        [p[f"{b}attn/{n}/kernel"].reshape(D, D) for n in qkv], axis=1)
    out[h + "attn.c_attn.bias"] = np.concatenate([p[f"{b}attn/{n}/bias"].reshape(D) for n in qkv])
    out[h + "attn.c_proj.weight"] = p[f"{b}attn/out/kernel"].reshape(D, D)
    out[h + "attn.c_proj.bias"] = p[f"{b}attn/out/bias"]
    out[h + "mlp.c_fc.weight"], out[h + "mlp.c_fc.bias"] = p[f"{b}mlp/wi/kernel"], p[
        f"{b}mlp/wi/bias"]
    out[h + "mlp.c_proj.weight"], out[h + "mlp.c_proj.bias"] = p[f"{b}mlp/wo/kernel"], p[
        f"{b}mlp/wo/bias"]
  if not m.tie_embeddings:
    out["lm_head.weight"] = p["lm_head/kernel"][:, :vocab_size].T
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def gpt2_hf_config(model_cfg, vocab_size: int, eot_id: int) -> dict:
  m = model_cfg
  if not m.use_bias:
    raise UserError("transformers' GPT-2 always has biases; this run has model.use_bias=False")
  if (m.positions, m.norm, m.mlp, m.num_kv_heads in (0, m.num_heads), m.qkv_bias, m.qk_norm,
      m.moe.num_experts, m.head_dim) != ("learned", "layernorm", "plain", True, False, False, 0,
                                         0) or m.activation == "silu":
    raise UserError("transformers has no model with this combination of model.positions, norm, "
                    "mlp, num_kv_heads and activation; GPT-2 (learned, layernorm, plain, "
                    "gelu_tanh, biases) and Llama (rope, rmsnorm, gated, silu, no biases) export")
  activation = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[model_cfg.activation]
  return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
          "n_positions": model_cfg.max_len, "n_embd": model_cfg.d_model,
          "n_layer": model_cfg.num_layers, "n_head": model_cfg.num_heads,
          "n_inner": model_cfg.d_ff, "activation_function": activation,
          "layer_norm_epsilon": model_cfg.ln_eps,
          "tie_word_embeddings": model_cfg.tie_embeddings, "resid_pdrop": model_cfg.dropout,
          "embd_pdrop": model_cfg.dropout, "attn_pdrop": model_cfg.dropout,
          "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": "float32"}


# transformers' BERT names -> this BERT's, per block ("attention.self.query" -> attn/query ...).
_BERT_BLOCK = {"attention.self.query": "attn/query", "attention.self.key": "attn/key",
               "attention.self.value": "attn/value", "attention.output.dense": "attn/out",
               "intermediate.dense": "mlp/wi", "output.dense": "mlp/wo"}


_BERT_NORMS = {"attention.output.LayerNorm": "ln_attn", "output.LayerNorm": "ln_mlp"}


_BERT_BUFFERS = ("position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def bert_model_config(hf: dict) -> dict:
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise UserError(f"config.json: position_embedding_type={hf['position_embedding_type']!r}; "
                    "this BERT has absolute positions")
  activation = hf.get("hidden_act", "gelu")
  if activation not in HF_ACTIVATIONS:
    raise UserError(f"config.json: hidden_act={activation!r} is not one of "
                    f"{sorted(HF_ACTIVATIONS)}")
  return dict(kind="bert", num_layers=hf["num_hidden_layers"],
              num_heads=hf["num_attention_heads"], d_model=hf["hidden_size"],
              d_ff=hf["intermediate_size"], max_len=hf["max_position_embeddings"],
              vocab_size=hf["vocab_size"], tie_embeddings=True, use_bias=True,
              ln_eps=hf.get("layer_norm_eps", 1e-12), activation=HF_ACTIVATIONS[activation],
              pre_ln=False, dropout=0.0)


def bert_params_from_hf(tensors: dict[str, np.ndarray], m, directory: str = "checkpoint") -> dict:
  """transformers BertForPreTraining / BertModel tensors -> this BERT's parameters (heads the
  checkpoint lacks are left out)."""
  tensors = {k.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight").replace(
      "LayerNorm.beta", "LayerNorm.bias"): v for k, v in tensors.items()}
  t = Tensors(tensors, directory, ignore=_BERT_BUFFERS)
  D, N, H, F, V = m.d_model, m.num_heads, m.head_dim, m.d_ff, m.vocab_size

  def ln(prefix):
    return {"scale": t.take(prefix + ".weight", (D,)), "bias": t.take(prefix + ".bias", (D,))}

  def dense(prefix, kernel_shape, bias_shape):  # nn.Linear keeps [out, in]
    n_out = int(np.prod(bias_shape))
    n_in = int(np.prod(kernel_shape)) // n_out
    return {"kernel": t.take(prefix + ".weight", (n_out, n_in)).T.reshape(kernel_shape),
            "bias": t.take(prefix + ".bias", (n_out,)).reshape(bias_shape)}

  e = "embeddings."
  params = {"wte": {"embedding": t.take(e + "word_embeddings.weight", (V, D))},
            "wpe": {"embedding": t.take(e + "position_embeddings.weight", (m.max_len, D))},
            "wse": {"embedding": t.take(e + "token_type_embeddings.weight",
                                        (m.type_vocab_size, D))},
            "ln_emb": ln(e + "LayerNorm")}
  shapes = {"attn/query": ((D, N, H), (N, H)), "attn/key": ((D, N, H), (N, H)),
            "attn/value": ((D, N, H), (N, H)), "attn/out": ((N, H, D), (D,)),
            "mlp/wi": ((D, F), (F,)), "mlp/wo": ((F, D), (D,))}
  for i in range(m.num_layers):
    block = {}
    for theirs, ours in _BERT_BLOCK.items():
      module, leaf = ours.split("/")
      block.setdefault(module, {})[leaf] = dense(f"encoder.layer.{i}.{theirs}", *shapes[ours])
    for theirs, ours in _BERT_NORMS.items():
      block[ours] = ln(f"encoder.layer.{i}.{theirs}")
    params[f"block_{i}"] = block
  if "pooler.dense.weight" in tensors:
    params["pooler"] = dense("pooler.dense", (D, D), (D,))
  if "cls.predictions.bias" in tensors:
    params["mlm_dense"] = dense("cls.predictions.transform.dense", (D, D), (D,))
    params["mlm_ln"] = ln("cls.predictions.transform.LayerNorm")
    params["mlm_bias"] = t.take("cls.predictions.bias", (V,))
  if "cls.seq_relationship.weight" in tensors:
    params["nsp"] = dense("cls.seq_relationship", (D, 2), (2,))
  t.check_all_used()
  return params


def bert_params_to_hf(params, m, vocab_size: int) -> dict[str, np.ndarray]:
  """The inverse of `bert_params_from_hf`, as BertForPreTraining names them."""
  p = flat_numpy(params)
  out = {"bert.embeddings.word_embeddings.weight": p["wte/embedding"][:vocab_size],
         "bert.embeddings.position_embeddings.weight": p["wpe/embedding"],
         "bert.embeddings.token_type_embeddings.weight": p["wse/embedding"]}

  def ln(ours, theirs):
    out[theirs + ".weight"], out[theirs + ".bias"] = p[ours + "/scale"], p[ours + "/bias"]

  def dense(ours, theirs):  # [in..., out...] -> nn.Linear's [out, in]
    bias = p[ours + "/bias"].reshape(-1)
    out[theirs + ".weight"] = p[ours + "/kernel"].reshape(-1, bias.size).T
    out[theirs + ".bias"] = bias

  ln("ln_emb", "bert.embeddings.LayerNorm")
  for i in range(m.num_layers):
    for theirs, ours in _BERT_BLOCK.items():
      dense(f"block_{i}/{ours}", f"bert.encoder.layer.{i}.{theirs}")
    for theirs, ours in _BERT_NORMS.items():
      ln(f"block_{i}/{ours}", f"bert.encoder.layer.{i}.{theirs}")
  dense("pooler", "bert.pooler.dense")
  dense("mlm_dense", "cls.predictions.transform.dense")
  ln("mlm_ln", "cls.predictions.transform.LayerNorm")
  out["cls.predictions.bias"] = p["mlm_bias"][:vocab_size]
  dense("nsp", "cls.seq_relationship")
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def bert_hf_config(model_cfg, tokenizer) -> dict:
  if model_cfg.pre_ln or not model_cfg.use_bias:
    raise UserError("transformers' BERT is post-LN with biases; this run has model.pre_ln="
                    f"{model_cfg.pre_ln}, model.use_bias={model_cfg.use_bias}")
  activation = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[model_cfg.activation]
  return {"architectures": ["BertForPreTraining"], "model_type": "bert",
          "vocab_size": tokenizer.vocab_size, "hidden_size": model_cfg.d_model,
          "num_hidden_layers": model_cfg.num_layers,
          "num_attention_heads": model_cfg.num_heads, "intermediate_size": model_cfg.d_ff,
          "max_position_embeddings": model_cfg.max_len, "type_vocab_size": 2,
          "hidden_act": activation, "layer_norm_eps": model_cfg.ln_eps,
          "hidden_dropout_prob": model_cfg.dropout, "attention_probs_dropout_prob":
          model_cfg.dropout, "pad_token_id": tokenizer.pad_id, "torch_dtype": "float32"}


# transformers' model_type -> (its config.json as our model section, its tensors as our tree)
ARCHITECTURES = {"gpt2": (gpt2_model_config, gpt2_params_from_hf),
                 "bert": (bert_model_config, bert_params_from_hf),
                 **{kind: (llama_model_config, llama_params_from_hf) for kind in LLAMA_FAMILY}}


def to_hf(model_cfg, model_shape, params, tokenizer) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json, tensors) of the transformers model a run is written as: BERT for a BERT,
  Llama for a decoder with rotary positions, GPT-2 for the others. `params` unrolled."""
  def gpt(cfg):
    if cfg.positions == "rope":
      return llama_hf_config(cfg, tokenizer), llama_params_to_hf
    return gpt2_hf_config(cfg, tokenizer.vocab_size, tokenizer.eot_id), gpt2_params_to_hf

  by_family = {"bert": lambda cfg: (bert_hf_config(cfg, tokenizer), bert_params_to_hf), "gpt": gpt}
  hf_config, params_to_hf = by_family[model_cfg.kind](model_cfg)
  return hf_config, params_to_hf(params, model_shape, tokenizer.vocab_size)
