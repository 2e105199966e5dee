"""Classification (task.kind=classify): a head on the backbone's one vector per sequence,
trained on text + label records (the book's spam classifier)."""

import jax.numpy as jnp
import numpy as np
import optax

from llm import model as model_lib
from llm.errors import UserError
from llm.tasks.base import Context, RecordTask, register
from llm.text import prompts
from llm.training import objectives


def label_ids(values, labels: list[str]) -> np.ndarray:
  """Label values (names, or ids 0..N-1) -> class ids, by the order of `labels`."""
  index = {name: i for i, name in enumerate(labels)}
  ids = np.empty(len(values), np.int32)
  for row, value in enumerate(values):
    key = str(value).strip()
    if key not in index and not (key.isdigit() and int(key) < len(labels)):
      raise UserError(f"data: row {row} has label {value!r}, which is not one of task.labels="
                      f"{','.join(labels)} (nor an id below {len(labels)})")
    ids[row] = index[key] if key in index else int(key)
  return ids


def label_names(values) -> list[str]:
  """The classes found in the data: sorted names, or 0..max for integer labels."""
  keys = sorted({str(v).strip() for v in values})
  if all(k.isdigit() for k in keys):
    return [str(i) for i in range(max(int(k) for k in keys) + 1)]
  return keys


def balance(labels: np.ndarray, seed: int) -> np.ndarray:
  """Row indices keeping every class at the smallest class's size (random undersampling)."""
  rng = np.random.default_rng([seed, 2])
  counts = np.bincount(labels)
  smallest = counts[counts > 0].min()
  keep = [rng.choice(np.flatnonzero(labels == c), smallest, replace=False)
          for c in range(len(counts)) if counts[c]]
  return np.sort(np.concatenate(keep))


def classification_examples(texts: list[str], labels: np.ndarray, tokenizer,
                            max_length: int) -> dict:
  """`prompts.encode_texts` plus the class ids and weight 1 per example."""
  tokens, valid = prompts.encode_texts(texts, tokenizer, max_length)
  return {"tokens": tokens, "valid": valid, "labels": labels.astype(np.int32),
          "weights": np.ones(len(texts), np.float32)}


@register
class Classification(RecordTask):
  kind = "classify"
  produces = "classes"
  families = ("gpt", "bert")
  keys = {"labels": ("", "class names in order, comma-separated; empty: sorted from the data")}

  @property
  def labels(self) -> list[str]:
    """The class names, in the order of the head's outputs."""
    return [name.strip() for name in self.cfg.task.labels.split(",") if name.strip()]

  def fields(self):
    return self.cfg.data.text_field, self.cfg.data.label_field

  def found_in_data(self, docs) -> dict:
    if self.cfg.task.labels or docs is None:
      return {}
    return {"task.labels": ",".join(label_names(docs[self.cfg.data.label_field]))}

  def build_model(self, vocab_size: int):
    return model_lib.build(self.cfg.model, vocab_size, num_classes=len(self.labels))

  def objective(self, model):
    return classification(model, self.labels)

  def examples(self, docs, model, context: Context):
    cfg, d = self.cfg, self.cfg.data
    names = self.labels
    if len(names) < 2:
      raise UserError(f"task.labels={cfg.task.labels!r}: a classifier needs at least 2 classes")
    ids = label_ids(docs[d.label_field], names)
    rows = balance(ids, cfg.seed) if d.balance else np.arange(len(ids))
    examples = classification_examples([docs[int(i)][d.text_field] or "" for i in rows],
                                       ids[rows], context.tokenizer, d.max_length)
    counts = np.bincount(examples["labels"], minlength=len(names))
    return examples, rows, ", ".join(f"{n} {c}" for n, c in zip(names, counts))


# ---------------------------------------------------------------------------------------------
# The objective


def classification(model, labels: list[str]) -> objectives.Objective:
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

  return objectives.Objective(loss, summarize)
