"""Flax linen models. Nothing here knows about data, tasks or training."""

import jax.numpy as jnp

from llm.model.bert import BERT
from llm.model.gpt import GPT
from llm.model.heads import Classifier
from llm.model.layers import TransformerConfig

FAMILIES = {"gpt": GPT, "bert": BERT}


def transformer_config(model_cfg, vocab_size: int) -> TransformerConfig:
  """The model section of a run config as a TransformerConfig.

  `vocab_size` is the tokenizer's; `model.vocab_size` may pad it (e.g. 50257 -> 50304).
  """
  return TransformerConfig(
      vocab_size=max(model_cfg.vocab_size, vocab_size),
      max_len=model_cfg.max_len,
      num_layers=model_cfg.num_layers,
      num_heads=model_cfg.num_heads,
      d_model=model_cfg.d_model,
      d_ff=model_cfg.d_ff,
      dropout=model_cfg.dropout,
      dtype=jnp.dtype(model_cfg.dtype),
      tie_embeddings=model_cfg.tie_embeddings,
      use_bias=model_cfg.use_bias,
      ln_eps=model_cfg.ln_eps,
      activation=model_cfg.activation,
      pre_ln=model_cfg.pre_ln,
      attention_impl=model_cfg.attention_impl,
  )


def build(model_cfg, vocab_size: int, num_classes: int = 0):
  """The family's model; with `num_classes`, that model under a classification head."""
  backbone = FAMILIES[model_cfg.kind](transformer_config(model_cfg, vocab_size))
  return Classifier(backbone, num_classes) if num_classes else backbone


def shape_of(model) -> TransformerConfig:
  """The transformer's shape, for a family model or one under a task head."""
  return model.backbone.cfg if isinstance(model, Classifier) else model.cfg
