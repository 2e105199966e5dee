"""What the train loop minimises: an Objective, whatever the task. Each task makes its own
(llm/tasks/); the next-token loss, which several share, lives here.

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
