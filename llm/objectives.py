"""Losses, one per task. The train loop sees only an Objective: it never knows the task.

An objective's `loss` returns sums over the batch (`loss`, `weight`, and any task counts), so
micro-batches and hosts add up exactly; `summarize` turns summed values into the metrics logged.
"""

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Objective:
  # (params, batch, dropout_rng, train) -> {"loss": summed loss, "weight": summed weight, ...}
  loss: Callable
  # summed values (host floats) -> metrics for metrics.jsonl
  summarize: Callable


def causal_lm(model) -> Objective:
  """Next-token cross-entropy, weighted per target (weight 0: padding or a masked prompt)."""

  def loss(params, batch, dropout_rng, train):
    logits_BxLxV = model.apply({"params": params}, batch["inputs"], deterministic=not train,
                               rngs={"dropout": dropout_rng} if train else {})
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
    return {"loss": jnp.sum(ce_BxL * batch["weights"]), "weight": jnp.sum(batch["weights"])}

  def summarize(sums):
    mean = sums["loss"] / max(sums["weight"], 1.0)
    return {"loss": mean, "perplexity": math.exp(min(mean, 80.0))}

  return Objective(loss, summarize)
