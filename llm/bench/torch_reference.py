"""The PyTorch references the benchmarks compare with (CPU torch, test dependencies): a
nanoGPT-style GPT and transformers' GPT-2 train steps, one block, causal attention against
scaled_dot_product_attention, the step's matrix products, GPT-2 decoding and
lm-evaluation-harness's Hugging Face backend."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm import model as model_lib
from llm.bench import timing
from llm.errors import UserError
from llm.model import attention, layers


def torch_train(cfg, steps: int, ours, rounds: int = 5) -> dict:
  """The references beside this project's step (`ours(n)` runs n steps): transformers'
  GPT2LMHeadModel and a nanoGPT-style GPT of the same shape, compiled with torch.compile and
  trained by torch.optim.AdamW (CPU torch) on the same batch shape, and the nanoGPT-style GPT
  again without torch.compile. The four are timed in turn (`timing.in_turn`), `steps` steps each,
  for `rounds` rounds."""
  try:
    import torch
    import transformers
  except ImportError:
    raise UserError("--compare_torch needs torch and transformers "
                    "(pip install torch==2.13.0 transformers)") from None
  m = cfg.model
  if not model_lib.family(m.kind).causal:
    raise UserError("--compare_torch compares a GPT's next-token train step (model.kind=gpt)")
  vocab = max(m.vocab_size, cfg.tokenizer.vocab_size)
  hf_cfg = transformers.GPT2Config(
      vocab_size=vocab, n_positions=m.max_len, n_embd=m.d_model, n_layer=m.num_layers,
      n_head=m.num_heads, n_inner=m.d_ff, resid_pdrop=m.dropout, embd_pdrop=m.dropout,
      attn_pdrop=m.dropout, tie_word_embeddings=m.tie_embeddings, bos_token_id=None,
      eos_token_id=None)
  hf_model = transformers.GPT2LMHeadModel(hf_cfg).train()
  nano_model = _nanogpt(vocab, m, torch).train()
  eager_model = _nanogpt(vocab, m, torch).train()
  runs = {"ours": ours, "torch": _torch_steps(cfg, lambda x: hf_model(x).logits, hf_model, torch),
          "nanogpt": _torch_steps(cfg, nano_model, nano_model, torch),
          # the same GPT run by torch's own kernels, without torch.compile's fusions
          "nanogpt_eager": _torch_steps(cfg, eager_model, eager_model, torch,
                                        torch_compile=False)}
  seconds = timing.in_turn({name: lambda run=run: run(steps) for name, run in runs.items()}, rounds)
  tokens = cfg.train.batch_size * cfg.data.max_length
  result = {}
  for name, run_s in seconds.items():
    step_s = run_s / steps
    result.update({f"{name}_step_ms": 1e3 * step_s, f"{name}_tokens_per_sec": tokens / step_s})
  for ref in ("torch", "nanogpt", "nanogpt_eager"):
    result[f"tokens_per_sec_over_{ref}"] = (result["ours_tokens_per_sec"]
                                            / result[f"{ref}_tokens_per_sec"])
  return result


def bench_block(cfg, rounds: int = 15) -> dict:
  """One transformer block's forward and backward pass (the gradients of its parameters and
  input) at the config's shape, this project's `layers.Block` in jax.jit against nanoGPT's
  block compiled with torch.compile, timed in turn for `rounds` rounds: the step's per-layer
  share without its optimizer, loss or neighbours."""
  import torch
  tr, m = cfg.train, cfg.model
  x, w = (np.random.default_rng(i).standard_normal(
      (tr.batch_size // tr.grad_accum, cfg.data.max_length, m.d_model), np.float32)
      for i in range(2))
  block = layers.Block(model_lib.transformer_config(m, m.vocab_size or cfg.tokenizer.vocab_size))
  params = block.init(jax.random.key(0), jnp.asarray(x), None, None, None, True)
  loss = lambda p, x: jnp.sum(block.apply(p, x, None, None, None, True) * w)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
  ours = lambda: jax.block_until_ready(grads(params, jnp.asarray(x)))
  nano = _nanogpt_block(m, torch)
  compiled, x_torch, w_torch = torch.compile(nano), torch.from_numpy(x), torch.from_numpy(w)
  x_torch.requires_grad_()

  def theirs():
    (compiled(x_torch) * w_torch).sum().backward()
    x_torch.grad = None
    nano.zero_grad(set_to_none=True)

  ours_s, theirs_s = timing.side_by_side(ours, theirs, rounds)
  return {"block_ms": 1e3 * ours_s, "nanogpt_block_ms": 1e3 * theirs_s,
          "block_over_nanogpt": theirs_s / ours_s}


def bench_attention(cfg, rounds: int = 15) -> dict:
  """Causal self-attention alone, forward and backward (the gradients of q, k and v) at the
  config's shape: this project's `attention.attend` as the model runs it (model.attention_impl;
  XLA's on the CPU) in jax.jit, against torch's
  scaled_dot_product_attention on heads-first arrays, which nanoGPT calls (on the CPU, a fused
  flash-attention kernel). Timed in turn for `rounds` rounds."""
  import torch
  tr, m = cfg.train, cfg.model
  B, L, N = tr.batch_size // tr.grad_accum, cfg.data.max_length, m.num_heads
  shape_BxLxNxH = (B, L, N, m.d_model // N)
  q, k, v, w = (np.random.default_rng(i).standard_normal(shape_BxLxNxH, np.float32)
                for i in range(4))
  impl = attention.choose(m.attention_impl, jnp.float32, L, decode=False)
  loss = lambda q, k, v: jnp.sum(attention.attend(q, k, v, None, True, impl) * w)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  qkv = [jnp.asarray(x) for x in (q, k, v)]
  ours = lambda: jax.block_until_ready(grads(*qkv))
  heads_first = lambda x: torch.from_numpy(x.transpose(0, 2, 1, 3).copy())
  qkv_torch = [heads_first(x).requires_grad_() for x in (q, k, v)]
  w_torch = heads_first(w)

  def theirs():
    out = torch.nn.functional.scaled_dot_product_attention(*qkv_torch, is_causal=True)
    (out * w_torch).sum().backward()
    for x in qkv_torch:
      x.grad = None

  ours_s, theirs_s = timing.side_by_side(ours, theirs, rounds)
  return {"attention_ms": 1e3 * ours_s, "torch_sdpa_ms": 1e3 * theirs_s,
          "attention_over_torch_sdpa": theirs_s / ours_s}


def bench_matmuls(cfg, repeats: int = 20) -> dict:
  """The train step's matrix products at the config's shape, each timed alone in jax.jit and in
  torch (CPU, median of `repeats`): GFLOP/s of JAX and JAX / torch. Dense: an MLP projection and
  its two backward products ([B*L, D] x [D, F]); attention: the batched [B*N] products of the
  scores, of probabilities and values, and the backward's transposed one."""
  import torch
  tr, m = cfg.train, cfg.model
  M, L, H = tr.batch_size // tr.grad_accum * cfg.data.max_length, cfg.data.max_length, m.d_model
  BN, Hd, F = tr.batch_size // tr.grad_accum * m.num_heads, m.d_model // m.num_heads, m.d_ff
  products = {  # name: (einsum, lhs shape, rhs shape)
      "mlp": ("mk,kn->mn", (M, H), (H, F)),
      "mlp_grad_input": ("mn,kn->mk", (M, F), (H, F)),
      "mlp_grad_kernel": ("mk,mn->kn", (M, H), (M, F)),
      "scores": ("bik,bjk->bij", (BN, L, Hd), (BN, L, Hd)),
      "probs_values": ("bij,bjk->bik", (BN, L, L), (BN, L, Hd)),
      "scores_grad_keys": ("bij,bik->bjk", (BN, L, L), (BN, L, Hd)),
  }

  result = {}
  rng = np.random.default_rng(0)
  for name, (spec, lhs_shape, rhs_shape) in products.items():
    lhs, rhs = (rng.standard_normal(s, np.float32) for s in (lhs_shape, rhs_shape))
    product = jax.jit(lambda a, b, spec=spec: jnp.einsum(spec, a, b))
    jax_lhs, jax_rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    torch_lhs, torch_rhs = torch.from_numpy(lhs), torch.from_numpy(rhs)
    jax_s = float(np.median(timing.times(lambda: product(jax_lhs, jax_rhs), repeats)))
    torch_s = float(np.median(timing.times(lambda: torch.einsum(spec, torch_lhs, torch_rhs),
                                           repeats)))
    out_shape = jax.eval_shape(product, jax_lhs, jax_rhs).shape
    contracted = lhs.size // math.prod(out_shape[:-1])  # the summed dim's size
    flops = 2 * math.prod(out_shape) * contracted
    result[f"matmul_{name}_gflops"] = flops / jax_s / 1e9
    result[f"matmul_{name}_over_torch"] = torch_s / jax_s
  return result


def _nanogpt_block(m, torch):
  """A transformer block written the way nanoGPT's model.py writes it: fused QKV projection,
  F.scaled_dot_product_attention(is_causal=True), tanh GELU, pre-LayerNorm with biases."""
  nn, F = torch.nn, torch.nn.functional

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln_1, self.ln_2 = nn.LayerNorm(m.d_model), nn.LayerNorm(m.d_model)
      self.c_attn = nn.Linear(m.d_model, 3 * m.d_model)
      self.c_proj = nn.Linear(m.d_model, m.d_model)
      self.c_fc, self.mlp_proj = nn.Linear(m.d_model, m.d_ff), nn.Linear(m.d_ff, m.d_model)

    def forward(self, x):
      B, T, C = x.shape
      q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
      heads = lambda t: t.view(B, T, m.num_heads, C // m.num_heads).transpose(1, 2)
      y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
      x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
      return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

  return Block()


def _nanogpt(vocab: int, m, torch):
  """A GPT of `_nanogpt_block`s, with nanoGPT's learned positions and the head tied to the
  token embedding."""
  nn = torch.nn

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte, self.wpe = nn.Embedding(vocab, m.d_model), nn.Embedding(m.max_len, m.d_model)
      self.blocks = nn.ModuleList(_nanogpt_block(m, torch) for _ in range(m.num_layers))
      self.ln_f = nn.LayerNorm(m.d_model)
      self.lm_head = nn.Linear(m.d_model, vocab, bias=False)
      self.lm_head.weight = self.wte.weight  # tied

    def forward(self, idx):
      x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
      for block in self.blocks:
        x = block(x)
      return self.lm_head(self.ln_f(x))

  return GPT()


def _torch_steps(cfg, forward, model, torch, torch_compile: bool = True):
  """`run(n)`: n train steps of torch.compile(forward) (cross-entropy, AdamW, gradient
  clipping), after the steps that compile it; with `torch_compile=False`, of forward itself."""
  tr, vocab = cfg.train, max(cfg.model.vocab_size, cfg.tokenizer.vocab_size)
  optimizer = torch.optim.AdamW(model.parameters(), lr=tr.lr, betas=(tr.b1, tr.b2),
                                weight_decay=tr.weight_decay)
  micro = tr.batch_size // tr.grad_accum
  tokens = torch.randint(0, vocab, (tr.grad_accum, micro, cfg.data.max_length + 1))
  compiled = torch.compile(forward) if torch_compile else forward

  def step():
    for a in range(tr.grad_accum):
      inputs, targets = tokens[a, :, :-1], tokens[a, :, 1:]
      logits = compiled(inputs)
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
      (loss / tr.grad_accum).backward()
    if tr.grad_clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  def run(n: int) -> None:
    for _ in range(n):
      step()

  run(2)  # the first steps compile (forward, then backward) and warm up
  return run


def hf_gpt2(cfg):
  """transformers' GPT2LMHeadModel of the model config's shape, random, for inference."""
  try:
    import transformers
  except ImportError:
    raise UserError("--compare_hf needs torch and transformers "
                    "(pip install torch==2.13.0 transformers)") from None
  return transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model,
      n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff, bos_token_id=None,
      eos_token_id=None)).eval()


def hf_gpt2_decode(cfg, prompt, new_tokens: int, repeats: int) -> dict:
  """transformers' GPT-2 `generate` (CPU torch, KV cache) on a model of the same shape."""
  model = hf_gpt2(cfg)
  import torch
  ids = torch.tensor(np.asarray(prompt), dtype=torch.long)

  def run(n):
    with torch.no_grad():
      return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, pad_token_id=0)

  def best(n):
    run(n)
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      run(n)
      times.append(time.perf_counter() - start)
    return min(times)

  prefill, total = best(1), best(new_tokens)
  batch, prompt_len = ids.shape
  return {"transformers_prefill_tokens_per_sec": batch * prompt_len / prefill,
          "transformers_decode_tokens_per_sec": batch * (new_tokens - 1) / (total - prefill)}


def harness_hf_seconds(cfg, requests, batch_size: int) -> float:
  """lm-evaluation-harness's HFLM scoring `requests` (token ids) with transformers' GPT-2 of
  the model's shape (CPU torch): the second of two passes."""
  try:
    import transformers
    from lm_eval.models.huggingface import HFLM
  except ImportError:
    raise UserError("--compare_hf needs torch, transformers and lm_eval "
                    "(pip install torch==2.13.0 transformers lm_eval[hf]==0.4.13)") from None
  # The tokenizer is never used (the requests are ids); HFLM reads its special tokens.
  tokenizer = transformers.GPT2TokenizerFast(vocab={"<|endoftext|>": 0}, merges=[],
                                             eos_token="<|endoftext|>",
                                             unk_token="<|endoftext|>")
  lm = HFLM(pretrained=hf_gpt2(cfg), tokenizer=tokenizer,
            batch_size=batch_size, device="cpu")
  tagged = [(("", ""), context, choice) for context, choice in requests]
  lm._loglikelihood_tokens(tagged, disable_tqdm=True)
  started = time.perf_counter()
  lm._loglikelihood_tokens(tagged, disable_tqdm=True)
  return time.perf_counter() - started
