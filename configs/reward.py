"""A reward model: a scalar head on a GPT (its last token) or a BERT (pooled [CLS]), trained on
preference pairs with the pairwise loss -log σ(r(chosen) - r(rejected)).

    python -m llm.train --config=configs/reward.py --workdir=runs/reward \
        --config.init_from=runs/instruct --config.data.path=preference-examples.json
    python -m llm.score --workdir=runs/reward --instruction="..." --response="..."

Records hold `instruction`, optional `input`, `chosen` and `rejected` (data.chosen_field,
data.rejected_field); the prompt is the instruction template. 10% / 10% are held out for
validation and test. `:lora` trains rank-16 adapters and the head instead of every weight.
"""

from llm.config import base_config


def get_config(arg=None):
  c = base_config()
  c.task.kind = "reward"
  c.data.update(max_length=0, val_fraction=0.1, test_fraction=0.1)
  c.train.update(steps=60, batch_size=8, lr=1e-4, min_lr=1e-5, warmup_steps=5, weight_decay=0.0,
                 grad_clip=1.0, log_every=5, eval_every=20, checkpoint_every=20)
  if arg == "lora":
    c.lora.update(rank=16, alpha=16.0)
    c.train.update(lr=1e-3, min_lr=1e-4)
  elif arg:
    raise ValueError(f"configs/reward.py takes no variant or ':lora', not {arg!r}")
  return c
