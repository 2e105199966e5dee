"""A reward model opened for scoring answers, and best-of-n sampling with it.

    scorer = Scorer(runs.load("runs/reward"))
    rewards = scorer.score([alpaca_prompt("Fix the spelling", "freind")], ["friend"])
    best = best_of(Generator(runs.load("runs/instruct")), scorer, prompts, n=8, temperature=0.8)

A prompt and its answer are tokenized as the reward model was trained on them
(prompts.scored_sequence: answer and end-of-text, or a chat template's end of turn).
"""

import dataclasses

import jax
import numpy as np

from llm.errors import UserError
from llm.text import prompts as prompts_lib, tokenizer as tokenizer_lib
from llm.training import sharding


class Scorer:
  """An opened reward model run (runs.load) that gives (prompt, answer) pairs a reward."""

  def __init__(self, run):
    self.run = run
    if run.task.produces != "reward":
      raise UserError(f"{run.workdir} is a {run.cfg.task.kind} run, not a reward model "
                      f"(task.kind={run.task.kinds_producing('reward')})")
    self.tokenizer, self.max_len = run.tokenizer, run.model.backbone.cfg.max_len
    self._score = jax.jit(lambda params, tokens, valid: run.model.apply(
        {"params": params}, tokens, valid)[:, 0])

  def score(self, prompts: list[str], answers: list[str], batch_size: int = 16) -> np.ndarray:
    """The reward of each answer to its prompt."""
    tok = self.tokenizer
    rows = [prompts_lib.scored_sequence(tok, p, a)[:self.max_len]
            for p, a in zip(prompts, answers)]
    if not rows:
      return np.zeros(0, np.float32)
    # Batches of one shape for all calls with rows of similar length: one compilation (the
    # length rounded up to a power of two, the last batch filled with copies of a row).
    length = min(self.max_len, 1 << (max(map(len, rows)) - 1).bit_length())
    padded = rows + rows[:1] * (-len(rows) % batch_size)
    rewards = []
    for start in range(0, len(padded), batch_size):
      tokens, valid = tokenizer_lib.pad(padded[start:start + batch_size], length, tok.eot_id)
      with sharding.activate(self.run.mesh, self.run.mesh_cfg):
        rewards.append(np.asarray(self._score(self.run.params, tokens, valid)))
    return np.concatenate(rewards)[:len(rows)]


@dataclasses.dataclass
class Best:
  text: str  # the answer the reward model scored highest
  reward: float
  rewards: list[float]  # of all n samples, in the order they were drawn
  samples: list[str]


def best_of(generator, scorer: Scorer, prompts: list[str], n: int, **sampling) -> list[Best]:
  """For each prompt, n samples from the generator; the one with the highest reward wins."""
  if n < 1:
    raise UserError(f"--best_of={n}: use 1 or more samples")
  best = []
  for prompt, samples in zip(prompts, generator.generate(prompts, num_samples=n, **sampling)):
    rewards = scorer.score([prompt] * n, samples)
    i = int(np.argmax(rewards))
    best.append(Best(samples[i], float(rewards[i]), [float(r) for r in rewards], samples))
  return best
