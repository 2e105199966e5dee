"""The mixture-of-experts layer (llm/model/moe.py) against a per-token loop in numpy, its routers
against hand-computed cases, its losses against their formulas, and a MoE model through LoRA,
the KV cache, a resumed run and bad configs. (Expert parallelism on a mesh: test_sharding.py;
Mixtral and Qwen3-MoE parity with transformers: test_convert.py.)"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import read_metrics, tiny_config
from llm.model import layers, lora, moe
from llm.model.moe import MoEConfig

D, F, E, K, T = 8, 6, 4, 2, 12


def _cfg(**moe_keys):
  return layers.TransformerConfig(vocab_size=16, max_len=16, num_layers=1, num_heads=2,
                                  d_model=D, d_ff=F, mlp="gated", activation="silu",
                                  use_bias=False,
                                  moe=MoEConfig(num_experts=E, experts_per_token=K, **moe_keys))


def _weights(rng, ties=False):
  """Router [D, E] and gated experts. `ties`: experts 1, 2 and 3 score alike for every token,
  so the top 2 are (0, 1) or (1, 2) and expert 3 (the higher index of a tie) gets nothing."""
  router = rng.normal(size=(D, E)).astype(np.float32)
  if ties:
    router[:, 2] = router[:, 3] = router[:, 1]
  kernel = lambda *shape: (rng.normal(size=shape) / np.sqrt(shape[-2])).astype(np.float32)
  return {"router": router, "router_bias": None, "wg": (kernel(E, D, F), None),
          "wi": (kernel(E, D, F), None), "wo": (kernel(E, F, D), None)}


def _silu(x):
  return x / (1 + np.exp(-x))


def _reference(x_TxD, w, renormalize=True, capacity=None):
  """Each token through its top-k experts one at a time (numpy); ties go to the lower index;
  with `capacity`, an expert takes only its first `capacity` copies in token order."""
  logits = x_TxD.astype(np.float64) @ w["router"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out, taken = np.zeros_like(x_TxD, np.float64), np.zeros(E, int)
  chosen = []
  for t in range(len(x_TxD)):
    experts = np.argsort(-probs[t], kind="stable")[:K]
    weights = probs[t, experts] / (probs[t, experts].sum() if renormalize else 1.0)
    chosen.append(experts)
    for e, weight in zip(experts, weights):
      taken[e] += 1
      if capacity is not None and taken[e] > capacity:
        continue
      h = _silu(x_TxD[t] @ w["wg"][0][e]) * (x_TxD[t] @ w["wi"][0][e])
      out[t] += weight * (h @ w["wo"][0][e])
  return out, np.array(chosen), probs


def _as_jax(w):
  return jax.tree.map(jnp.asarray, w)


@pytest.mark.parametrize("ties", [False, True])
def test_dropless_layer_equals_a_per_token_loop_in_values_and_gradients(ties):
  rng = np.random.default_rng(0)
  w = _weights(rng, ties)
  x = rng.normal(size=(T, D)).astype(np.float32)
  cfg = _cfg()
  run = lambda x, w: moe.experts_forward(x[None], w, cfg, jax.nn.silu)
  out, stats = run(jnp.asarray(x), _as_jax(w))
  expected, chosen, probs = _reference(x, w)
  np.testing.assert_allclose(np.asarray(out[0]), expected, atol=1e-5)
  counts = np.bincount(chosen.reshape(-1), minlength=E)
  np.testing.assert_array_equal(np.asarray(stats["count"]), counts)
  if ties:
    assert counts[3] == 0  # an empty expert

  # Gradients: the same loss through a direct einsum over each token's chosen experts (JAX
  # differentiates it), with the choice fixed at the reference's.
  cot = rng.normal(size=(T, D)).astype(np.float32)

  def direct(x, w):
    logits = x @ w["router"]
    probs = jax.nn.softmax(logits)
    weights = jnp.take_along_axis(probs, chosen, -1)
    weights = weights / weights.sum(-1, keepdims=True)
    pick = lambda name: w[name][0][chosen]  # [T, K, ...]
    h = jax.nn.silu(jnp.einsum("td,tkdf->tkf", x, pick("wg"))) * jnp.einsum(
        "td,tkdf->tkf", x, pick("wi"))
    return jnp.einsum("tk,tkf,tkfd->td", weights, h, pick("wo"))

  loss = lambda f: lambda x, w: jnp.sum(f(x, w) * cot)
  ours = jax.grad(loss(lambda x, w: run(x, w)[0][0]), argnums=(0, 1))(jnp.asarray(x), _as_jax(w))
  theirs = jax.grad(loss(direct), argnums=(0, 1))(jnp.asarray(x), _as_jax(w))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_capacity_drops_the_copies_past_it_and_counts_them():
  """All tokens tie on experts 0 and 1 (a zero router): with capacity factor 1 each expert takes
  ceil(1 x 24 / 4) = 6 copies, the first 6 tokens', and the other 12 copies are dropped."""
  rng = np.random.default_rng(1)
  w = _weights(rng)
  w["router"] = np.zeros_like(w["router"])
  x = rng.normal(size=(T, D)).astype(np.float32)
  out, stats = moe.experts_forward(jnp.asarray(x)[None], _as_jax(w), _cfg(capacity_factor=1.0),
                                   jax.nn.silu)
  expected, _, _ = _reference(x, w, capacity=6)
  np.testing.assert_allclose(np.asarray(out[0]), expected, atol=1e-5)
  assert float(stats["dropped"]) == 12
  assert np.all(np.asarray(out[0, 6:]) == 0)


def test_routers_against_hand_computed_cases():
  logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
  softmax = np.exp([2.0, 1.0, 0.0, -1.0]) / np.exp([2.0, 1.0, 0.0, -1.0]).sum()
  # Mixtral: softmax over the top-2 logits = the top-2 probabilities renormalised.
  weights, experts, probs = moe.route(logits, None, MoEConfig(num_experts=4))
  np.testing.assert_array_equal(np.asarray(experts), [[0, 1]])
  np.testing.assert_allclose(np.asarray(weights), [[1 / (1 + math.exp(-1)),
                                                    1 - 1 / (1 + math.exp(-1))]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(probs), [softmax], rtol=1e-6)
  # Qwen's norm_topk_prob=False: the probabilities as they are.
  weights, _, _ = moe.route(logits, None, MoEConfig(num_experts=4, renormalize=False))
  np.testing.assert_allclose(np.asarray(weights), [softmax[:2]], rtol=1e-6)
  # DeepSeek-V3: sigmoid scores, chosen by score + bias, weighted by score (renormalised) x
  # routed_scale. The bias lifts expert 3 (score 0.269) past expert 1 (0.731).
  bias = jnp.asarray([0.0, 0.0, 0.0, 0.6])
  weights, experts, _ = moe.route(logits, bias, MoEConfig(num_experts=4, router="sigmoid",
                                                          routed_scale=2.5))
  sig = 1 / (1 + np.exp(-np.array([2.0, 1.0, 0.0, -1.0])))
  np.testing.assert_array_equal(np.asarray(experts), [[0, 3]])
  np.testing.assert_allclose(np.asarray(weights),
                             [2.5 * sig[[0, 3]] / sig[[0, 3]].sum()], rtol=1e-6)


def test_balance_and_z_losses_equal_their_formulas():
  rng = np.random.default_rng(2)
  w = _weights(rng)
  x = rng.normal(size=(T, D)).astype(np.float32)
  _, stats = moe.experts_forward(jnp.asarray(x)[None], _as_jax(w), _cfg(), jax.nn.silu)
  _, chosen, probs = _reference(x, w)
  share = np.bincount(chosen.reshape(-1), minlength=E) / (T * K)
  np.testing.assert_allclose(float(stats["balance_loss"]), E * np.sum(share * probs.mean(0)),
                             rtol=1e-5)
  logits = x.astype(np.float64) @ w["router"]
  log_z = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(float(stats["z_loss"]), np.mean(log_z ** 2), rtol=1e-5)
  np.testing.assert_allclose(float(stats["aux_loss"]),
                             0.01 * float(stats["balance_loss"]) + 0.001 * float(stats["z_loss"]),
                             rtol=1e-6)


def test_router_bias_moves_a_skewed_load_towards_balance():
  """Auxiliary-loss-free balancing: tokens that mostly prefer experts 0 and 1 spread out evenly
  as the bias, moved by `update_router_bias`, steps down the favourites and up the others."""
  rng = np.random.default_rng(3)
  w = _weights(rng)
  x = rng.normal(size=(64, D)).astype(np.float32)
  x[:, 0] = 1.0
  w["router"] = (0.5 * rng.normal(size=(D, E))).astype(np.float32)
  w["router"][0, :2] = 3.0, 2.0  # the constant input favours experts 0 and 1
  cfg = _cfg(router="sigmoid", bias_update_rate=0.01)
  params = {"block_0": {"mlp": {"router": {"bias": jnp.zeros(E)}}}}
  loads = []
  for _ in range(60):
    weights = {**_as_jax(w), "router_bias": params["block_0"]["mlp"]["router"]["bias"]}
    _, stats = moe.experts_forward(jnp.asarray(x)[None], weights, cfg, jax.nn.silu)
    loads.append(np.asarray(stats["count"]) / (64 * K))
    params = moe.update_router_bias(params, {"block_0": {"mlp": {"stats": stats}}}, 0.01)
  assert loads[0][0] > 0.45 and loads[0][2:].sum() < 0.2  # skewed
  assert np.mean([load.max() for load in loads[-10:]]) < 0.28  # 0.25 is even
  bias = np.asarray(params["block_0"]["mlp"]["router"]["bias"])
  assert bias[0] < 0 and bias[2] > 0 and bias[3] > 0


def test_lora_adapts_each_expert():
  """lora.targets matching the experts: A [E, D, r], B [E, r, F]; the merged kernel of expert e
  is W_e + scale x A_e @ B_e."""
  import flax.linen as nn
  kernel = nn.LogicallyPartitioned(jnp.ones((E, D, F)), ("expert", "embed", "mlp"))
  tree = {"mlp": {"experts_wi": {"kernel": kernel}}}
  adapted, count = lora.add(tree, 2, r"experts_wi/kernel", jax.random.PRNGKey(0))
  assert count == 1
  flat = nn.meta.unbox(adapted)["mlp"]["experts_wi"]
  assert flat["lora_a"].shape == (E, D, 2) and flat["lora_b"].shape == (E, 2, F)
  b = jax.random.normal(jax.random.PRNGKey(1), (E, 2, F))
  merged = lora.merge({"mlp": {"experts_wi": {**flat, "lora_b": b}}}, 0.5)
  expected = 1.0 + 0.5 * np.einsum("edr,erf->edf", np.asarray(flat["lora_a"]), np.asarray(b))
  np.testing.assert_allclose(np.asarray(merged["mlp"]["experts_wi"]["kernel"]), expected,
                             rtol=1e-6)


def test_kv_cache_decoding_equals_the_full_forward_pass():
  """A MoE GPT (shared expert, every other block MoE) decoded one token at a time with its KV
  cache gives the logits of the whole sequence at once."""
  from llm.model.gpt import GPT
  cfg = dataclasses.replace(_cfg(num_shared_experts=1, every=2), num_layers=4, vocab_size=32,
                            positions="rope", norm="rmsnorm")
  model = GPT(cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
  assert "shared_mlp" in params["block_1"] and "router" not in params["block_0"]["mlp"]
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, 32)
  full = model.apply({"params": params}, tokens)
  cache = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 10), jnp.int32), decode=True)["cache"]
  logits, mutated = model.apply({"params": params, "cache": cache}, tokens[:, :6], decode=True,
                                mutable=["cache"])
  steps = [logits]
  for i in range(6, 10):
    logits, mutated = model.apply({"params": params, "cache": mutated["cache"]},
                                  tokens[:, i:i + 1], jnp.full((2, 1), i), decode=True,
                                  mutable=["cache"])
    steps.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=1e-5)


MOE_RUN = {"model.moe.num_experts": 4, "model.moe.experts_per_token": 2,
           "model.moe.router": "sigmoid", "model.moe.bias_update_rate": 0.01,
           "model.moe.num_shared_experts": 1, "train.min_lr": 3e-3, "train.grad_accum": 2}


def test_a_moe_run_logs_its_router_and_resumes_bit_for_bit(tmp_path):
  """Six steps straight, and three then three more resumed: the same losses and router biases,
  bit for bit; the train lines carry the router's metrics."""
  from llm.runs import loading
  from llm.runs.trainer import train
  straight = tiny_config(tmp_path, **MOE_RUN)
  train(straight, str(tmp_path / "straight"))
  first = tiny_config(tmp_path, **{**MOE_RUN, "train.steps": 3})
  train(first, str(tmp_path / "resumed"))
  train(straight, str(tmp_path / "resumed"))
  losses = lambda run: [(m["step"], m["split"], m["loss"]) for m in read_metrics(run)]
  assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
  line = read_metrics(tmp_path / "straight")[-2]
  assert line["split"] == "train" and 0.9 < line["balance_loss"] < 2
  assert len(line["expert_load"]) == 2 and len(line["expert_load"][0]) == 4
  assert abs(sum(line["expert_load"][0]) - 1) < 1e-3 and line["dropped_fraction"] == 0
  biases = [np.asarray(loading.load(str(tmp_path / run)).params["block_1"]["mlp"]["router"][
      "bias"]) for run in ("straight", "resumed")]
  assert np.any(biases[0] != 0)  # it moved
  np.testing.assert_array_equal(biases[0], biases[1])


@pytest.mark.parametrize("key,value,expected", [
    ("model.moe.experts_per_token", 5, "model.moe.experts_per_token=5 is not allowed"),
    ("mesh.expert", 3, "mesh.expert=3 is not allowed; the experts are split over it"),
    ("model.moe.router", "hash", "model.moe.router='hash' is not allowed"),
    ("model.scan_layers", True, "model.scan_layers=True is not allowed; scanned blocks"),
])
def test_a_bad_moe_config_is_one_line_naming_the_key(tmp_path, key, value, expected):
  from llm import config
  from llm.errors import UserError
  cfg = tiny_config(tmp_path, **{"model.moe.num_experts": 4, "model.moe.every": 2,
                                 key: value})
  with pytest.raises(UserError, match=expected.replace("(", r"\(")):
    config.validate(cfg)


@pytest.fixture(scope="module")
def moe_base_run(tmp_path_factory, records):
  """A tiny random MoE GPT (4 experts, top 2, a shared expert) with a tokenizer of the
  preference records' text, as a run directory."""
  import json
  import flax.linen as nn
  from llm import model as model_lib
  from llm.runs import rundir
  from llm.text import sentencepiece
  tmp = tmp_path_factory.mktemp("moe_base")
  with open(records) as f:
    texts = [" ".join(r.values()) for r in json.load(f)]
  tokenizer = sentencepiece.SentencePieceTokenizer.train(texts, 512, str(tmp / "tokenizer"))
  cfg = tiny_config(tmp, **{"model.max_len": 128, **{k: v for k, v in MOE_RUN.items()
                                                      if k.startswith("model.")}})
  model = model_lib.build(cfg.model, tokenizer.vocab_size)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 1), np.int32))["params"])
  rundir.write(str(tmp / "run"), cfg, tokenizer, params)
  return str(tmp / "run")


def test_dpo_with_adapters_on_the_experts_and_grpo_train_a_moe_model(tmp_path, moe_base_run,
                                                                      records):
  """DPO with LoRA on attention and on each expert (GPT's plain MLP: experts with biases)
  starts at ln 2 (the policy is its reference) and logs the router; GRPO samples with the KV
  cache through the experts and updates them."""
  from conftest import preference_config
  from llm.runs import loading
  from llm.runs.trainer import train
  dpo = preference_config(tmp_path, moe_base_run, records, "dpo", **{
      "lora.rank": 4, "lora.targets": r"(attn/(query|value)|mlp/experts_wi)/kernel",
      "train.steps": 4})
  train(dpo, str(tmp_path / "dpo"))
  trained = [m for m in read_metrics(tmp_path / "dpo") if m["split"] == "train"]
  assert trained[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
  assert "expert_load" in trained[-1]
  base, tuned = (loading.load(path).params["block_0"]["mlp"]  # adapters merged in
                 for path in (moe_base_run, str(tmp_path / "dpo")))
  experts = lambda params, name: np.asarray(params[f"experts_{name}"]["kernel"])
  assert experts(tuned, "wi").shape == (4, 32, 64)
  assert not np.allclose(experts(tuned, "wi"), experts(base, "wi"))  # adapted
  np.testing.assert_array_equal(experts(tuned, "wo"), experts(base, "wo"))  # not targeted

  grpo = preference_config(tmp_path, moe_base_run, records, "grpo", **{
      "task.rewards": "brevity", "task.num_generations": 4, "task.max_new_tokens": 8,
      "train.batch_size": 4, "train.steps": 3, "train.eval_every": 3,
      "data.test_fraction": 0.0})
  train(grpo, str(tmp_path / "grpo"))
  last = [m for m in read_metrics(tmp_path / "grpo") if m["split"] == "train"][-1]
  assert np.isfinite(last["loss"]) and "reward" in last and len(last["expert_load"]) == 2
