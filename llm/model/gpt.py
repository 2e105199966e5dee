"""GPT-2: token + learned position embeddings, pre-LN causal blocks, final LayerNorm, LM head;
with the config's switches, Llama too (rotary positions, RMSNorm, SwiGLU, grouped-query
attention; see layers.py).

    logits_BxLxV = GPT(cfg).apply({"params": params}, tokens_BxL)

`positions_BxL` and `valid_BxL` let left-padded prompts of different lengths run in one batch
(positions count from each prompt's first real token; padding is never attended to).
`documents_BxL` keeps the documents packed into one window apart (data.document_masks): a
token attends only to tokens of its own document, and `positions_BxL` restart in each.
"""

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from llm.model import moe
from llm.model.layers import (Dense, TransformerConfig, dense_init, make_blocks, norm,
                              run_blocks, sinusoidal)


@moe.records
class GPT(nn.Module):
  cfg: TransformerConfig
  kind: ClassVar[str] = "gpt"  # model.kind
  causal: ClassVar[bool] = True  # a decoder: it generates text
  needs_bert_specials: ClassVar[bool] = False  # its tokenizer needs [CLS], [SEP], [MASK]

  def setup(self):
    cfg = self.cfg
    self.wte = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
        embedding_init=nn.with_logical_partitioning(dense_init(), ("vocab", "embed")))
    if cfg.positions == "learned":
      self.wpe = nn.Embed(
          cfg.max_len, cfg.d_model, dtype=cfg.dtype,
          embedding_init=nn.with_logical_partitioning(dense_init(0.01), (None, "embed")))
    self.drop = nn.Dropout(cfg.dropout)
    self.blocks = make_blocks(cfg, causal=True)
    self.ln_f = norm(cfg, "ln_f")
    if not cfg.tie_embeddings:
      self.lm_head = Dense((cfg.d_model, cfg.vocab_size), ("embed", "vocab"), use_bias=False,
                           dtype=cfg.dtype)

  def hidden(self, tokens_BxL, positions_BxL=None, valid_BxL=None, deterministic=True,
             decode=False, documents_BxL=None):
    """The final LayerNorm's output, x_BxLxD: what the LM head and task heads read."""
    if positions_BxL is None:
      positions_BxL = jnp.arange(tokens_BxL.shape[1])[None, :]
    x_BxLxD = self.wte(tokens_BxL)
    if self.cfg.positions == "learned":
      x_BxLxD = x_BxLxD + self.wpe(positions_BxL)
    elif self.cfg.positions == "sinusoidal":
      x_BxLxD = x_BxLxD + sinusoidal(positions_BxL, self.cfg.d_model).astype(x_BxLxD.dtype)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    x_BxLxD = self.drop(x_BxLxD, deterministic=deterministic)
    x_BxLxD = run_blocks(self.blocks, x_BxLxD, valid_BxL, positions_BxL, deterministic, decode,
                         documents_BxL)
    return self.ln_f(x_BxLxD)

  def features(self, tokens_BxL, valid_BxL, deterministic=True):
    """One vector per sequence for task heads: the last non-padding token's hidden state
    (the only position that has read the whole right-padded text)."""
    x_BxLxD = self.hidden(tokens_BxL, None, valid_BxL, deterministic)
    last_B = jnp.sum(valid_BxL, axis=1) - 1
    return x_BxLxD[jnp.arange(x_BxLxD.shape[0]), last_B]

  def features_at(self, tokens_BxL, positions_BxL, documents_BxL, ends_BxS, deterministic=True):
    """`features` of the sequences packed into each row (documents kept apart), read at their
    last tokens `ends_BxS`: [B, S, D]."""
    x_BxLxD = self.hidden(tokens_BxL, positions_BxL, None, deterministic,
                          documents_BxL=documents_BxL)
    return jnp.take_along_axis(x_BxLxD, ends_BxS[..., None], axis=1)

  def logits(self, x_BxLxD):
    if self.cfg.tie_embeddings:
      logits_BxLxV = self.wte.attend(x_BxLxD)
    else:
      logits_BxLxV = self.lm_head(x_BxLxD)
    # The loss is taken in float32 whatever the compute dtype.
    return nn.with_logical_constraint(logits_BxLxV.astype(jnp.float32),
                                      ("batch", "length", "vocab"))

  def __call__(self, tokens_BxL, positions_BxL=None, valid_BxL=None, deterministic=True,
               decode=False, documents_BxL=None):
    return self.logits(self.hidden(tokens_BxL, positions_BxL, valid_BxL, deterministic, decode,
                                   documents_BxL))
