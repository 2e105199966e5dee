"""Each Hugging Face family's config.json and tensor names, both ways: GPT-2, BERT, and Llama with
Mistral, Qwen2, Qwen3 and the mixtures of experts Mixtral and Qwen3-MoE.

Layouts. Hugging Face GPT-2 stores its linear maps as Conv1D weights [in, out] and the query, key
and value maps fused into one `c_attn` [D, 3D]; BERT and Llama store nn.Linear weights [out, in].
Here each is a Dense kernel [in, out] split by heads (query [D, N, H], out [N, H, D]). A BERT
checkpoint without pre-training heads (BertModel) loads as an encoder with fresh MLM/NSP heads.
"""

import numpy as np
from flax import traverse_util

from llm.errors import UserError

# transformers' names for the GELU variants (all tanh approximations but "gelu").
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


# Buffers older transformers versions saved with the weights: the causal mask, not parameters.
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")


class _Tensors:
  """Hands out checkpoint tensors by name, checking shapes; says which tensor is wrong."""

  def __init__(self, tensors: dict[str, np.ndarray], directory: str, ignore=()):
    self.tensors, self.directory = tensors, directory
    self.unused = {k for k in tensors if not k.endswith(tuple(ignore))}

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in self.tensors:
      raise UserError(f"{self.directory}: tensor {name} is missing (config.json expects it with "
                      f"shape {shape})")
    x = self.tensors[name]
    if x.shape != shape:
      raise UserError(f"{self.directory}: tensor {name} has shape {x.shape}, but config.json "
                      f"implies {shape}")
    self.unused.discard(name)
    return x

  def check_all_used(self) -> None:
    if self.unused:
      raise UserError(f"{self.directory}: tensor {sorted(self.unused)[0]} does not belong to the "
                      f"model config.json describes ({len(self.unused)} such tensors)")


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
  t = _Tensors(tensors, directory, ignore=_GPT2_BUFFERS)
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
  p = _flat_numpy(params)
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
  t = _Tensors(tensors, directory, ignore=_BERT_BUFFERS)
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
  p = _flat_numpy(params)
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


LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")

# A mixture of experts' tensors in a decoder layer: (the MLP's module, the experts' gate, up and
# down projections). Mixtral's router is the softmax over the top 2 (renormalised); Qwen3-MoE's
# the same with norm_topk_prob choosing the renormalisation.
_MOE_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
              "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


_LLAMA_BUFFERS = ("rotary_emb.inv_freq",)  # saved by older transformers; computed, not learned


def llama_model_config(hf: dict) -> dict:
  """The `model` section of a run config for a transformers Llama, Mistral or Qwen2 config."""
  kind = hf.get("model_type")
  D, N = hf["hidden_size"], hf["num_attention_heads"]
  unsupported = {
      "hidden_act": hf.get("hidden_act", "silu") != "silu",
      "mlp_bias": bool(hf.get("mlp_bias")),
      "attention_bias": bool(hf.get("attention_bias")) and kind != "qwen2",  # o_proj's too
      "use_sliding_window": bool(hf.get("use_sliding_window")),
  }
  for key, bad in unsupported.items():
    if bad:
      raise UserError(f"config.json sets {key}={hf[key]!r}, which this model does not implement")
  # transformers 5 keeps theta and scaling in rope_parameters; earlier versions beside it.
  rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0),
                                       **(hf.get("rope_scaling") or {})}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "llama3"):
    raise UserError(f"config.json: rope type {rope_type!r}; this model implements the plain and "
                    "Llama 3 rotary positions")
  scaling = () if rope_type == "default" else (
      rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
      rope["original_max_position_embeddings"])
  max_len = hf["max_position_embeddings"]
  if kind == "mistral" and hf.get("sliding_window") and hf["sliding_window"] < max_len:
    max_len = hf["sliding_window"]  # within the window, windowed attention is full attention
    print(f"note: attention is full over {max_len} positions (Mistral's sliding window)")
  values = dict(kind="gpt", num_layers=hf["num_hidden_layers"], num_heads=N,
                num_kv_heads=hf.get("num_key_value_heads") or N, d_model=D,
                head_dim=hf.get("head_dim") or D // N, d_ff=hf["intermediate_size"],
                max_len=max_len, vocab_size=hf["vocab_size"], positions="rope",
                rope_theta=float(rope["rope_theta"]), rope_scaling=scaling, norm="rmsnorm",
                mlp="gated", activation="silu", use_bias=False, qkv_bias=kind == "qwen2",
                qk_norm=kind in ("qwen3", "qwen3_moe"), ln_eps=hf.get("rms_norm_eps", 1e-6),
                tie_embeddings=hf.get("tie_word_embeddings", False), dropout=0.0)
  if kind in _MOE_NAMES:
    values["moe"] = _moe_config(hf)
  return values


def _moe_config(hf: dict) -> dict:
  """model.moe of a Mixtral or Qwen3-MoE config.json. transformers' balance loss is K times
  ours (moe.py), so its router_aux_loss_coef becomes K times as large a weight here."""
  K = hf["num_experts_per_tok"]
  moe = dict(num_experts=hf.get("num_local_experts") or hf["num_experts"],
             experts_per_token=K, router="softmax", z_loss=0.0,
             balance_loss=hf.get("router_aux_loss_coef", 0.001) * K)
  if hf["model_type"] == "mixtral":
    return {**moe, "expert_d_ff": hf["intermediate_size"], "renormalize": True}
  dense = sorted(hf.get("mlp_only_layers") or [])
  if dense != list(range(len(dense))):
    raise UserError(f"config.json: mlp_only_layers={dense}; this model makes the first blocks "
                    "dense (model.moe.first_dense), not others")
  return {**moe, "expert_d_ff": hf["moe_intermediate_size"],
          "renormalize": bool(hf.get("norm_topk_prob", False)),
          "every": hf.get("decoder_sparse_step", 1), "first_dense": len(dense)}


# transformers' names in a decoder layer -> ours, and the linear layer's [out, in] as our shape
def _llama_layer(m) -> dict[str, tuple[str, tuple]]:
  D, N, K, H, F = m.d_model, m.num_heads, m.kv_heads, m.head_dim, m.d_ff
  return {"self_attn.q_proj": ("attn/query", (D, N, H)), "self_attn.k_proj": ("attn/key", (D, K, H)),
          "self_attn.v_proj": ("attn/value", (D, K, H)), "self_attn.o_proj": ("attn/out", (N, H, D)),
          "mlp.gate_proj": ("mlp/wg", (D, F)), "mlp.up_proj": ("mlp/wi", (D, F)),
          "mlp.down_proj": ("mlp/wo", (F, D))}


def llama_params_from_hf(tensors: dict[str, np.ndarray], m, directory: str = "checkpoint") -> dict:
  """transformers LlamaForCausalLM (Mistral, Qwen2) tensors -> this GPT's parameter tree."""
  t = _Tensors(tensors, directory, ignore=_LLAMA_BUFFERS)
  D, V = m.d_model, m.vocab_size
  params = {"wte": {"embedding": t.take("model.embed_tokens.weight", (V, D))},
            "ln_f": {"scale": t.take("model.norm.weight", (D,))}}
  for i in range(m.num_layers):
    prefix, block = f"model.layers.{i}.", {}
    block["ln_attn"] = {"scale": t.take(prefix + "input_layernorm.weight", (D,))}
    block["ln_mlp"] = {"scale": t.take(prefix + "post_attention_layernorm.weight", (D,))}
    moe = m.moe.is_moe(i)
    for theirs, (ours, shape) in _llama_layer(m).items():
      module, name = ours.split("/")
      if module == "mlp" and moe:
        continue
      n_in = shape[0] if name != "out" else shape[0] * shape[1]
      weight = t.take(prefix + theirs + ".weight", (int(np.prod(shape)) // n_in, n_in))
      block.setdefault(module, {})[name] = {"kernel": weight.T.reshape(shape)}
      if m.qkv_bias and name in ("query", "key", "value"):
        block[module][name]["bias"] = t.take(prefix + theirs + ".bias",
                                             (weight.shape[0],)).reshape(shape[1:])
    if m.qk_norm:
      for theirs, ours in (("q_norm", "query_norm"), ("k_norm", "key_norm")):
        block["attn"][ours] = {"scale": t.take(f"{prefix}self_attn.{theirs}.weight",
                                               (m.head_dim,))}
    if moe:
      block["mlp"] = _moe_from_hf(t, prefix, m, tensors)
    params[f"block_{i}"] = block
  if not m.tie_embeddings:
    params["lm_head"] = {"kernel": t.take("lm_head.weight", (V, D)).T}
  else:
    t.unused.discard("lm_head.weight")
  t.check_all_used()
  return params


def _moe_names(m, tensors=None) -> tuple[str, tuple]:
  """The MLP module's and experts' names: Mixtral's when a checkpoint has them, or (exporting)
  when the model has no QK norm; else Qwen3-MoE's."""
  if tensors is not None:
    is_mixtral = any(".block_sparse_moe." in k for k in tensors)
  else:
    is_mixtral = not m.qk_norm
  return _MOE_NAMES["mixtral" if is_mixtral else "qwen3_moe"]


def _moe_from_hf(t, prefix: str, m, tensors) -> dict:
  """A decoder layer's router and experts, stacked [E, ...] as MoE keeps them."""
  module, (gate, up, down) = _moe_names(m, tensors)
  D, E, F = m.d_model, m.moe.num_experts, m.moe.expert_d_ff or m.d_ff
  take = lambda e, name, shape: t.take(f"{prefix}{module}.experts.{e}.{name}.weight", shape).T
  stack = lambda name, shape: np.stack([take(e, name, shape) for e in range(E)])
  return {"router": {"kernel": t.take(f"{prefix}{module}.gate.weight", (E, D)).T},
          "experts_wg": {"kernel": stack(gate, (F, D))},
          "experts_wi": {"kernel": stack(up, (F, D))},
          "experts_wo": {"kernel": stack(down, (D, F))}}


def llama_params_to_hf(params, m, vocab_size: int) -> dict[str, np.ndarray]:
  """The inverse of `llama_params_from_hf`; rows past `vocab_size` (padding) are dropped."""
  p = _flat_numpy(params)
  out = {"model.embed_tokens.weight": p["wte/embedding"][:vocab_size],
         "model.norm.weight": p["ln_f/scale"]}
  for i in range(m.num_layers):
    ours, theirs = f"block_{i}/", f"model.layers.{i}."
    out[theirs + "input_layernorm.weight"] = p[ours + "ln_attn/scale"]
    out[theirs + "post_attention_layernorm.weight"] = p[ours + "ln_mlp/scale"]
    for name, (path, shape) in _llama_layer(m).items():
      if path.startswith("mlp/") and m.moe.is_moe(i):
        continue
      kernel = p[f"{ours}{path}/kernel"]
      n_in = shape[0] if not path.endswith("out") else shape[0] * shape[1]
      out[theirs + name + ".weight"] = kernel.reshape(n_in, -1).T
      if f"{ours}{path}/bias" in p:
        out[theirs + name + ".bias"] = p[f"{ours}{path}/bias"].reshape(-1)
    if m.qk_norm:
      out[theirs + "self_attn.q_norm.weight"] = p[ours + "attn/query_norm/scale"]
      out[theirs + "self_attn.k_norm.weight"] = p[ours + "attn/key_norm/scale"]
    if m.moe.is_moe(i):
      module, names = _moe_names(m)
      out[f"{theirs}{module}.gate.weight"] = p[ours + "mlp/router/kernel"].T
      for name, ours_name in zip(names, ("experts_wg", "experts_wi", "experts_wo")):
        for e, kernel in enumerate(p[f"{ours}mlp/{ours_name}/kernel"]):
          out[f"{theirs}{module}.experts.{e}.{name}.weight"] = kernel.T
  if not m.tie_embeddings:
    out["lm_head.weight"] = p["lm_head/kernel"][:, :vocab_size].T
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def llama_hf_config(model_cfg, tokenizer) -> dict:
  """LlamaForCausalLM's config.json; Qwen2ForCausalLM's when q, k and v have biases, Qwen3's
  with QK norm; MixtralForCausalLM's for a mixture of experts, Qwen3MoeForCausalLM's with QK
  norm."""
  m = model_cfg
  if (m.positions, m.norm, m.mlp, m.activation, m.use_bias, m.pre_ln) != (
      "rope", "rmsnorm", "gated", "silu", False, True):
    raise UserError("transformers has no model with this combination of model.positions, norm, "
                    "mlp, activation and use_bias; GPT-2 (learned, layernorm, plain, gelu_tanh, "
                    "biases) and Llama (rope, rmsnorm, gated, silu, no biases) export")
  rope = {"rope_type": "default", "rope_theta": m.rope_theta}
  if m.rope_scaling:
    factor, low, high, original = m.rope_scaling
    rope = {**rope, "rope_type": "llama3", "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": original}
  if m.qkv_bias and (m.qk_norm or m.moe.num_experts):
    raise UserError("transformers has no model with q, k and v biases (model.qkv_bias) and QK "
                    "norm or experts")
  kind = "qwen2" if m.qkv_bias else "qwen3" if m.qk_norm else "llama"
  extra = {}
  if m.moe.num_experts:
    kind, extra = _moe_hf_config(m)
  architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM"}[kind]
  bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id
  return {"architectures": [architecture], "model_type": kind,
          "vocab_size": tokenizer.vocab_size, "hidden_size": m.d_model,
          "intermediate_size": m.d_ff, "num_hidden_layers": m.num_layers,
          "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads or m.num_heads,
          "head_dim": m.head_dim or m.d_model // m.num_heads,
          "max_position_embeddings": m.max_len,
          "rms_norm_eps": m.ln_eps, "hidden_act": "silu", "tie_word_embeddings": m.tie_embeddings,
          "attention_bias": False, "mlp_bias": False, "rope_parameters": rope,
          "rope_theta": m.rope_theta, "rope_scaling": None if rope["rope_type"] == "default" else
          rope, "bos_token_id": bos, "eos_token_id": tokenizer.eot_id, "torch_dtype": "float32",
          **extra}


def _moe_hf_config(m) -> tuple[str, dict]:
  """(model_type, its mixture-of-experts keys) for a MoE model: Mixtral's, or Qwen3-MoE's with
  QK norm; UserError naming the first key transformers' models cannot express."""
  moe = m.moe
  kind = "qwen3_moe" if m.qk_norm else "mixtral"
  needs = {"model.moe.router": (moe.router, "softmax"),
           "model.moe.num_shared_experts": (moe.num_shared_experts, 0),
           "model.moe.routed_scale": (moe.routed_scale, 1.0),
           "model.moe.bias_update_rate": (moe.bias_update_rate, 0.0)}
  if kind == "mixtral":
    needs.update({"model.moe.renormalize": (moe.renormalize, True),
                  "model.moe.every": (moe.every, 1), "model.moe.first_dense": (moe.first_dense, 0)})
  for key, (value, allowed) in needs.items():
    if value != allowed:
      raise UserError(f"{key}={value!r}: transformers' {kind} needs {allowed!r} (Mixtral: "
                      "softmax, renormalised, every block; Qwen3-MoE, with model.qk_norm: "
                      "softmax; neither has shared experts or a router bias)")
  K, F = moe.experts_per_token, moe.expert_d_ff or m.d_ff
  common = {"num_experts_per_tok": K, "router_aux_loss_coef": moe.balance_loss / K,
            "output_router_logits": False}
  if kind == "mixtral":
    return kind, {**common, "num_local_experts": moe.num_experts, "intermediate_size": F,
                  "sliding_window": None}
  return kind, {**common, "num_experts": moe.num_experts, "moe_intermediate_size": F,
                "norm_topk_prob": moe.renormalize, "decoder_sparse_step": moe.every,
                "mlp_only_layers": list(range(moe.first_dense))}


# transformers' model_type -> (its config.json as our model section, its tensors as our tree)
ARCHITECTURES = {"gpt2": (gpt2_model_config, gpt2_params_from_hf),
                 "bert": (bert_model_config, bert_params_from_hf),
                 **{kind: (llama_model_config, llama_params_from_hf) for kind in LLAMA_FAMILY}}


def _flat_numpy(params) -> dict[str, np.ndarray]:
  """{"block_0/attn/query/kernel": float32 array, ...}"""
  return {k: np.asarray(v, dtype=np.float32)
          for k, v in traverse_util.flatten_dict(params, sep="/").items()}


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
