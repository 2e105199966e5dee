"""BERT: an encoder that reads the whole text at once, with masked-LM and next-sentence heads.

    mlm_logits_BxPxV, nsp_logits_Bx2 = BERT(cfg).apply({"params": params}, tokens_BxL,
                                                       segments_BxL, valid_BxL, positions_BxP)

Token + position + segment embeddings and a LayerNorm; bidirectional blocks (post-LN as in
BERT, `cfg.pre_ln` for pre-LN with a final norm) that never attend to padding; a pooler (tanh
dense) on [CLS]; the MLM head (dense, GELU, LayerNorm, then the token embedding transposed
plus a bias of its own) read only at the selected positions; the NSP head on the pooled vector.
Layers are the GPT's (llm/model/layers.py).
"""

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from llm.model import moe
from llm.model.layers import (ACTIVATIONS, Dense, TransformerConfig, dense_init, make_blocks,
                              norm, run_blocks, sinusoidal)


@moe.records
class BERT(nn.Module):
  cfg: TransformerConfig
  kind: ClassVar[str] = "bert"  # model.kind
  causal: ClassVar[bool] = False  # an encoder: it reads both ways and generates nothing
  needs_bert_specials: ClassVar[bool] = True  # its tokenizer needs [CLS], [SEP], [MASK]

  def setup(self):
    cfg = self.cfg
    embed = lambda n, name: nn.Embed(
        n, cfg.d_model, dtype=cfg.dtype, name=name,
        embedding_init=nn.with_logical_partitioning(dense_init(), ("vocab", "embed")
                                                    if name == "wte" else (None, "embed")))
    self.wte = embed(cfg.vocab_size, "wte")
    if cfg.positions == "learned":
      self.wpe = embed(cfg.max_len, "wpe")
    self.wse = embed(cfg.type_vocab_size, "wse")  # segment A / B
    self.ln_emb = norm(cfg, "ln_emb")
    self.drop = nn.Dropout(cfg.dropout)
    self.blocks = make_blocks(cfg, causal=False)
    if cfg.pre_ln:
      self.ln_f = norm(cfg, "ln_f")
    self.pooler = Dense((cfg.d_model, cfg.d_model), (None, "embed"), dtype=cfg.dtype)
    self.mlm_dense = Dense((cfg.d_model, cfg.d_model), (None, "embed"), dtype=cfg.dtype)
    self.mlm_ln = norm(cfg, "mlm_ln")
    self.mlm_bias = self.param("mlm_bias", nn.with_logical_partitioning(
        nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,), jnp.float32)
    self.nsp = Dense((cfg.d_model, 2), ("embed", None), dtype=cfg.dtype)

  def hidden(self, tokens_BxL, segments_BxL=None, valid_BxL=None, deterministic=True):
    """The last block's output for every position, x_BxLxD."""
    if segments_BxL is None:
      segments_BxL = jnp.zeros_like(tokens_BxL)
    positions_1xL = jnp.arange(tokens_BxL.shape[1])[None]
    x_BxLxD = self.wte(tokens_BxL) + self.wse(segments_BxL)
    if self.cfg.positions == "learned":
      x_BxLxD = x_BxLxD + self.wpe(positions_1xL)
    elif self.cfg.positions == "sinusoidal":
      x_BxLxD = x_BxLxD + sinusoidal(positions_1xL, self.cfg.d_model).astype(x_BxLxD.dtype)
    x_BxLxD = self.drop(self.ln_emb(x_BxLxD), deterministic=deterministic)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    x_BxLxD = run_blocks(self.blocks, x_BxLxD, valid_BxL, positions_1xL, deterministic, False)
    return self.ln_f(x_BxLxD) if self.cfg.pre_ln else x_BxLxD

  def pooled(self, x_BxLxD):
    """[CLS]'s final state through the pooler: what NSP and classifiers read."""
    return jnp.tanh(self.pooler(x_BxLxD[:, 0]))

  def features(self, tokens_BxL, valid_BxL, deterministic=True):
    """One vector per sequence for task heads: the pooled [CLS]."""
    return self.pooled(self.hidden(tokens_BxL, None, valid_BxL, deterministic))

  def mlm_logits(self, x_BxPxD):
    h_BxPxD = self.mlm_ln(ACTIVATIONS[self.cfg.activation](self.mlm_dense(x_BxPxD)))
    logits_BxPxV = self.wte.attend(h_BxPxD) + self.mlm_bias.astype(h_BxPxD.dtype)
    return nn.with_logical_constraint(logits_BxPxV.astype(jnp.float32),
                                      ("batch", "length", "vocab"))

  def __call__(self, tokens_BxL, segments_BxL=None, valid_BxL=None, mlm_positions_BxP=None,
               deterministic=True):
    """(MLM logits at `mlm_positions_BxP` (default: every position), NSP logits [B, 2])."""
    x_BxLxD = self.hidden(tokens_BxL, segments_BxL, valid_BxL, deterministic)
    nsp_Bx2 = self.nsp(self.pooled(x_BxLxD)).astype(jnp.float32)
    if mlm_positions_BxP is not None:
      x_BxLxD = jnp.take_along_axis(x_BxLxD, mlm_positions_BxP[..., None], axis=1)
    return self.mlm_logits(x_BxLxD), nsp_Bx2
