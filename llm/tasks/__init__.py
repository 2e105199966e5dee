"""What a run trains, one module per kind of task (see base.py for the interface):

- lm (lm.py): next-token prediction on windows of the token stream (GPT pre-training).
- mlm (mlm.py): masked-LM + next-sentence prediction on sentence pairs (BERT pre-training).
- classify (classify.py): a head on the backbone's one vector per sequence; text + label records.
- instruct (instruct.py): next-token prediction on Alpaca records, the prompt masked out.
- reward, dpo (preference.py): a reward model, or the policy tuned by DPO, on preference pairs.
- grpo, rloo (rl.py): the policy improved online from rewards of its own samples.

Every module of this package is imported here, so a task registers itself by existing: a new
one is a new file, with no list to edit. The registry maps task.kind to the class;
`tasks.build(cfg)` is the task of a config. Nothing outside this package compares task.kind.
"""

import importlib
import pkgutil

from llm.tasks.base import (Context, EvalOptions, RecordTask, Schema, Task, TaskData, build,
                            config_keys, get, kinds, kinds_where, pretraining, register)

for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Context", "EvalOptions", "RecordTask", "Schema", "Task", "TaskData", "build",
           "config_keys", "get", "kinds", "kinds_where", "pretraining", "register"]
