"""Instruction fine-tuning on Alpaca records (instruction, optional input, output).

    python -m llm.train --config=configs/finetune_instruct.py --workdir=runs/instruct \
        --config.init_from=runs/gpt_tiny --config.data.path=instruction-data.json

The book's recipe: the Alpaca prompt template, batches padded with end-of-text (one kept as the
last target), AdamW at 5e-5, batch 8, 2 epochs. Here the prompt is also masked out of the loss
(task.train_on) and 10% / 10% of the records are held out for validation and test
(`python -m llm.evaluate` writes the test responses). `:lora` trains rank-16 adapters instead.
"""

from llm.config import base_config


def get_config(arg=None):
  c = base_config()
  c.task.update(kind="instruct", train_on="assistant")
  c.data.update(max_length=0, val_fraction=0.1, test_fraction=0.1)
  c.train.update(steps=40, batch_size=8, lr=5e-5, min_lr=5e-5, warmup_steps=0, weight_decay=0.1,
                 grad_clip=0.0, log_every=5, eval_every=20, checkpoint_every=20)
  if arg == "lora":
    c.lora.update(rank=16, alpha=16.0)
    c.train.update(lr=5e-4, min_lr=5e-4)
  elif arg:
    raise ValueError(f"configs/finetune_instruct.py takes no variant or ':lora', not {arg!r}")
  return c
