"""Direct preference optimisation (Rafailov et al. 2023) of an instruction-tuned policy.

    python -m llm.train --config=configs/dpo.py --workdir=runs/dpo \
        --config.init_from=runs/instruct --config.data.path=preference-examples.json
    python -m llm.evaluate --workdir=runs/dpo   # metrics per split, DIR/test_responses.jsonl

The reference is the starting point (`init_from`), frozen: its log-probabilities of every pair
are computed once before the first step and kept in DIR/task_data.npz, so training holds one
copy of the weights. Loss -log σ(β((log π(yw) - log π_ref(yw)) - (log π(yl) - log π_ref(yl))))
with task.beta = 0.1; task.dpo_average averages the answers' token log-probabilities instead of
summing them. The book's recipe: AdamW 5e-6, batch 8. `:lora` tunes rank-16 adapters.
"""

from llm.config import base_config


def get_config(arg=None):
  c = base_config()
  c.task.update(kind="dpo", beta=0.1)
  c.data.update(max_length=0, val_fraction=0.1, test_fraction=0.1)
  c.train.update(steps=40, batch_size=8, lr=5e-6, min_lr=5e-6, warmup_steps=0, weight_decay=0.01,
                 grad_clip=1.0, log_every=5, eval_every=10, checkpoint_every=20)
  if arg == "lora":
    c.lora.update(rank=16, alpha=16.0)
    c.train.update(lr=5e-5, min_lr=5e-5)
  elif arg:
    raise ValueError(f"configs/dpo.py takes no variant or ':lora', not {arg!r}")
  return c
