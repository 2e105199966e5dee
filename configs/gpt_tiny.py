"""Quickstart: a 3.7M-parameter GPT on the embedded corpus (CPython's documentation).

    python -m llm.train --config=configs/gpt_tiny.py --workdir=runs/gpt_tiny
"""

from llm.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.d_model = 256
  c.model.d_ff = 1024
  c.model.max_len = 128
  c.model.dropout = 0.1
  c.tokenizer.kind = "sentencepiece"
  c.tokenizer.vocab_size = 2048
  c.data.max_length = 128
  c.data.stride = 64
  c.data.val_fraction = 0.1
  c.train.steps = 500
  c.train.batch_size = 16
  c.train.lr = 2e-3
  c.train.min_lr = 2e-4
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.1
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.eval_batches = 20
  c.train.checkpoint_every = 200
  return c
