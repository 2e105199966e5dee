"""Helper for test_sharding.py, run in a subprocess so that it can choose its device count.

    python tests/mesh_runs.py OUT_JSON TMP STEPS MESH [MESH...]   (MESH like 2x2x2, 2x2x2:scan,
                                                                   2x2x2:llama, 2x1x2x2:moe; see
                                                                   sharding_config)

Trains the sharding test's tiny GPT on each mesh and writes {mesh: {step: loss}} plus the
sharding of a large weight. MESH:rl instead trains online RL (GRPO, two passes over each rollout)
from the run $RL_BASE_RUN on the records $RL_RECORDS, for its losses, rewards and clip fractions.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import preference_config, read_metrics, tiny_config  # noqa: E402
from llm.runs.trainer import train, Trainer  # noqa: E402


LLAMA = {"model.positions": "rope", "model.norm": "rmsnorm", "model.mlp": "gated",
         "model.activation": "silu", "model.num_kv_heads": 2, "model.use_bias": False,
         "model.tie_embeddings": False}


# A mixture of experts (4, top 2, with the router bias moving) in Llama's blocks, scanned and
# rematerialised.
MOE = {**LLAMA, "model.moe.num_experts": 4, "model.moe.experts_per_token": 2,
       "model.moe.bias_update_rate": 0.01, "model.scan_layers": True, "model.remat": "full"}
# The experts as one batched product over blocks of a capacity (4 x tokens x 2 / 4 experts:
# room for every copy, so that nothing is dropped on any mesh).
CAPACITY = {"model.moe.capacity_factor": 4.0}


def sharding_config(tmp, mesh: str, steps: int):
  """MESH like 2x2x2 (data x fsdp x tensor) or 2x1x2x2 (data x fsdp x expert x tensor), with
  :scan (scanned layers), :llama (Llama's blocks), :moe (MOE) and :cap (CAPACITY) as options."""
  shape, *options = mesh.split(":")
  sizes = list(map(int, shape.split("x")))
  data, fsdp, expert, tensor = sizes if len(sizes) == 4 else (sizes[0], sizes[1], 1, sizes[2])
  # A constant learning rate after warmup: a run stopped at any step is the start of a longer one.
  return tiny_config(tmp, **{
      "model.num_heads": 8, "model.d_model": 64, "model.d_ff": 128, "train.steps": steps,
      "train.min_lr": 3e-3,
      "train.checkpoint_every": 3, "train.eval_every": 3, "mesh.data": data, "mesh.fsdp": fsdp,
      "mesh.expert": expert, "mesh.tensor": tensor, "model.scan_layers": "scan" in options,
      **(LLAMA if "llama" in options else {}), **(MOE if "moe" in options else {}),
      **(CAPACITY if "cap" in options else {})})


def rl_config(tmp, mesh: str, steps: int):
  """GRPO with the brevity reward (always some signal), two optimizer passes per rollout."""
  data, fsdp, tensor = map(int, mesh.split(":")[0].split("x"))
  return preference_config(tmp, os.environ["RL_BASE_RUN"], os.environ["RL_RECORDS"], "grpo", **{
      "task.rewards": "brevity", "task.num_generations": 4, "task.max_new_tokens": 8,
      "task.updates_per_rollout": 2, "train.batch_size": 4, "train.steps": steps,
      "train.eval_every": steps, "data.val_fraction": 0.1, "data.test_fraction": 0.0,
      "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})


def main(out, tmp, steps, *meshes):
  import pathlib
  results = {}
  for mesh in meshes:
    if mesh.endswith(":rl"):
      workdir = os.path.join(tmp, f"run-{mesh}")
      train(rl_config(pathlib.Path(tmp), mesh, int(steps)), workdir)
      results[mesh] = {f"{m['split']} {m['step']}": [m["reward"], m.get("loss", 0.0),
                                                      m.get("clip_fraction", 0.0),
                                                      m.get("best_of_n_reward", 0.0)]
                       for m in read_metrics(workdir)}
      continue
    cfg = sharding_config(pathlib.Path(tmp), mesh, int(steps))
    workdir = os.path.join(tmp, f"run-{mesh}")
    train(cfg, workdir)
    state = Trainer(cfg, workdir).init_state()[0]
    wte = state["params"]["wte"]["embedding"]
    results[mesh] = {
        "losses": {m["step"]: m["loss"] for m in read_metrics(workdir) if m["split"] == "train"},
        "wte_spec": _spec(wte),
        "wte_shard": list(wte.addressable_shards[0].data.shape),
    }
    if "block_0" in state["params"]:  # (scanned layers keep one stacked "blocks")
      results[mesh]["key_spec"] = _spec(state["params"]["block_0"]["attn"]["key"]["kernel"])
    elif "experts_wi" in state["params"]["blocks"]["mlp"]:
      results[mesh]["expert_spec"] = _spec(state["params"]["blocks"]["mlp"]["experts_wi"]["kernel"])
  for name in ("2x2x2", "2x1x2x2:moe"):  # sampling with parameters split over all devices
    if name not in results:
      continue
    import jax
    from llm.inference.sampling import Generator
    from llm.runs import loading
    workdir = os.path.join(tmp, f"run-{name}")
    prompts = ["The for statement", "Class definitions"]
    split = Generator(loading.load(workdir))
    alone = Generator(loading.load(workdir, jax.devices()[:1]))
    results[name]["generate_spec"] = _spec(split.params["wte"]["embedding"])
    results[name]["generate_equal"] = (
        split.generate(prompts, max_new_tokens=8, temperature=0) ==
        alone.generate(prompts, max_new_tokens=8, temperature=0))
  if "2x2x2" in results:
    mesh_cfg = sharding_config(pathlib.Path(tmp), "2x2x2", int(steps)).mesh
    results["2x2x2"]["splash_errors"] = _attention_errors_on_mesh(mesh_cfg, "splash")
  with open(out, "w") as f:
    json.dump(results, f)


def _spec(array) -> list:
  """An array's PartitionSpec as JSON: a mesh axis name, None, or a list of names per dim."""
  return [a if isinstance(a, (str, type(None))) else list(a) for a in array.sharding.spec]


def _attention_errors_on_mesh(mesh_cfg, impl: str) -> list:
  """An attention kernel split over the mesh (batch over data and fsdp, heads over tensor)
  against XLA's attention on one device: the largest differences of the outputs at real tokens
  and of the gradients (relative to the largest gradient), causal with padding and documents,
  with grouped-query heads (4 of 2)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from llm.model import attention
  from llm.training import sharding
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(4, 128, 4, 32)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(4, 128, 2, 32)), jnp.float32) for _ in range(2))
  valid = np.ones((4, 128), bool)
  valid[0, 90:] = False
  mask = jnp.asarray(valid)[:, None]
  documents = jnp.asarray(np.arange(128)[None] // 50 * np.array([[0], [1], [0], [1]]))
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def run(impl):
    out = lambda q, k, v: attention.attend(q, k, v, mask, True, impl, documents)
    loss = lambda *qkv: jnp.sum(jnp.where(valid[..., None, None], out(*qkv) * w, 0.0))
    return jax.jit(out)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  reference, ref_grads = run("xla")
  with sharding.activate(sharding.make_mesh(mesh_cfg), mesh_cfg):
    out, grads = run(impl)
  return [float(np.abs(np.asarray(out) - np.asarray(reference))[valid].max()),
          max(float(np.abs(np.asarray(g) - np.asarray(r)).max() / np.abs(np.asarray(r)).max())
              for g, r in zip(grads, ref_grads))]


if __name__ == "__main__":
  main(*sys.argv[1:])
