"""Quickstart: a 3.7M-parameter GPT on the embedded corpus (CPython's documentation).

    python -m llm.train --config=configs/gpt_tiny.py --workdir=runs/gpt_tiny

About 6 minutes on 2 CPU cores to a validation loss near 4.05 (a unigram model: 6.09).
"""

from llm.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.model.update(num_layers=4, num_heads=4, d_model=256, d_ff=1024, max_len=128, dropout=0.1)
  c.tokenizer.update(kind="sentencepiece", vocab_size=2048)
  c.data.update(max_length=128, stride=64, val_fraction=0.1)
  c.train.update(steps=500, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=50,
                 weight_decay=0.1, log_every=10, eval_every=100, eval_batches=20,
                 checkpoint_every=200)
  return c
