"""What a run trains, one module per `task.kind` (see base.py for the interface):

- lm (lm.py): next-token prediction on windows of the token stream (GPT pre-training).
- mlm (mlm.py): masked-LM + next-sentence prediction on sentence pairs (BERT pre-training).
- classify (classify.py): a head on the backbone's one vector per sequence; text + label records.
- instruct (instruct.py): next-token prediction on Alpaca records, the prompt masked out.
- reward, dpo (preference.py): a reward model, or the policy tuned by DPO, on preference pairs.
- grpo, rloo (rl.py): the policy improved online from rewards of its own samples.

The registry maps task.kind to the class; `tasks.build(cfg)` is the task of a config. Nothing
outside this package compares task.kind.
"""

from llm.tasks import classify, instruct, lm, mlm, preference, rl  # noqa: F401 (they register)
from llm.tasks.base import (Context, EvalOptions, RecordTask, Schema, Task, TaskData, build,
                            get, kinds, register)

PRETRAINING = {"gpt": lm.LanguageModeling.kind, "bert": mlm.MaskedLM.kind}  # by model.kind

__all__ = ["Context", "EvalOptions", "RecordTask", "Schema", "Task", "TaskData", "build", "get",
           "kinds", "register", "PRETRAINING"]
