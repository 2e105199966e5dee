"""Losses, one per task. The train loop sees only an Objective: it never knows the task.

An objective's `loss` returns sums over the batch (losses, weights, task counts), so
micro-batches and hosts add up exactly; `summarize` turns summed values into the metrics logged.
`terms` say how the sums make the loss that is minimised: each (sum, batch weight key,
coefficient) adds coefficient x sum / (that key's total over the step's whole batch).
"""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class Objective:
  # (params, batch, dropout_rng, train) -> {"loss": summed loss, "weight": summed weight, ...}
  loss: Callable
  # summed values (host floats) -> metrics for metrics.jsonl
  summarize: Callable
  terms: tuple = (("loss", "weights", 1.0),)

  def total(self, sums: dict, counts: dict):
    """The loss minimised: each term's sum over its count (see `counts`)."""
    return sum(coef * sums[key] / counts[weights] for key, weights, coef in self.terms)

  def counts(self, batch: dict) -> dict:
    """Each term's normaliser: its weights summed over the whole batch (at least 1)."""
    return {weights: jnp.maximum(jnp.sum(batch[weights]), 1.0) for _, weights, _ in self.terms}


def causal_lm(model, logits_chunk: int = 0, z_loss: float = 0.0) -> Objective:
  """Next-token cross-entropy, weighted per target (weight 0: padding or a masked prompt).

  `logits_chunk` > 0: the logits are made and consumed `logits_chunk` positions at a time, and
  made again in the backward pass, so a [B, L, V] float32 array never exists at once (at GPT-2
  small's shape it is 3.3 GB per micro-batch of 16). Same loss and gradients.

  `z_loss` > 0 (train.z_loss, PaLM's 1e-4): the loss minimised also has z_loss x log(Z)^2 per
  target, Z the softmax normaliser, which keeps the logits from drifting; the metrics' "loss"
  and perplexity stay the cross-entropy, "z_loss" is that term.
  """

  def loss(params, batch, dropout_rng, train):
    kwargs = dict(deterministic=not train, rngs={"dropout": dropout_rng} if train else {})
    if "documents" in batch:  # data.document_masks: documents packed in a window kept apart
      kwargs.update(documents_BxL=batch["documents"], positions_BxL=batch["positions"])
    if not logits_chunk:
      logits_BxLxV = model.apply({"params": params}, batch["inputs"], **kwargs)
      sums = _cross_entropy_sums(logits_BxLxV, batch["targets"], batch["weights"], z_loss)
    else:
      x_BxLxD = model.apply({"params": params}, batch["inputs"], method="hidden", **kwargs)
      sums = _chunked_cross_entropy(model, params, x_BxLxD, batch["targets"], batch["weights"],
                                    logits_chunk, z_loss)
    return {**sums, "weight": jnp.sum(batch["weights"])}

  def summarize(sums):
    weight = max(float(sums["weight"]), 1.0)
    mean = float(sums["loss"]) / weight
    z_term = {"z_loss": z_loss * float(sums["z_loss"]) / weight} if z_loss else {}
    return {"loss": mean, "perplexity": math.exp(min(mean, 80.0)),
            "tokens": int(np.nan_to_num(sums["weight"])), **z_term}

  terms = (("loss", "weights", 1.0),) + ((("z_loss", "weights", z_loss),) if z_loss else ())
  return Objective(loss, summarize, terms)


def _cross_entropy_sums(logits_BxLxV, targets_BxL, weights_BxL, z_loss: float) -> dict:
  """{"loss": sum of cross-entropy x weight} (and "z_loss": of log(Z)^2 x weight)."""
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
  sums = {"loss": jnp.sum(ce_BxL * weights_BxL)}
  if z_loss:
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    sums["z_loss"] = jnp.sum(jnp.square(log_z_BxL) * weights_BxL)
  return sums


def _chunked_cross_entropy(model, params, x_BxLxD, targets_BxL, weights_BxL, chunk: int,
                           z_loss: float) -> dict:
  """`_cross_entropy_sums` over the positions, `chunk` positions of logits at a time."""
  B, L, D = x_BxLxD.shape
  pad = -L % chunk  # positions added with weight 0 so that the chunks divide L
  x_BxLxD, targets_BxL, weights_BxL = (
      jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
      for a in (x_BxLxD, targets_BxL, weights_BxL))
  num = (L + pad) // chunk
  to_chunks = lambda a: jnp.moveaxis(a.reshape(B, num, chunk, *a.shape[2:]), 1, 0)

  @jax.checkpoint  # the backward pass makes each chunk's logits again instead of keeping them
  def chunk_sums(x_BxCxD, targets_BxC, weights_BxC):
    logits_BxCxV = model.apply({"params": params}, x_BxCxD, method="logits")
    return _cross_entropy_sums(logits_BxCxV, targets_BxC, weights_BxC, z_loss)

  def add_chunk(totals, xs):
    return jax.tree.map(jnp.add, totals, chunk_sums(*xs)), None

  zeros = {key: jnp.zeros((), jnp.float32) for key in ("loss", "z_loss")[:1 + bool(z_loss)]}
  totals, _ = jax.lax.scan(add_chunk, zeros,
                           (to_chunks(x_BxLxD), to_chunks(targets_BxL), to_chunks(weights_BxL)))
  return totals


def classification(model, labels: list[str]) -> Objective:
  """Cross-entropy over classes; counts a confusion matrix (true x predicted) for the metrics."""
  num_classes = len(labels)

  def loss(params, batch, dropout_rng, train):
    logits_BxC = model.apply({"params": params}, batch["tokens"], batch["valid"],
                             deterministic=not train,
                             rngs={"dropout": dropout_rng} if train else {})
    ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["labels"])
    predicted_B = jnp.argmax(logits_BxC, axis=-1)
    w_B = batch["weights"]
    confusion_CxC = jnp.zeros((num_classes, num_classes)).at[batch["labels"], predicted_B].add(w_B)
    return {"loss": jnp.sum(ce_B * w_B), "weight": jnp.sum(w_B), "confusion": confusion_CxC}

  def summarize(sums):
    confusion = np.asarray(sums["confusion"])
    true_C, predicted_C, hit_C = confusion.sum(1), confusion.sum(0), np.diag(confusion)
    precision = np.divide(hit_C, predicted_C, out=np.zeros(num_classes), where=predicted_C > 0)
    recall = np.divide(hit_C, true_C, out=np.zeros(num_classes), where=true_C > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(num_classes),
                   where=precision + recall > 0)
    return {"loss": float(sums["loss"]) / max(float(sums["weight"]), 1.0),
            "accuracy": float(hit_C.sum() / max(confusion.sum(), 1.0)),
            "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f),
                                 "support": int(n)}
                          for name, p, r, f, n in zip(labels, precision, recall, f1, true_C)},
            "confusion": confusion.astype(int).tolist()}

  return Objective(loss, summarize)


def add_sums(sums: list[dict]) -> dict:
  """Per-batch sums (device arrays) -> their totals on the host."""
  return jax.tree.map(lambda *xs: np.sum([np.asarray(x) for x in xs], axis=0), *sums)


def evaluator(objective: Objective, assemble=lambda params, frozen: params, in_shardings=None):
  """(params, frozen, batches) -> the objective's metrics over all the batches, from one
  compiled step. `assemble(params, frozen)` makes the model's parameters (see params.py)."""
  step = jax.jit(lambda params, frozen, batch: objective.loss(assemble(params, frozen), batch,
                                                              None, False),
                 in_shardings=in_shardings)

  def evaluate(params, frozen, batches):
    return objective.summarize(add_sums([step(params, frozen, batch) for batch in batches]))

  return evaluate


def mlm_nsp(model, mlm_weight: float = 1.0, nsp_weight: float = 1.0) -> Objective:
  """BERT's pre-training loss: masked-token cross-entropy (mean over the selected tokens) plus
  next-sentence cross-entropy (mean over pairs), each with its weight."""

  def loss(params, batch, dropout_rng, train):
    mlm_BxPxV, nsp_Bx2 = model.apply(
        {"params": params}, batch["tokens"], batch["segments"], batch["valid"],
        batch["mlm_positions"], deterministic=not train,
        rngs={"dropout": dropout_rng} if train else {})
    mlm_w, nsp_w = batch["mlm_weights"], batch["weights"]
    mlm_ce = optax.softmax_cross_entropy_with_integer_labels(mlm_BxPxV, batch["mlm_ids"])
    nsp_ce = optax.softmax_cross_entropy_with_integer_labels(nsp_Bx2, batch["nsp_labels"])
    hit = lambda logits, labels: (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"mlm_loss": jnp.sum(mlm_ce * mlm_w), "mlm_weight": jnp.sum(mlm_w),
            "mlm_correct": jnp.sum(hit(mlm_BxPxV, batch["mlm_ids"]) * mlm_w),
            "nsp_loss": jnp.sum(nsp_ce * nsp_w), "nsp_weight": jnp.sum(nsp_w),
            "nsp_correct": jnp.sum(hit(nsp_Bx2, batch["nsp_labels"]) * nsp_w)}

  def summarize(sums):
    mean = lambda key, weight: float(sums[key]) / max(float(sums[weight]), 1.0)
    mlm, nsp = mean("mlm_loss", "mlm_weight"), mean("nsp_loss", "nsp_weight")
    return {"loss": mlm_weight * mlm + nsp_weight * nsp, "mlm_loss": mlm,
            "mlm_accuracy": mean("mlm_correct", "mlm_weight"),
            "perplexity": math.exp(min(mlm, 80.0)),  # of the masked tokens
            "nsp_loss": nsp, "nsp_accuracy": mean("nsp_correct", "nsp_weight")}

  return Objective(loss, summarize, terms=(("mlm_loss", "mlm_weights", mlm_weight),
                                           ("nsp_loss", "weights", nsp_weight)))


# ---------------------------------------------------------------------------------------------
# Preferences: pairs (chosen, rejected) of answers to one prompt (tasks/preference.py)


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


def dpo(model, beta: float, average: bool) -> Objective:
  """Direct preference optimisation (Rafailov et al. 2023): -log σ(β · ((log π(chosen) -
  log π_ref(chosen)) - (log π(rejected) - log π_ref(rejected)))), the reference's
  log-probabilities given with the batch (`reference` [B, 2], computed once from the starting
  model). A pair's rewards are the β-scaled log-ratios."""

  def loss(params, batch, dropout_rng, train):
    logps = sequence_logps(model, params, batch, average, dropout_rng, train)
    rewards_Bx2, w_B = _flat_pairs(batch, beta * (logps - batch["reference"]))
    return _pair_sums(rewards_Bx2[:, 0] - rewards_Bx2[:, 1], w_B, rewards_Bx2)

  return Objective(loss, _summarize_pairs("reward_accuracy"))


def reward(model) -> Objective:
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

  return Objective(loss, _summarize_pairs("accuracy"))


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


# The normalisations of the policy-gradient loss (the per-token loss l summed over completion
# tokens t of sequences i; |o_i| a completion's length, G·B sequences, N = task.max_new_tokens):
NORMALIZATIONS = {
    "token": "Σ l / Σ|o_i|: every completion token weighs the same (DAPO)",
    "sequence": "mean over sequences of Σ_t l / |o_i| (GRPO as published)",
    "constant": "Σ l / (G·B·N): no length bias either way (Dr. GRPO)",
}


def token_logps(model, params, tokens_MxT, positions_MxT, valid_MxT, with_logits=False):
  """log π(token t + 1 | the tokens up to t), [M, T - 1] (and the logits they come from)."""
  logits_MxLxV = model.apply({"params": params}, tokens_MxT[:, :-1], positions_MxT[:, :-1],
                             valid_MxT[:, :-1])
  logps_MxL = -optax.softmax_cross_entropy_with_integer_labels(logits_MxLxV, tokens_MxT[:, 1:])
  return (logps_MxL, logits_MxLxV) if with_logits else logps_MxL


def policy_gradient(model, clip_low: float, clip_high: float, kl_coef: float,
                    normalize: str, max_new_tokens: int) -> Objective:
  """PPO's clipped surrogate on sampled completions, with a KL penalty to a reference: per
  completion token, l = -min(ρ A, clip(ρ, 1 - clip_low, 1 + clip_high) A) + kl_coef · k3, where
  ρ = π(token) / π_old(token), π_old the policy that sampled (log-probabilities in the batch,
  `old_logps`), A the completion's advantage, and k3 = π_ref/π - log(π_ref/π) - 1 (Schulman's
  unbiased, positive KL estimator; the reference's log-probabilities `ref_logps`). With one
  update per rollout ρ = 1 and the gradient is REINFORCE's with the advantage's baseline.
  `normalize`: see NORMALIZATIONS."""

  def loss(params, batch, dropout_rng, train):
    logps_MxL, logits_MxLxV = token_logps(model, params, batch["tokens"], batch["positions"],
                                          batch["valid"], with_logits=True)
    mask_MxL = batch["mask"][:, 1:]  # the token at t + 1 is predicted at t
    ratio_MxL = jnp.exp(logps_MxL - batch["old_logps"])
    advantage_Mx1 = batch["advantages"][:, None]
    clipped_MxL = jnp.clip(ratio_MxL, 1.0 - clip_low, 1.0 + clip_high)
    surrogate_MxL = jnp.minimum(ratio_MxL * advantage_Mx1, clipped_MxL * advantage_Mx1)
    log_ref_ratio_MxL = batch["ref_logps"] - logps_MxL
    kl_MxL = jnp.exp(log_ref_ratio_MxL) - log_ref_ratio_MxL - 1.0
    per_token_MxL = (-surrogate_MxL + kl_coef * kl_MxL) * mask_MxL
    lengths_M = jnp.sum(mask_MxL, axis=-1)
    if normalize == "sequence":
      loss_sum = jnp.sum(jnp.sum(per_token_MxL, -1) / jnp.maximum(lengths_M, 1.0))
    elif normalize == "constant":
      loss_sum = jnp.sum(per_token_MxL) / max_new_tokens
    else:
      loss_sum = jnp.sum(per_token_MxL)
    probs_MxLxV = jax.nn.softmax(logits_MxLxV)
    entropy_MxL = -jnp.sum(probs_MxLxV * jax.nn.log_softmax(logits_MxLxV), axis=-1)
    w_M = batch["weights"]
    was_clipped = (ratio_MxL * advantage_Mx1 != surrogate_MxL)
    return {"loss": loss_sum, "tokens": jnp.sum(mask_MxL), "sequences": jnp.sum(w_M),
            "kl": jnp.sum(kl_MxL * mask_MxL), "clipped": jnp.sum(was_clipped * mask_MxL),
            "entropy": jnp.sum(entropy_MxL * mask_MxL),
            "reward": jnp.sum(batch["rewards"] * w_M),
            "reward_sq": jnp.sum(batch["rewards"] ** 2 * w_M),
            "no_signal": jnp.sum(batch["no_signal"] * w_M)}

  def summarize(sums):
    per = lambda key, by: float(sums[key]) / max(float(sums[by]), 1.0)
    mean = per("reward", "sequences")
    return {"loss": per("loss", "tokens" if normalize == "token" else "sequences"),
            "reward": mean, "reward_std": math.sqrt(max(per("reward_sq", "sequences") - mean ** 2,
                                                        0.0)),
            "kl": per("kl", "tokens"), "clip_fraction": per("clipped", "tokens"),
            "entropy": per("entropy", "tokens"),
            "completion_length": per("tokens", "sequences"),
            "no_signal_groups": per("no_signal", "sequences")}

  weights = "mask" if normalize == "token" else "weights"
  return Objective(loss, summarize, terms=(("loss", weights, 1.0),))
