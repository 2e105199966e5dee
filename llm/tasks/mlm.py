"""BERT pre-training (task.kind=mlm): masked-LM and next-sentence prediction on sentence pairs.

Documents are cut into sentences and joined into pieces; each epoch a piece gets a partner (the
next piece half of the time, a random one otherwise) and a fresh masking (15% of the tokens
selected; of those 80% [MASK], 10% a random token, 10% kept), both drawn from the seed, so a
resumed run sees the same pairs.
"""

import math
import re

import jax.numpy as jnp
import numpy as np
import optax

from llm.data import batches, sources
from llm.errors import UserError
from llm.tasks.base import Context, register, Schema, Task, TaskData
from llm.text import tokenizer as tokenizer_lib
from llm.training import objectives

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
IS_NEXT, RANDOM_NEXT = 0, 1  # next-sentence labels, as transformers' BertForPreTraining


def sentences(text: str) -> list[str]:
  """A document cut at line breaks and after . ! ? followed by space."""
  return [s.strip() for s in _SENTENCE_END.split(text or "") if s.strip()]


def _segments(doc_sentence_ids: list[list[int]], target: int) -> list[list[int]]:
  """Consecutive sentences joined until each piece holds at least `target` tokens."""
  pieces, current = [], []
  for ids in doc_sentence_ids:
    current = current + ids
    if len(current) >= target:
      pieces.append(current)
      current = []
  if current:
    pieces.append(current)
  return pieces


class SentencePairs:
  """[CLS] A [SEP] B [SEP] pairs for next-sentence prediction.

  Documents are cut into pieces of consecutive sentences (at least half a pair's length each);
  example i is piece A_i, and in each epoch B is drawn from (seed, epoch, i): the piece after
  A_i half of the time, a piece of another document otherwise. A pair too long loses tokens
  from its longer side.
  """

  def __init__(self, texts: list[str], tokenizer, max_length: int, seed: int,
               split: str = "training"):
    self.tokenizer, self.max_length, self.seed = tokenizer, max_length, seed
    self.docs = []
    for text in texts:
      sentence_ids = [ids for ids in tokenizer.encode_batch(sentences(text)) if ids]
      self.docs.append(_segments(sentence_ids, (max_length - 3) // 2))
    self.anchors = [(d, k) for d, pieces in enumerate(self.docs) for k in range(len(pieces) - 1)]
    if sum(1 for d in self.docs if d) < 2 or not self.anchors:
      raise UserError(f"next-sentence prediction needs at least 2 documents, one of them with 2 "
                      f"pieces of {(max_length - 3) // 2} tokens, in the {split} split "
                      f"({len(texts)} documents); use more text, a smaller data.max_length"
                      + (", or a larger data.val_fraction" if split == "validation" else ""))
    self.non_empty = [d for d, pieces in enumerate(self.docs) if pieces]

  def __len__(self):
    return len(self.anchors)

  def take(self, indices: np.ndarray, epochs: np.ndarray) -> dict:
    """Arrays tokens, segments, valid [n, max_length]; nsp_labels, weights [n]."""
    tok, L = self.tokenizer, self.max_length
    rows, labels = [], []
    for i, epoch in zip(indices, epochs):
      rng = np.random.default_rng([self.seed, 3, int(epoch), int(i)])
      d, k = self.anchors[int(i)]
      a = list(self.docs[d][k])
      others = [o for o in self.non_empty if o != d]
      if rng.random() < 0.5 or not others:
        b, label = list(self.docs[d][k + 1]), IS_NEXT
      else:
        other = self.docs[others[rng.integers(len(others))]]
        b, label = list(other[rng.integers(len(other))]), RANDOM_NEXT
      while len(a) + len(b) > L - 3:
        (a if len(a) >= len(b) else b).pop()
      rows.append(([tok.cls_id] + a + [tok.sep_id] + b + [tok.sep_id], len(a) + 2))
      labels.append(label)
    tokens, valid = tokenizer_lib.pad([r for r, _ in rows], L, tok.pad_id)
    segments = (np.arange(L)[None, :] >= np.array([n for _, n in rows])[:, None]) & valid
    return {"tokens": tokens, "segments": segments.astype(np.int32), "valid": valid,
            "nsp_labels": np.array(labels, np.int32), "weights": np.ones(len(rows), np.float32)}


def max_predictions(max_length: int, rate: float) -> int:
  return max(1, int(np.ceil(rate * max_length)) + 1)


def mask_tokens(examples: dict, indices: np.ndarray, epochs: np.ndarray, tokenizer, rate: float,
                seed: int) -> dict:
  """BERT's masking of each example, drawn from (seed, epoch, example): `rate` of the
  non-special tokens are selected; of those 80% become [MASK], 10% a random token, 10% stay.

  Adds mlm_positions, mlm_ids (the original tokens) and mlm_weights [n, P] to the examples.
  """
  tokens = examples["tokens"].copy()
  n, L = tokens.shape
  P = max_predictions(L, rate)
  positions = np.zeros((n, P), np.int32)
  ids = np.zeros((n, P), np.int32)
  weights = np.zeros((n, P), np.float32)
  specials = np.isin(tokens, list(tokenizer.special_ids)) | ~examples["valid"]
  for r in range(n):
    rng = np.random.default_rng([seed, 4, int(epochs[r]), int(indices[r])])
    candidates = np.flatnonzero(~specials[r])
    k = min(max(1, int(round(rate * len(candidates)))), P, len(candidates))
    chosen = np.sort(rng.choice(candidates, k, replace=False))
    positions[r, :k], ids[r, :k], weights[r, :k] = chosen, tokens[r, chosen], 1.0
    draw = rng.random(k)
    tokens[r, chosen[draw < 0.8]] = tokenizer.mask_id
    random = chosen[(draw >= 0.8) & (draw < 0.9)]
    tokens[r, random] = rng.integers(0, tokenizer.vocab_size, len(random))
  return {**examples, "tokens": tokens, "mlm_positions": positions, "mlm_ids": ids,
          "mlm_weights": weights}


@register
class MaskedLM(Task):
  kind = "mlm"
  produces = "vectors"
  families = ("bert",)
  pretrains = "bert"
  keys = {
      "mask_rate": (0.15, "share of tokens selected (80% [MASK], 10% random, 10% kept)"),
      "mlm_weight": (1.0, "loss = mlm_weight * MLM + nsp_weight * NSP"),
      "nsp_weight": (1.0, "see task.mlm_weight"),
  }

  def load(self):
    return sources.open_documents(self.cfg.data)  # a document without text is none

  def check(self) -> None:
    super().check()
    if not 0.0 < self.cfg.task.mask_rate < 1.0:
      raise UserError(f"config: task.mask_rate={self.cfg.task.mask_rate!r} is not allowed; use "
                      "a value in (0, 1)")

  def objective(self, model):
    return mlm_nsp(model, self.cfg.task.mlm_weight, self.cfg.task.nsp_weight)

  def data(self, docs, model, context: Context) -> TaskData:
    cfg, d, tr, tokenizer = self.cfg, self.cfg.data, self.cfg.train, context.tokenizer
    doc_texts = [t or "" for t in docs[d.text_field]]
    cut = int(round(len(doc_texts) * (1.0 - d.val_fraction)))  # validation: the last documents
    pairs = {"train": SentencePairs(doc_texts[:cut], tokenizer, d.max_length, cfg.seed),
             "eval": SentencePairs(doc_texts[cut:], tokenizer, d.max_length, cfg.seed + 1,
                                   "validation")}

    def masked(split):  # a pair drawn for this epoch, then its tokens masked for this epoch
      return lambda idx, epochs: mask_tokens(pairs[split].take(idx, epochs), idx, epochs,
                                             tokenizer, cfg.task.mask_rate, cfg.seed)

    where = dict(process_index=context.process_index, process_count=context.process_count)
    train = batches.Batches(len(pairs["train"]), masked("train"), tr.batch_size, tr.grad_accum,
                            cfg.seed, **where)
    evals = {"eval": batches.fixed_batches(len(pairs["eval"]), masked("eval"),
                                           self.micro_batch(), tr.eval_batches, **where)}
    return TaskData(train, evals, Schema.of(train.example(), d.max_length),
                    f"{len(train):,} training sentence pairs (a new partner and mask every "
                    f"epoch), {len(pairs['eval']):,} for validation")


# ---------------------------------------------------------------------------------------------
# The objective


def mlm_nsp(model, mlm_weight: float = 1.0, nsp_weight: float = 1.0) -> objectives.Objective:
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

  return objectives.Objective(loss, summarize, terms=(("mlm_loss", "mlm_weights", mlm_weight),
                                           ("nsp_loss", "weights", nsp_weight)))
