"""Helper for test_sharding.py, run in a subprocess so that it can choose its device count.

    python tests/mesh_runs.py OUT_JSON TMP STEPS MESH [MESH...]   (MESH like 2x2x2)

Trains the sharding test's tiny GPT on each mesh and writes {mesh: {step: loss}} plus the
sharding of a large weight.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import read_metrics, tiny_config  # noqa: E402
from llm.train import Trainer, train  # noqa: E402


def sharding_config(tmp, mesh: str, steps: int):
  data, fsdp, tensor = map(int, mesh.split("x"))
  return tiny_config(tmp, **{
      "model.num_heads": 8, "model.d_model": 64, "model.d_ff": 128, "train.steps": steps,
      "train.checkpoint_every": 3, "train.eval_every": 3, "mesh.data": data, "mesh.fsdp": fsdp,
      "mesh.tensor": tensor})


def main(out, tmp, steps, *meshes):
  import pathlib
  results = {}
  for mesh in meshes:
    cfg = sharding_config(pathlib.Path(tmp), mesh, int(steps))
    workdir = os.path.join(tmp, f"run-{mesh}")
    train(cfg, workdir)
    state = Trainer(cfg, workdir).init_state()[0]
    wte = state["params"]["wte"]["embedding"]
    results[mesh] = {
        "losses": {m["step"]: m["loss"] for m in read_metrics(workdir) if m["split"] == "train"},
        "wte_spec": [a if isinstance(a, (str, type(None))) else list(a) for a in wte.sharding.spec],
        "wte_shard": list(wte.addressable_shards[0].data.shape),
    }
  if "2x2x2" in results:  # sampling with parameters split over all devices, and on one
    import jax
    from llm.sampling import Generator
    workdir = os.path.join(tmp, "run-2x2x2")
    prompts = ["The for statement", "Class definitions"]
    split, alone = Generator(workdir), Generator(workdir, jax.devices()[:1])
    results["2x2x2"]["generate_spec"] = [
        a if isinstance(a, (str, type(None))) else list(a)
        for a in split.params["wte"]["embedding"].sharding.spec]
    results["2x2x2"]["generate_equal"] = (
        split.generate(prompts, max_new_tokens=8, temperature=0) ==
        alone.generate(prompts, max_new_tokens=8, temperature=0))
  with open(out, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
