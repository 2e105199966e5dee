"""Online RL from rewards: GRPO (or `:rloo`) on instruction records' prompts.

    python -m llm.train --config=configs/grpo.py --workdir=runs/grpo \
        --config.init_from=runs/instruct --config.data.path=records.json \
        --config.task.rewards=exact_match        # and/or --config.task.reward_model=runs/reward

Each step samples task.num_generations completions to each of train.batch_size prompts with the
policy being trained, scores them, and takes one step on the clipped surrogate with a KL penalty
to the starting model (llm/tasks/rl.py). A tenth of the prompts are held out: every
train.eval_every steps they are answered greedily and scored (the eval lines' `reward`).
"""

from llm.config import base_config


def get_config(arg=None):
  c = base_config()
  c.task.update(kind="grpo", num_generations=8, max_new_tokens=16, temperature=1.0,
                clip_eps=0.2, kl_coef=0.04, loss_norm="token")
  c.data.update(max_length=0, val_fraction=0.1, test_fraction=0.0)
  c.train.update(steps=60, batch_size=8, lr=1e-4, min_lr=1e-4, warmup_steps=0,
                 weight_decay=0.0, grad_clip=1.0, log_every=1, eval_every=20,
                 checkpoint_every=20)
  if arg == "rloo":
    c.task.kind = "rloo"
  elif arg:
    raise ValueError(f"configs/grpo.py takes no variant or ':rloo', not {arg!r}")
  return c
