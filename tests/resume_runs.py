"""Helper for test_optim.py, run in a subprocess with 8 CPU devices:

    python tests/resume_runs.py OUT_JSON TMP OPTIMIZER:MESH [OPTIMIZER:MESH...]

For each optimizer on its mesh (DATAxFSDPxTENSOR devices, e.g. 2x2x2): two train steps, a
checkpoint, two more; then the checkpoint restored and the same two steps again. Writes
{optimizer: {mesh: {"bit_exact": ..., "sharded_like_params": ...}}}.
"""

import json
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import tiny_config  # noqa: E402


def resumes_bit_exactly(optimizer: str, mesh: str, tmp: pathlib.Path) -> dict:
  import jax
  import numpy as np
  from llm.runs import rundir
  from llm.runs.trainer import new_health, Trainer
  from llm.training import checkpoint, sharding
  data, fsdp, tensor = map(int, mesh.split("x"))
  cfg = tiny_config(tmp, **{
      "model.num_layers": 1, "train.steps": 4,
      "train.optimizer": optimizer, "train.ema": 0.9, "mesh.data": data, "mesh.fsdp": fsdp,
      "mesh.tensor": tensor, **({"train.schedule": "constant"}
                                if optimizer == "schedule_free" else {})})
  workdir = tmp / f"{optimizer}-{mesh}"
  trainer = Trainer(cfg, str(workdir), jax.devices()[:data * fsdp * tensor])
  state, frozen = trainer.init_state()
  step_fn, health = trainer.jit_train_step(), new_health()
  batches = [trainer.place(next(trainer.batches)) for _ in range(4)]
  ckpt = rundir.checkpointer(str(workdir), 2, trains=True)
  with sharding.activate(trainer.mesh, cfg.mesh):
    for batch in batches[:2]:
      state, _, health = step_fn(state, frozen, batch, health)
    ckpt.save(2, state, {"step": 2})
    ckpt.close()
    abstract = checkpoint.abstract_like(state, trainer.state_shardings)
    straight = state
    for batch in batches[2:]:
      straight, _, health = step_fn(straight, frozen, batch, health)
    _, resumed, _ = rundir.checkpointer(str(workdir), 2).restore(abstract)
    for batch in batches[2:]:
      resumed, _, health = step_fn(resumed, frozen, batch, health)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                      straight, resumed)
  # The optimizer state of the token embedding is laid out like the embedding itself.
  wte = straight["params"]["wte"]["embedding"]
  like = [leaf.sharding.spec == wte.sharding.spec for leaf in jax.tree.leaves(
      straight["opt_state"]) if getattr(leaf, "shape", None) == wte.shape]
  return {"bit_exact": all(jax.tree.leaves(same)), "sharded_like_params": all(like),
          "state_like_wte": len(like), "wte_spec": str(wte.sharding.spec)}


def main(out, tmp, *runs):
  results = {}
  for run in runs:
    name, mesh = run.split(":")
    results.setdefault(name, {})[mesh] = resumes_bit_exactly(name, mesh, pathlib.Path(tmp))
  with open(out, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
