"""Losses, one per task. The train loop sees only an Objective: it never knows the task.

An objective's `loss` returns sums over the batch (`loss`, `weight`, and any task counts), so
micro-batches and hosts add up exactly; `summarize` turns summed values into the metrics logged.
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


def causal_lm(model) -> Objective:
  """Next-token cross-entropy, weighted per target (weight 0: padding or a masked prompt)."""

  def loss(params, batch, dropout_rng, train):
    logits_BxLxV = model.apply({"params": params}, batch["inputs"], deterministic=not train,
                               rngs={"dropout": dropout_rng} if train else {})
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
    return {"loss": jnp.sum(ce_BxL * batch["weights"]), "weight": jnp.sum(batch["weights"])}

  def summarize(sums):
    mean = float(sums["loss"]) / max(float(sums["weight"]), 1.0)
    return {"loss": mean, "perplexity": math.exp(min(mean, 80.0))}

  return Objective(loss, summarize)


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
