"""Text classification from a pre-trained model: a head on its last token (GPT) or [CLS] (BERT).

    python -m llm.train --config=configs/finetune_classify.py --workdir=runs/spam \
        --config.init_from=runs/gpt_tiny \
        --config.data.path=SMSSpamCollection --config.data.format=tsv \
        --config.data.columns=label,text

The book's recipe: classes balanced by undersampling, a 70/10/20 split, AdamW at 5e-5, batch 8,
5 epochs, and only the last block, the final norm and the head training. `:lora` trains rank-16
adapters on every attention and MLP kernel (plus the head) instead.
"""

from llm.config import base_config


def get_config(arg=None):
  c = base_config()
  c.task.kind = "classify"
  c.data.update(text_field="text", label_field="label", balance=True, max_length=0,
                val_fraction=0.1, test_fraction=0.2)
  c.train.update(steps=650, batch_size=8, lr=5e-5, min_lr=5e-5, warmup_steps=0,
                 weight_decay=0.1, grad_clip=0.0, trainable="last:1", log_every=10,
                 eval_every=130, checkpoint_every=130)
  if arg == "lora":
    c.lora.update(rank=16, alpha=16.0)
    c.train.update(trainable="all", lr=5e-4, min_lr=5e-4)
  elif arg:
    raise ValueError(f"configs/finetune_classify.py takes no variant or ':lora', not {arg!r}")
  return c
