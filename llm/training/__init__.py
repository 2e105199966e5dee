"""The parts a train step is made of: the device mesh (sharding.py), parameters (params.py),
objectives (objectives.py), optimizers and schedules (optim.py), checkpoints (checkpoint.py),
metrics (metrics.py) and preemption (preemption.py). The loop that joins them is
llm/runs/trainer.py."""
