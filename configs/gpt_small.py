"""GPT-2 124M (12 layers, 12 heads, width 768, context 1024) on an OpenWebText-like corpus.

    python -m llm.train --config=configs/gpt_small.py --workdir=runs/gpt_small
    python -m llm.train --config=configs/gpt_small.py:tiny --workdir=runs/gpt_small_tiny

The optimiser follows GPT-2/nanoGPT: AdamW 6e-4, betas 0.9/0.95, weight decay 0.1, 2000 warmup
steps, cosine to 6e-5, and a global batch of 512 x 1024 = 0.5M tokens, reached through 32
micro-batches of 16 sequences (lower train.grad_accum where more devices share each step).
`:tiny` keeps the shape of the recipe but shrinks the model and trains on the embedded corpus.
"""

from llm.config import base_config


def get_config(arg=None):
  c = base_config()
  c.model.update(num_layers=12, num_heads=12, d_model=768, d_ff=3072, max_len=1024,
                 vocab_size=50304,  # GPT-2's 50257 padded to a multiple of 64 for the MXU/tensor cores
                 dropout=0.0, dtype="bfloat16")
  c.tokenizer.kind = "gpt2"  # tiktoken's copy; offline: --config.tokenizer.path=DIR_WITH_FILES
  c.data.update(hf_name="Skylion007/openwebtext", split="train", text_field="text",
                max_length=1024, stride=1024, val_fraction=0.0005)
  c.train.update(steps=600_000, batch_size=512, grad_accum=32, lr=6e-4, min_lr=6e-5,
                 warmup_steps=2000, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0,
                 log_every=10, eval_every=1000, eval_batches=50, checkpoint_every=1000,
                 keep_checkpoints=3)
  if arg == "tiny":
    c.model.update(num_layers=2, num_heads=2, d_model=128, d_ff=512, max_len=128,
                   dtype="float32")
    c.data.update(hf_name="", max_length=128, stride=128, val_fraction=0.1)
    c.train.update(steps=50, batch_size=16, grad_accum=2, warmup_steps=10, eval_every=25,
                   eval_batches=5, checkpoint_every=25)
  elif arg:
    raise ValueError(f"configs/gpt_small.py: unknown variant {arg!r}; use ':tiny' or none")
  return c
