"""The Llama family's config.json and tensor names, both ways: Llama, Mistral, Qwen2, Qwen3 and
the mixtures of experts Mixtral and Qwen3-MoE. Llama stores nn.Linear weights [out, in]; here
each is a Dense kernel [in, out] split by heads (query [D, N, H], out [N, H, D]), and a MoE
block's experts are stacked [E, in, out].
"""

import numpy as np

from llm.errors import UserError
from llm.runs.hf_tensors import flat_numpy, Tensors


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
  t = Tensors(tensors, directory, ignore=_LLAMA_BUFFERS)
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
  p = flat_numpy(params)
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
