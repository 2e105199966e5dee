"""Preference tuning on pairs of answers to one prompt (chosen over rejected): a reward model
(task.kind=reward, a scalar head trained with the Bradley-Terry loss) or the policy itself tuned
against its starting point (task.kind=dpo, direct preference optimisation).

Records are TRL's (prompt, chosen, rejected: strings or message lists rendered by the chat
template) or Alpaca-style (instruction and optional input through the Alpaca template, and the
two answers data.chosen_field and data.rejected_field): see prompts.py.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm import files
from llm import model as model_lib
from llm.data import packing, sources
from llm.errors import UserError
from llm.evals import splits
from llm.tasks.base import Context, EvalOptions, RecordTask, register
from llm.text import prompts, tokenizer as tokenizer_lib
from llm.training import objectives


def preference_examples(records, tokenizer, max_length: int, chosen_field: str = "chosen",
                        rejected_field: str = "rejected", skip_bad: bool = False
                        ) -> tuple[dict, dict]:
  """Pairs of answers to one prompt (any format of prompts.preference_sequences), as
  (examples, report).

  Examples, with N pairs and the two answers (chosen, rejected) on axis 1:
    tokens [N, 2, T]    prompt + answer + end-of-text (or the template's end of turn), padded
                        with end-of-text
    valid [N, 2, T]     the real tokens
    response [N, 2, T]  1 at the answer's tokens and its end: what a log-probability sums
    weights [N]         1 per pair
    lengths [N, 2]      the real tokens of each (what packing moves)
  A sequence longer than `max_length` is cut (its end lost); a record whose prompt alone takes
  `max_length` tokens is dropped. The report counts both: {"kept", "cut", "dropped"}, and
  "rows", the index of each kept record.
  """
  def encode(record):
    pair = prompts.preference_sequences(record, tokenizer, chosen_field, rejected_field)
    return [(ids[:max_length], answer[:max_length], len(ids) > max_length)
            for ids, answer in pair]

  encoded, rows = prompts.encode_records(records, encode, skip_bad)
  kept = [n for n, pair in enumerate(encoded) if all(any(answer[1:]) for _, answer, _ in pair)]
  if not kept:
    raise UserError(f"data.max_length={max_length}: every prompt fills it; no preference pair "
                    "is left")
  pairs = [encoded[n] for n in kept]
  length = max(len(ids) for pair in pairs for ids, _, _ in pair)
  tokens, valid = (x.reshape(len(pairs), 2, length) for x in tokenizer_lib.pad(
      [ids for pair in pairs for ids, _, _ in pair], length, tokenizer.eot_id))
  response = np.zeros((len(pairs), 2, length), np.float32)
  for n, pair in enumerate(pairs):
    for a, (ids, answer, _) in enumerate(pair):
      response[n, a, :len(ids)] = answer
  examples = {"tokens": tokens, "valid": valid, "response": response,
              "weights": np.ones(len(pairs), np.float32), "lengths": valid.sum(-1)}
  cut = sum(any(was_cut for _, _, was_cut in pair) for pair in pairs)
  return examples, {"kept": len(pairs), "cut": cut, "dropped": len(records) - len(pairs),
                    "rows": rows[np.asarray(kept)]}


def reference_logps(cfg, model, examples, start, path: str, batch_size: int):
  """log π_ref of both answers of every pair, [N, 2]: the starting model's, computed once
  (with LoRA, the base without its adapters, which start at zero; `start.params`) and kept
  at `path`."""
  n, average = len(examples["weights"]), cfg.task.dpo_average
  if path and os.path.isfile(path):
    with np.load(path) as saved:
      if saved["reference"].shape == (n, 2) and bool(saved["average"]) == average:
        return saved["reference"]
  if start is None:
    raise UserError("DPO needs its reference model's log-probabilities: train with "
                    "init_from set, or keep the run directory's task data")
  params = start.params(model)
  logps = jax.jit(lambda p, b: sequence_logps(model, p, b, average))
  reference = []
  for start in range(0, n, batch_size):  # every chunk of one shape: one compile
    rows = np.arange(start, start + batch_size) % n
    chunk = {k: examples[k][rows] for k in ("tokens", "response", "weights")}
    reference.append(np.asarray(logps(params, chunk))[:min(batch_size, n - start)])
  reference = np.concatenate(reference)
  if path and jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with files.written(path) as tmp, tmp.open("wb") as f:
      np.savez(f, reference=reference, average=average)
  return reference


class PreferencePairs(RecordTask):
  """What reward models and DPO share: the records, their prompts, the pairs."""
  sequences = 2

  packs = True

  def answers(self) -> tuple[str, str]:
    return self.cfg.data.chosen_field, self.cfg.data.rejected_field

  def fields(self):
    return lambda columns: prompts.record_fields(columns, self.answers())

  def tokenizer_texts(self, docs):
    return sources.first_chars((prompts.record_text(r, self.answers()) for r in docs),
                               self.cfg.tokenizer.train_chars)

  def prompt(self, record: dict, tokenizer) -> str:
    return prompts.prompt_text(record, tokenizer)

  def pack(self, examples: dict, pad_id: int, length: int) -> dict:
    return packing.pack_pairs(examples, examples["lengths"], length)

  def examples(self, docs, model, context: Context):
    d = self.cfg.data
    examples, report = preference_examples([dict(r) for r in docs], context.tokenizer,
                                           d.max_length, d.chosen_field, d.rejected_field,
                                           d.skip_bad_rows)
    what = (f"preference pairs; {report['cut']} cut to data.max_length={d.max_length}, "
            f"{report['dropped']} dropped as their prompt alone fills it")
    return examples, report["rows"], what


@register
class RewardModel(PreferencePairs):
  kind = "reward"
  produces = "reward"
  families = ("gpt", "bert")

  def build_model(self, vocab_size: int):
    return model_lib.build(self.cfg.model, vocab_size, num_classes=1)

  def objective(self, model):
    return reward(model)


@register
class DirectPreference(PreferencePairs):
  kind = "dpo"
  keys = {
      "beta": (0.1, "how far the policy may move from the reference (the rewards' scale)"),
      "dpo_average": (False, "average the answer's token log-probabilities instead of summing"),
  }

  def check(self) -> None:
    super().check()
    if not self.cfg.task.beta > 0:
      raise UserError(f"config: task.beta={self.cfg.task.beta!r} is not allowed; use a positive "
                      "value (0.1 is usual)")

  def objective(self, model):
    return dpo(model, self.cfg.task.beta, self.cfg.task.dpo_average)

  def examples(self, docs, model, context: Context):
    examples, rows, what = super().examples(docs, model, context)
    examples["reference"] = reference_logps(self.cfg, model, examples, context.start,
                                            context.task_data, self.micro_batch())
    return examples, rows, what

  def evaluate(self, run, context: Context, options: EvalOptions) -> dict:
    """The splits' metrics, then greedy responses to the test split beside those of the
    reference model it started from."""
    results, data, docs = self.evaluate_splits(run, context, options)
    reference = dataclasses.replace(run, params=context.start.params(run.model))
    results["test_responses"] = splits.write_test_responses(run, data, docs, options,
                                                            reference, context.open_run)
    return results


# ---------------------------------------------------------------------------------------------
# The objective


def _pairs_apply(fn, batch, *arrays):
  """fn on the [2B, ...] rows of [B, 2, ...] arrays; the result back as [B, 2, ...]."""
  B = batch["weights"].shape[0]
  out = fn(*(a.reshape(2 * B, *a.shape[2:]) for a in arrays))
  return out.reshape(B, 2, *out.shape[1:])


def sequence_logps(model, params, batch, average: bool, dropout_rng=None, train=False):
  """log π(answer | prompt) of both answers of each pair, [B, 2] ([R, P, 2] for pairs packed
  into rows, data.packing): the answer tokens' (and their end's) log-probabilities summed, or
  averaged with `average`."""
  kwargs = dict(deterministic=not train, rngs={"dropout": dropout_rng} if train else {})
  if "documents" in batch:
    return _packed_logps(model, params, batch, average, kwargs)

  def logps(tokens_MxT, response_MxT):
    logits_MxLxV = model.apply({"params": params}, tokens_MxT[:, :-1], **kwargs)
    token_logps_MxL = -optax.softmax_cross_entropy_with_integer_labels(logits_MxLxV,
                                                                       tokens_MxT[:, 1:])
    mask_MxL = response_MxT[:, 1:]  # the token at t + 1 is predicted at t
    total_M = jnp.sum(token_logps_MxL * mask_MxL, axis=-1)
    return total_M / jnp.maximum(jnp.sum(mask_MxL, axis=-1), 1.0) if average else total_M

  return _pairs_apply(logps, batch, batch["tokens"], batch["response"])


def _packed_logps(model, params, batch, average, kwargs):
  """sequence_logps of rows that hold whole pairs end to end (packing.pack_pairs): each
  token's log-probability added to its sequence's slot."""
  R, P = batch["weights"].shape
  logits_RxLxV = model.apply({"params": params}, batch["tokens"][:, :-1],
                             batch["positions"][:, :-1], None,
                             documents_BxL=batch["documents"][:, :-1], **kwargs)
  token_logps_RxL = -optax.softmax_cross_entropy_with_integer_labels(logits_RxLxV,
                                                                     batch["tokens"][:, 1:])
  mask_RxL = batch["response"][:, 1:]  # a sequence's first token is never an answer's
  slots_RxLxS = jax.nn.one_hot(batch["sequence"][:, 1:], 2 * P, dtype=jnp.float32)
  total_RxS = jnp.einsum("rl,rls->rs", token_logps_RxL * mask_RxL, slots_RxLxS)
  if average:
    total_RxS = total_RxS / jnp.maximum(jnp.einsum("rl,rls->rs", mask_RxL, slots_RxLxS), 1.0)
  return total_RxS.reshape(R, P, 2)


def _flat_pairs(batch, rewards):
  """(rewards [pairs, 2], weights [pairs]) of a batch, packed into rows or not."""
  return rewards.reshape(-1, 2), batch["weights"].reshape(-1)


def dpo(model, beta: float, average: bool) -> objectives.Objective:
  """Direct preference optimisation (Rafailov et al. 2023): -log σ(β · ((log π(chosen) -
  log π_ref(chosen)) - (log π(rejected) - log π_ref(rejected)))), the reference's
  log-probabilities given with the batch (`reference` [B, 2], computed once from the starting
  model). A pair's rewards are the β-scaled log-ratios."""

  def loss(params, batch, dropout_rng, train):
    logps = sequence_logps(model, params, batch, average, dropout_rng, train)
    rewards_Bx2, w_B = _flat_pairs(batch, beta * (logps - batch["reference"]))
    return _pair_sums(rewards_Bx2[:, 0] - rewards_Bx2[:, 1], w_B, rewards_Bx2)

  return objectives.Objective(loss, _summarize_pairs("reward_accuracy"))


def reward(model) -> objectives.Objective:
  """A reward model's pairwise (Bradley-Terry) loss: -log σ(r(chosen) - r(rejected)), r the
  scalar head on each whole sequence."""

  def loss(params, batch, dropout_rng, train):
    kwargs = dict(deterministic=not train, rngs={"dropout": dropout_rng} if train else {})
    if "documents" in batch:  # pairs packed into rows: the score at each sequence's end
      R, P = batch["weights"].shape
      rewards = model.apply({"params": params}, batch["tokens"], None, documents_BxL=batch[
          "documents"], positions_BxL=batch["positions"], ends_BxS=batch["ends"].reshape(R, -1),
                            **kwargs)[..., 0]
    else:
      def score(tokens_MxT, valid_MxT):
        return model.apply({"params": params}, tokens_MxT, valid_MxT, **kwargs)[:, 0]
      rewards = _pairs_apply(score, batch, batch["tokens"], batch["valid"])
    rewards_Bx2, w_B = _flat_pairs(batch, rewards)
    return _pair_sums(rewards_Bx2[:, 0] - rewards_Bx2[:, 1], w_B, rewards_Bx2)

  return objectives.Objective(loss, _summarize_pairs("accuracy"))


def _pair_sums(margin_B, weights_B, rewards_Bx2) -> dict:
  w = weights_B
  return {"loss": jnp.sum(jax.nn.softplus(-margin_B) * w),  # -log σ(margin)
          "weight": jnp.sum(w), "correct": jnp.sum((margin_B > 0) * w),
          "margin": jnp.sum(margin_B * w), "chosen": jnp.sum(rewards_Bx2[:, 0] * w),
          "rejected": jnp.sum(rewards_Bx2[:, 1] * w)}


def _summarize_pairs(accuracy_name: str):
  def summarize(sums):
    mean = lambda key: float(sums[key]) / max(float(sums["weight"]), 1.0)
    return {"loss": mean("loss"), accuracy_name: mean("correct"), "margin": mean("margin"),
            "chosen_reward": mean("chosen"), "rejected_reward": mean("rejected"),
            "pairs": int(np.nan_to_num(sums["weight"]))}
  return summarize
