"""Flax linen models. Nothing here knows about data, tasks or training.

The families (model.kind) are registered in FAMILIES; each says what differs about it (`causal`,
`needs_bert_specials`), so nothing outside this package compares model.kind.
"""

import dataclasses

import jax.numpy as jnp

from llm.model.bert import BERT
from llm.model.gpt import GPT
from llm.model.heads import Classifier
from llm.model.layers import TransformerConfig
from llm.model.moe import MoEConfig

FAMILIES = {family.kind: family for family in (GPT, BERT)}


def family(kind: str):
  """The model class of model.kind (validated by config.validate)."""
  return FAMILIES[kind]


def transformer_config(model_cfg, vocab_size: int) -> TransformerConfig:
  """The model section of a run config as a TransformerConfig.

  `vocab_size` is the tokenizer's; `model.vocab_size` may pad it (e.g. 50257 -> 50304).
  """
  same_names = {f.name: model_cfg[f.name] for f in dataclasses.fields(TransformerConfig)
                if f.name in model_cfg}
  moe = MoEConfig(**{f.name: model_cfg.moe[f.name] for f in dataclasses.fields(MoEConfig)
                     if f.name in model_cfg.get("moe", {})})
  return TransformerConfig(**{**same_names, "vocab_size": max(model_cfg.vocab_size, vocab_size),
                              "dtype": jnp.dtype(model_cfg.dtype),
                              "rope_scaling": tuple(model_cfg.rope_scaling), "moe": moe})


def build(model_cfg, vocab_size: int, num_classes: int = 0):
  """The family's model; with `num_classes`, that model under a classification head."""
  backbone = FAMILIES[model_cfg.kind](transformer_config(model_cfg, vocab_size))
  return Classifier(backbone, num_classes) if num_classes else backbone


def shape_of(model) -> TransformerConfig:
  """The transformer's shape, for a family model or one under a task head."""
  return model.backbone.cfg if isinstance(model, Classifier) else model.cfg


def unrolled(model):
  """The same model with its blocks unrolled (block_0, block_1, ...), whatever its config says."""
  backbone = model.backbone if isinstance(model, Classifier) else model
  backbone = backbone.clone(cfg=dataclasses.replace(backbone.cfg, scan_layers=False))
  return model.clone(backbone=backbone) if isinstance(model, Classifier) else backbone
