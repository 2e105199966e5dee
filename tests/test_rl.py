"""Online RL (task.kind=grpo, rloo): the loss and advantages by hand, completion masks, rewards
plugging in, a reward that rises, and a bit-exact resume."""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import preference_config, read_metrics, tiny_config
from llm import tasks
from llm import model as model_lib
from llm.errors import UserError
from llm.runs import loading, startup
from llm.runs.trainer import train, Trainer
from llm.tasks import rl

pytestmark = pytest.mark.xdist_group("preference")  # shares the base run's fixtures


def rl_config(tmp_path, base, records, kind="grpo", **overrides):
  """Policy optimisation of the tiny base model on the preference records' instructions."""
  return preference_config(tmp_path, base, records, kind, **{
      "task.rewards": "test_rl:vowels", "task.num_generations": 4, "task.max_new_tokens": 12,
      "task.kl_coef": 0.0, "train.batch_size": 4, "train.lr": 1e-2, "train.min_lr": 1e-2,
      "train.steps": 8, "train.eval_every": 8, "train.eval_at_start": True,
      "train.checkpoint_every": 4,
      "data.test_fraction": 0.0, **overrides})


def _tiny_model(seed: int):
  """(a 2-layer GPT over 40 tokens, its random parameters, a numpy generator)."""
  import flax.linen as nn
  model = model_lib.build(tiny_config(pathlib.Path("unused")).model, 40)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), np.zeros((1, 1), np.int32))[
      "params"])
  return model, params, np.random.default_rng(seed)


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("normalize", list(rl.NORMALIZATIONS))
@pytest.mark.parametrize("clipping", [False, True])
def test_policy_gradient_loss_equals_numpy(normalize, clipping):
  model, params, rng = _tiny_model(0)
  M, T, P = 6, 10, 4
  tokens = rng.integers(0, 40, (M, T)).astype(np.int32)
  valid = np.ones((M, T), bool)
  valid[0, :2] = False  # a left-padded prompt
  positions = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
  mask = np.zeros((M, T), np.float32)
  mask[:, P:] = 1.0
  mask[1, P + 3:] = 0.0  # stopped early
  logits = np.asarray(model.apply({"params": params}, tokens[:, :-1], positions[:, :-1],
                                  valid[:, :-1]), np.float64)
  logp = np.take_along_axis(_np_log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
  old = logp + (rng.normal(0, 0.5, logp.shape) if clipping else 0.0)
  ref = logp + rng.normal(0, 0.3, logp.shape)
  adv = rng.normal(0, 1, M)
  batch = {"tokens": tokens, "positions": positions, "valid": valid, "mask": mask,
           "old_logps": old.astype(np.float32), "ref_logps": ref.astype(np.float32),
           "advantages": adv.astype(np.float32), "rewards": adv.astype(np.float32),
           "no_signal": np.zeros(M, np.float32), "weights": np.ones(M, np.float32)}
  objective = rl.policy_gradient(model, 0.2, 0.28, 0.05, normalize, T - P)
  sums = objective.loss(params, batch, None, False)
  got = float(objective.total(sums, objective.counts(batch)))

  m = mask[:, 1:]
  ratio = np.exp(logp - old)
  surrogate = np.minimum(ratio * adv[:, None], np.clip(ratio, 0.8, 1.28) * adv[:, None])
  kl = np.exp(ref - logp) - (ref - logp) - 1
  per_token = (-surrogate + 0.05 * ratio * kl) * m  # the KL weighed by ρ (task.kl_ratio)
  expected = {"token": per_token.sum() / m.sum(),
              "sequence": np.mean(per_token.sum(1) / m.sum(1)),
              "constant": per_token.sum() / (M * (T - P))}[normalize]
  assert got == pytest.approx(expected, rel=1e-4)
  clipped = float(sums["clipped"]) / float(sums["tokens"])
  assert (clipped > 0) == clipping


def test_one_update_per_rollout_is_reinforce_with_the_group_baseline():
  model, params, rng = _tiny_model(1)
  M, T, P = 8, 9, 3
  tokens = rng.integers(0, 40, (M, T)).astype(np.int32)
  valid = np.ones((M, T), bool)
  positions = np.tile(np.arange(T, dtype=np.int32), (M, 1))
  mask = np.zeros((M, T), np.float32)
  mask[:, P:] = 1.0
  rewards = rng.normal(0, 1, M)
  adv = rl.advantages(rewards, 4, "grpo", scale=False)
  logps = rl.token_logps(model, params, tokens, positions, valid)
  batch = {"tokens": tokens, "positions": positions, "valid": valid, "mask": mask,
           "old_logps": np.asarray(logps), "ref_logps": np.asarray(logps),
           "advantages": adv.astype(np.float32), "rewards": rewards.astype(np.float32),
           "no_signal": np.zeros(M, np.float32), "weights": np.ones(M, np.float32)}
  objective = rl.policy_gradient(model, 0.2, 0.2, 0.0, "token", T - P)
  ppo = jax.grad(lambda p: objective.total(objective.loss(p, batch, None, False),
                                           objective.counts(batch)))(params)

  def reinforce(p):  # -Σ_i A_i Σ_t log π(o_it) / Σ|o_i|, A_i = r_i - mean of its group
    lp = rl.token_logps(model, p, tokens, positions, valid)
    return -jnp.sum(adv[:, None] * lp * mask[:, 1:]) / mask[:, 1:].sum()

  for a, b in zip(jax.tree.leaves(ppo), jax.tree.leaves(jax.grad(reinforce)(params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_advantages_against_the_group():
  r = np.array([1.0, 0.0, 0.0, 3.0, 2.0, 2.0, 2.0, 2.0])
  grpo = rl.advantages(r, 4, "grpo", scale=True)
  np.testing.assert_allclose(grpo[:4], (r[:4] - 1.0) / (np.std(r[:4], ddof=1) + 1e-4))
  assert np.all(grpo[4:] == 0)  # a group with one reward gives no signal
  np.testing.assert_allclose(rl.advantages(r, 4, "grpo", scale=False)[:4], r[:4] - 1.0)
  rloo = rl.advantages(r, 4, "rloo", scale=False)
  assert rloo[0] == pytest.approx(1.0 - (0 + 0 + 3) / 3)
  assert rloo[3] == pytest.approx(3.0 - 1 / 3)


def test_completion_masks_stop_after_the_end_of_text():
  eot = 2
  new = np.array([[5, 6, 2, 7, 8], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
  np.testing.assert_array_equal(np.asarray(rl.completion_mask(new, eot)),
                                [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])


@pytest.mark.slow
def test_a_reward_that_fails_is_named(tmp_path, base_run, records):
  rewards = rl.Rewards(rl_config(tmp_path, base_run, records,
                                 **{"task.rewards": "brevity,test_rl:wrong_count*0.5"}), None)
  with pytest.raises(UserError, match="reward 'test_rl:wrong_count' must return one finite "
                                      "number per completion \\(2\\); it returned 1 values"):
    rewards(["p", "q"], ["a", "b"], [{}, {}])
  with pytest.raises(UserError, match="no reward 'nope'"):
    rl.Rewards(rl_config(tmp_path, base_run, records, **{"task.rewards": "nope"}), None)


def wrong_count(prompts, completions, records):
  return [0.0]


def vowels(prompts, completions, records):
  """The share of the completion's letters that are vowels: a toy reward a random model can
  learn in a few steps."""
  letters = lambda text: [c for c in text.lower() if c.isalpha()]
  return [sum(c in "aeiou" for c in letters(t)) / max(len(letters(t)), 1) for t in completions]


@pytest.fixture(scope="module")
def rl_runs(tmp_path_factory, base_run, records):
  tmp = tmp_path_factory.mktemp("rl")
  straight, resumed = str(tmp / "straight"), str(tmp / "resumed")
  train(rl_config(tmp, base_run, records), straight)
  train(rl_config(tmp, base_run, records, **{"train.steps": 4}), resumed)
  train(rl_config(tmp, base_run, records), resumed)
  return straight, resumed


@pytest.mark.slow
def test_grpo_raises_the_reward_and_resumes_bit_exactly(rl_runs):
  straight, resumed = rl_runs
  lines = [m for m in read_metrics(straight) if m["split"] == "train"]
  rewards = [m["reward"] for m in lines]
  assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.05, rewards
  for key in ("kl", "clip_fraction", "entropy", "no_signal_groups", "reward_vowels",
              "sampling_seconds"):
    assert key in lines[-1] and math.isfinite(lines[-1][key])
  evals = [m for m in read_metrics(straight) if m["split"] == "eval"]
  assert [m["step"] for m in evals] == [0, 8]  # the starting model's too (train.eval_at_start)
  assert all(0 <= m["best_of_n_reward"] <= 1 for m in evals)
  assert [m["step"] for m in read_metrics(resumed) if m["split"] == "eval"] == [0, 4, 8]
  run = loading.load(straight)  # llm.evaluate: the same greedy answers, scored the same
  result = run.task.evaluate(run, startup.run_context(run), tasks.EvalOptions())
  assert result["eval"]["reward"] == pytest.approx(evals[-1]["reward"], abs=1e-6)
  same = lambda run: [(m["step"], m["loss"], m["reward"]) for m in read_metrics(run)
                      if m["split"] == "train"]
  assert same(resumed) == same(straight)


@pytest.mark.slow
def test_the_lora_reference_is_the_base_model(tmp_path, base_run, records):
  trainer = Trainer(rl_config(tmp_path, base_run, records, **{"lora.rank": 4}),
                    str(tmp_path / "lora"))
  state, frozen = trainer.init_state()
  rollouts = trainer.data.rollout
  base = trainer.context.start.params(trainer.model)
  tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % 50
  valid = np.ones(tokens.shape, bool)
  positions = np.tile(np.arange(12, dtype=np.int32), (2, 1))
  lora_off = rollouts._reference(state["params"], frozen, rollouts.reference)
  logps = lambda params: rl.token_logps(trainer.model, params, tokens, positions, valid)
  np.testing.assert_allclose(logps(lora_off), logps(base), rtol=1e-6)
  assert rollouts.reference is None  # no second copy


def _np_sampling_logps(logits_MxLxV, tokens_MxL, temperature, top_p):
  """log-probabilities of `tokens` under top-p sampling at `temperature`, by numpy: the nucleus
  is the smallest set of most likely tokens whose probability reaches top_p."""
  logp = _np_log_softmax(logits_MxLxV / temperature)
  order = np.argsort(-logp, axis=-1)
  sorted_p = np.exp(np.take_along_axis(logp, order, -1))
  before = np.cumsum(sorted_p, -1) - sorted_p  # the mass of the tokens more likely than each
  kept = np.zeros(logp.shape, bool)
  np.put_along_axis(kept, order, before < top_p, -1)
  mass = np.where(kept, np.exp(logp), 0.0).sum(-1)
  return np.take_along_axis(logp, tokens_MxL[..., None], -1)[..., 0] - np.log(mass)


def test_log_probabilities_and_kl_are_the_sampling_distributions_against_numpy():
  model, params, rng = _tiny_model(2)
  _, reference, _ = _tiny_model(3)
  M, T = 4, 12
  tokens = rng.integers(0, 40, (M, T)).astype(np.int32)
  valid, positions = np.ones((M, T), bool), np.tile(np.arange(T, dtype=np.int32), (M, 1))
  logits = lambda p: np.asarray(model.apply({"params": p}, tokens[:, :-1], positions[:, :-1],
                                            valid[:, :-1]), np.float64)
  for temperature, top_p in [(0.7, 1.0), (0.7, 0.9), (1.3, 0.5)]:
    got = rl.token_logps(model, params, tokens, positions, valid, temperature, top_p)
    np.testing.assert_allclose(got, _np_sampling_logps(logits(params), tokens[:, 1:],
                                                       temperature, top_p), atol=2e-5)
  # The KL penalty at temperature 0.7: k3 between the tempered policy and tempered reference.
  mask = np.ones((M, T), np.float32)
  batch = {"tokens": tokens, "positions": positions, "valid": valid, "mask": mask,
           "ref_logps": np.asarray(rl.token_logps(model, reference, tokens, positions, valid,
                                                  0.7), np.float32),
           "advantages": np.zeros(M, np.float32), "rewards": np.zeros(M, np.float32),
           "no_signal": np.zeros(M, np.float32), "weights": np.ones(M, np.float32)}
  batch["old_logps"] = np.asarray(rl.token_logps(model, params, tokens, positions, valid, 0.7))
  objective = rl.policy_gradient(model, 0.2, 0.2, 1.0, "token", T, temperature=0.7)
  sums = objective.loss(params, batch, None, False)
  pi = _np_sampling_logps(logits(params), tokens[:, 1:], 0.7, 1.0)
  ref = _np_sampling_logps(logits(reference), tokens[:, 1:], 0.7, 1.0)
  kl = np.mean(np.exp(ref - pi) - (ref - pi) - 1)
  assert float(objective.summarize(sums)["kl"]) == pytest.approx(kl, rel=1e-4)


@pytest.mark.slow
def test_the_ratio_is_one_on_the_first_pass_at_temperature_and_top_p(
    tmp_path, base_run, records):
  trainer = Trainer(rl_config(tmp_path, base_run, records, **{
      "task.temperature": 0.7, "task.top_p": 0.9}), str(tmp_path / "run"))
  state, frozen = trainer.init_state()
  batch, _ = trainer.data.rollout(state["params"], frozen, trainer.place(next(trainer.batches)),
                                  1)
  batch = jax.tree.map(lambda x: np.asarray(x)[0], batch)  # the one micro-batch
  logps = rl.token_logps(trainer.model, state["params"], batch["tokens"], batch["positions"],
                         batch["valid"], 0.7, 0.9)
  mask = batch["mask"][:, 1:] > 0
  ratio = np.exp(np.asarray(logps) - batch["old_logps"])[mask]
  assert mask.sum() > 20 and np.abs(ratio - 1).max() < 1e-5
  # and π_old is the distribution that sampled: every sampled token lies in its nucleus, so
  # its probability under the truncated distribution is at least its tempered probability.
  untruncated = rl.token_logps(trainer.model, state["params"], batch["tokens"],
                               batch["positions"], batch["valid"], 0.7)
  assert np.all(batch["old_logps"][mask] >= np.asarray(untruncated)[mask] - 1e-6)
