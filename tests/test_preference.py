"""Preference tuning: a reward model, DPO against a frozen reference, best-of-n sampling."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, config_file, preference_config, read_metrics
from llm.evals import splits
from llm.inference.scoring import Scorer
from llm.runs import loading, rundir
from llm.runs.trainer import train, Trainer
from llm.tasks import preference
from llm.text.prompts import alpaca_prompt
from llm.training import preemption

# Its tests share module fixtures: one pytest-xdist worker runs them all.
pytestmark = [pytest.mark.xdist_group("preference"), pytest.mark.slow]


def _np_logps(logits_MxLxV, tokens_MxT, response_MxT, average):
  """log π(answer | prompt) by hand: the answer tokens' log-softmax, summed or averaged."""
  logits = np.asarray(logits_MxLxV, np.float64)
  log_softmax = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  picked = np.take_along_axis(log_softmax, tokens_MxT[:, 1:, None], -1)[..., 0]
  mask = response_MxT[:, 1:]
  total = (picked * mask).sum(-1)
  return total / mask.sum(-1) if average else total


def test_dpo_starts_at_ln2_and_equals_the_formula(tmp_path, base_run, records):
  cfg = preference_config(tmp_path, base_run, records, "dpo")
  trainer = Trainer(cfg, str(tmp_path / "dpo"))
  state, frozen = trainer.init_state()
  # Of the 48 records, those whose prompt alone fills 128 tokens are dropped, longer ones cut,
  # and the summary says how many.
  kept, cut, dropped = map(int, re.match(
      r"(\d+) records \(preference pairs; (\d+) cut to data.max_length=128, (\d+) dropped as "
      r"their prompt alone fills it\)", trainer.data.summary).groups())
  assert kept + dropped == 48 and dropped > 0 and cut > 0
  # Step 0: the policy is its reference, so every reward is 0 and the loss is ln 2.
  start = trainer.jit_evaluate()(state["params"], frozen, trainer.data.evals["eval"])
  assert start["loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert abs(start["chosen_reward"]) < 1e-5 and abs(start["margin"]) < 1e-5
  assert start["pairs"] == len(trainer.data.splits["eval"]) == round(kept * 0.25)

  # Against a direct computation from the model's logits, with another reference, for the
  # summed and the averaged log-probabilities.
  model, params = trainer.model, state["params"]
  batch = dict(trainer.data.evals["eval"][0])
  batch["reference"] = np.random.default_rng(0).normal(-50, 5, batch["reference"].shape)
  B, _, T = batch["tokens"].shape
  tokens, response = batch["tokens"].reshape(2 * B, T), batch["response"].reshape(2 * B, T)
  logits = model.apply({"params": params}, tokens[:, :-1])
  w = batch["weights"]
  for average in (False, True):
    logps = _np_logps(logits, tokens, response, average).reshape(B, 2)
    rewards = 0.1 * (logps - batch["reference"])
    margin = rewards[:, 0] - rewards[:, 1]
    sums = jax.device_get(preference.dpo(model, 0.1, average).loss(params, batch, None, False))
    np.testing.assert_allclose(sums["loss"], np.sum(np.log1p(np.exp(-margin)) * w), rtol=1e-4)
    np.testing.assert_allclose(sums["chosen"], np.sum(rewards[:, 0] * w), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sums["correct"], np.sum((margin > 0) * w))
    # Padding changes nothing: other tokens there give the same log-probabilities.
    padded = dict(batch, tokens=np.where(batch["valid"], batch["tokens"], 7))
    assert (padded["tokens"] != batch["tokens"]).any()
    again = jax.device_get(preference.sequence_logps(model, params, padded, average))
    np.testing.assert_allclose(again, logps, rtol=1e-5)
  # Only the answers count: the prompt's tokens are outside the response mask.
  record = _record(records, trainer.data.splits["eval"][0])
  prompt = alpaca_prompt(record["instruction"], record.get("input") or "")
  assert np.argmax(batch["response"][0, 0] > 0) == len(trainer.tokenizer.encode(prompt))


def _record(records, row):
  with open(records) as f:
    return json.load(f)[int(row)]


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory, base_run, records):
  """A DPO run of 6 steps, and the same run stopped after 3 and resumed."""
  tmp = tmp_path_factory.mktemp("dpo")
  straight, resumed = str(tmp / "straight"), str(tmp / "resumed")
  train(preference_config(tmp, base_run, records, "dpo"), straight)
  train(preference_config(tmp, base_run, records, "dpo", **{"train.steps": 3}), resumed)
  os.remove(rundir.path(resumed, rundir.TASK_DATA))  # recomputed on resume: the same numbers
  train(preference_config(tmp, base_run, records, "dpo"), resumed)
  return straight, resumed


def test_dpo_raises_the_reward_margin_and_resumes_bit_exactly(dpo_runs):
  straight, resumed = dpo_runs
  lines = [m for m in read_metrics(straight) if m["split"] == "train"]
  assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: policy = reference
  late = lines[-3:]  # (rewards are beta = 0.1 times the log-ratios; step 1's are all 0)
  assert np.mean([m["margin"] for m in late]) > 0.1
  assert np.mean([m["reward_accuracy"] for m in late]) > 0.7
  assert np.mean([m["loss"] for m in late]) < math.log(2) - 0.05
  assert lines[-1]["chosen_reward"] > lines[-1]["rejected_reward"]
  assert [m["loss"] for m in read_metrics(resumed) if m["split"] == "train"] == [
      m["loss"] for m in lines]
  assert os.path.isfile(rundir.path(resumed, rundir.TASK_DATA))


def test_ctrl_c_in_the_dpo_reference_pass_exits_75_and_the_rerun_trains_the_same(
    tmp_path, dpo_runs, base_run, records):
  config = config_file(tmp_path, {}, [("llm.tasks.preference:sequence_logps", "SIGINT")],
                       make=("preference_config", base_run, records, "dpo"))
  workdir = tmp_path / "run"
  process = subprocess.run([sys.executable, "-m", "llm.train", f"--config={config}",
                            f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
  assert process.returncode == preemption.EXIT_PREEMPTED, process.stderr[-3000:]
  assert process.stderr.count("stopped by SIGINT; nothing is left half-written") == 1
  assert "Traceback" not in process.stderr and "Fatal" not in process.stderr
  assert not workdir.exists()  # the reference pass comes before the run directory
  train(preference_config(tmp_path, base_run, records, "dpo"), str(workdir))
  losses = lambda run: [(m["step"], m["split"], m["loss"]) for m in read_metrics(run)]
  assert losses(workdir) == losses(dpo_runs[0])


def test_lora_dpo_starts_where_full_dpo_does_with_one_copy_of_the_weights(tmp_path, base_run,
                                                                         records):
  cfg = preference_config(tmp_path, base_run, records, "dpo", **{"lora.rank": 4})
  trainer = Trainer(cfg, str(tmp_path / "lora"))
  state, frozen = trainer.init_state()
  assert trainer.num_trainable < trainer.num_params / 5  # adapters train; the base is shared
  start = trainer.jit_evaluate()(state["params"], frozen, trainer.data.evals["eval"])
  assert start["loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert abs(start["margin"]) < 1e-5


def test_dpo_evaluation_writes_policy_and_reference_responses(dpo_runs):
  from llm.runs import startup
  straight = dpo_runs[0]
  run = loading.load(straight)
  context = startup.run_context(run)
  data, docs = run.task.data_for(run.model, context)
  results = splits.evaluate_splits(run, data)
  assert set(results) == {"eval", "test"} and 0 <= results["test"]["reward_accuracy"] <= 1
  out = os.path.join(straight, "test_responses.jsonl")
  reference = dataclasses.replace(run, params=context.start.params(run.model))
  n = len(splits.write_responses(run, data, docs, out, 8, 8, reference))
  rows = [json.loads(line) for line in open(out)]
  assert n == len(rows) == len(data.splits["test"]) > 0
  assert {"instruction", "chosen", "rejected", "response", "reference_response"} <= set(rows[0])


def test_generated_answers_are_judged_by_exact_match_and_a_reward_model(reward_run):
  rows = [{"instruction": "Say hi.", "input": "", "output": "hi", "response": " hi "},
          {"instruction": "Say yes.", "input": "", "output": "yes", "response": "no"}]
  assert splits.judge(rows) == {"response_exact_match": 0.5}
  scorer = Scorer(loading.load(reward_run))
  judged = splits.judge(rows, scorer)
  prompts = [alpaca_prompt("Say hi."), alpaca_prompt("Say yes.")]
  assert judged["judge_response"] == pytest.approx(
      np.mean(scorer.score(prompts, [" hi ", "no"])), abs=1e-6)
  assert judged["judge_output"] == pytest.approx(np.mean(scorer.score(prompts, ["hi", "yes"])),
                                                 abs=1e-6)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, base_run, records):
  tmp = tmp_path_factory.mktemp("reward")
  train(preference_config(tmp, base_run, records, "reward", **{"train.steps": 24}),
        str(tmp / "run"))
  return str(tmp / "run")


def test_reward_model_loss_is_bradley_terry_and_it_learns(reward_run, records):
  from llm.inference.scoring import Scorer
  from llm.runs import startup
  run = loading.load(reward_run)
  task, _ = run.task.data_for(run.model, startup.run_context(run))
  # It ranks the training pairs right (chance: half of them).
  train_pairs = task.batches.take(np.arange(len(task.batches)), None)
  sums = preference.reward(run.model).loss(run.params, train_pairs, None, False)
  assert float(sums["correct"]) / float(sums["weight"]) > 0.7  # 17 of 24 by chance: p < 0.04
  # The loss of a batch, by hand from the two scores of each pair.
  batch = task.evals["eval"][0]
  B, _, T = batch["tokens"].shape
  scores = np.asarray(run.model.apply({"params": run.params}, batch["tokens"].reshape(2 * B, T),
                                      batch["valid"].reshape(2 * B, T)))[:, 0].reshape(B, 2)
  delta = scores[:, 0] - scores[:, 1]
  sums = preference.reward(run.model).loss(run.params, batch, None, False)
  np.testing.assert_allclose(float(sums["loss"]), np.sum(-np.log(1 / (1 + np.exp(-delta)))
                                                         * batch["weights"]), rtol=1e-5)
  # The scorer gives a pair what the objective does.
  record = _record(records, task.splits["eval"][0])
  prompt = alpaca_prompt(record["instruction"], record.get("input") or "")
  got = Scorer(loading.load(reward_run)).score([prompt, prompt],
                                               [record["chosen"], record["rejected"]])
  np.testing.assert_allclose(got, scores[0], rtol=1e-5, atol=1e-5)


def test_best_of_n_returns_the_highest_reward_and_best_of_1_is_plain_sampling(
    tmp_path, base_run, reward_run):
  from llm.inference.sampling import Generator
  from llm.inference.scoring import best_of, Scorer
  gen, scorer = Generator(loading.load(base_run)), Scorer(loading.load(reward_run))
  prompts = [alpaca_prompt("Rewrite the sentence politely.", "Give me the salt.")]
  sampling = dict(max_new_tokens=12, temperature=1.0, seed=3)
  [best] = best_of(gen, scorer, prompts, 4, **sampling)
  one_by_one = [float(scorer.score(prompts, [s])[0]) for s in best.samples]
  np.testing.assert_allclose(best.rewards, one_by_one, rtol=1e-5, atol=1e-5)
  assert best.text == best.samples[int(np.argmax(one_by_one))]
  assert best.samples == gen.generate(prompts, num_samples=4, **sampling)[0]
  [single] = best_of(gen, scorer, prompts, 1, **sampling)
  assert [single.text] == gen.generate(prompts, **sampling)[0]
  # The command line: JSON lines with every reward.
  prompt_file = tmp_path / "prompts.txt"
  prompt_file.write_text("The weather today\n")
  out = subprocess.run(
      [sys.executable, "-m", "llm.generate", f"--workdir={base_run}",
       f"--reward_model={reward_run}", "--best_of=3", f"--prompt_file={prompt_file}",
       "--max_new_tokens=6", "--seed=1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  [line] = [json.loads(x) for x in out.stdout.splitlines()]
  assert len(line["rewards"]) == 3 and line["reward"] == max(line["rewards"])
  scored = subprocess.run(
      [sys.executable, "-m", "llm.score", f"--workdir={reward_run}", "--prompt=The weather today",
       f"--response={line['text']}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert scored.returncode == 0, scored.stderr[-2000:]
  assert float(scored.stdout.split()[0]) == pytest.approx(line["reward"], abs=1e-3)


def test_a_reward_model_scores_the_completions_of_online_rl(tmp_path, reward_run, records):
  from llm.inference import scoring
  from llm.tasks import rl
  cfg = preference_config(tmp_path, reward_run, records, "grpo",
                          **{"task.reward_model": reward_run, "task.reward_model_weight": 2.0,
                             "task.rewards": "brevity"})
  prompts, answers = ["Say thanks.", "Say thanks."], ["Thank you very much!", "No."]
  total, means = rl.Rewards(cfg, loading.load)(prompts, answers, [{}, {}])
  scores = scoring.Scorer(loading.load(reward_run)).score(prompts, answers)
  np.testing.assert_allclose(total, 2.0 * scores + np.array(rl.brevity(prompts, answers, [])),
                             rtol=1e-5)
  assert means["reward_model"] == pytest.approx(float(np.mean(scores)), rel=1e-5)


def test_reward_and_dpo_train_from_trl_conversations_packed(tmp_path, base_run, records):
  """TRL's conversational preference records (prompt, chosen, rejected as message lists),
  rendered by ChatML, packed: DPO starts at ln 2 (the packed reference pass equals the
  policy's) and both train."""
  with open(records) as f:
    rows = json.load(f)
  path = tmp_path / "trl.jsonl"
  with open(path, "w") as f:
    for r in rows:
      short = lambda text: text[:20 + len(text) % 60]  # pairs of many lengths: some pack
      f.write(json.dumps({"prompt": [{"role": "user", "content": short(r["instruction"])}],
                          "chosen": [{"role": "assistant", "content": short(r["chosen"])}],
                          "rejected": [{"role": "assistant", "content": short(r["rejected"])}]})
              + "\n")
  for kind in ("reward", "dpo"):
    cfg = preference_config(tmp_path, base_run, str(path), kind, **{
        "train.steps": 2, "train.eval_every": 2, "data.packing": True, "data.max_length": 128,
        "tokenizer.chat_template": "chatml", "data.skip_bad_rows": True})
    trainer = Trainer(cfg, str(tmp_path / kind))
    padded, packed = map(int, re.search(r"padding (\d+)% padded, (\d+)% packed",
                                        trainer.data.summary).groups())
    assert packed < padded and trainer.data.real_share == pytest.approx(1 - packed / 100,
                                                                        abs=0.006)
    train(cfg, str(tmp_path / kind))
    lines = [m for m in read_metrics(str(tmp_path / kind)) if m["split"] == "train"]
    assert len(lines) == 2 and all(math.isfinite(m["loss"]) for m in lines)
    if kind == "dpo":
      assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
  # The run keeps its template: sampling renders conversations the way it trained.
  assert loading.load(str(tmp_path / "dpo")).tokenizer.chat_template.startswith("{% for message")
