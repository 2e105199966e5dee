"""Log-likelihoods of continuations given contexts, tokenized and cut exactly as
lm-evaluation-harness does it: what benchmark scoring (llm/evals/benchmarks.py) and the
harness's model (llm/evals/harness.py) are made of.

    scorer = LogLikelihood(run.model, run.tokenizer, run.mesh, run.mesh_cfg)
    [(logp, greedy)] = scorer(run.params, [scorer.encode("The capital of France is", " Paris")])

`logp` sums log π(continuation token | everything before it); `greedy` says whether greedy
decoding would have produced the whole continuation. Requests are scored in batches of a few
shapes (the batch size; lengths rounded up), so a set of requests compiles a handful of
programs once, and evaluating again during training compiles nothing.
"""

import jax
import jax.numpy as jnp
import numpy as np

from llm import model as model_lib
from llm.errors import UserError
from llm.training import sharding


class LogLikelihood:

  def __init__(self, model, tokenizer, mesh, mesh_cfg, batch_size: int = 16):
    self.model, self.tokenizer, self.mesh, self.mesh_cfg = model, tokenizer, mesh, mesh_cfg
    self.max_len = model_lib.shape_of(model).max_len
    self.batch_size = batch_size
    # An empty context is the beginning-of-text token (the harness's prefix_token_id).
    self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id
    self.num_tokens = getattr(tokenizer, "vocab_size", None) or model_lib.shape_of(
        model).vocab_size
    # Results replicated: every process reads them all (several hosts).
    self._score = jax.jit(self._score_fn, out_shardings=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))

  def tok_encode(self, text: str) -> list[int]:
    """A text's ids as the harness's Hugging Face model encodes it: with the special tokens the
    tokenizer's own rules add (Llama 3's beginning-of-text; GPT-2 adds none)."""
    return self.tokenizer.encode_with_specials(text)

  def encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness makes them: a context's trailing spaces
    move to the continuation; the pair is encoded whole and the context's ids cut off, so the
    token at the boundary is the one the whole text has."""
    if not context:
      ids = self.tokenizer.encode(continuation)
      return ([self.prefix_id], ids) if ids[:1] != [self.prefix_id] else (ids[:1], ids[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, context_ids = self.tok_encode(context + continuation), self.tok_encode(context)
    return context_ids, whole[len(context_ids):]

  def _score_fn(self, params, tokens_BxL, start_B, targets_BxC, mask_BxC):
    """Each row's summed log-probability of its C targets, read from the positions start,
    start + 1, ...; the LM head runs on those positions only (at GPT-2's shape it costs as
    much as all the blocks)."""
    hidden_BxLxD = self.model.apply({"params": params}, tokens_BxL, method="hidden")
    C, L = targets_BxC.shape[1], tokens_BxL.shape[1]
    index_BxC = jnp.minimum(start_B[:, None] + jnp.arange(C)[None, :], L - 1)
    x_BxCxD = jnp.take_along_axis(hidden_BxLxD, index_BxC[..., None], axis=1)
    logits_BxCxV = self.model.apply({"params": params}, x_BxCxD, method="logits")
    V = logits_BxCxV.shape[-1]
    if self.num_tokens < V:  # a vocabulary padded past the tokenizer's: never a prediction
      logits_BxCxV = jnp.where(jnp.arange(V) < self.num_tokens, logits_BxCxV, -jnp.inf)
    logps_BxCxV = jax.nn.log_softmax(logits_BxCxV.astype(jnp.float32))
    target_BxC = jnp.take_along_axis(logps_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    greedy_BxC = (jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC) | (mask_BxC == 0)
    return jnp.sum(target_BxC * mask_BxC, axis=-1), jnp.all(greedy_BxC, axis=-1)

  def __call__(self, params, requests: list[tuple[list[int], list[int]]],
               progress=None) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of each (context ids, continuation ids); the model reads the
    last max_len + 1 tokens of each pair but the last, as the harness does."""
    if any(not cont for _, cont in requests):
      raise UserError("a continuation encodes to no tokens; it cannot be scored")
    if any(len(cont) > self.max_len for _, cont in requests):
      raise UserError(f"a continuation is longer than the model's context ({self.max_len} "
                      "tokens)")
    rows = [(ctx + cont)[-(self.max_len + 1):] for ctx, cont in requests]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths together
    results = [None] * len(rows)
    for first in range(0, len(order), self.batch_size):
      chunk = order[first:first + self.batch_size]
      # Lengths rounded up (inputs to a multiple of 16, continuations to a power of two): a
      # few shapes, each compiled once.
      length = min(self.max_len, _round_up(max(len(rows[i]) - 1 for i in chunk), 16))
      width = min(length, 1 << (max(len(requests[i][1]) for i in chunk) - 1).bit_length())
      tokens = np.zeros((self.batch_size, length), np.int32)
      start = np.zeros(self.batch_size, np.int32)
      targets = np.zeros((self.batch_size, width), np.int32)
      mask = np.zeros((self.batch_size, width), np.float32)
      for r, i in enumerate(chunk):
        row, n = rows[i], len(requests[i][1])
        tokens[r, :len(row) - 1] = row[:-1]
        start[r] = len(row) - 1 - n  # the input position that predicts the first target
        targets[r, :n], mask[r, :n] = row[-n:], 1.0
      with sharding.activate(self.mesh, self.mesh_cfg):
        logps, greedy = self._score(params, tokens, start, targets, mask)
      for r, i in enumerate(chunk):
        results[i] = (float(logps[r]), bool(greedy[r]))
      if progress is not None:
        progress(len(chunk))
    return results

  def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
    """A whole text as (context, continuation) windows that score each of its tokens once,
    every window with as much context as fits: the harness's loglikelihood_rolling."""
    ids = self.tok_encode(text)
    windows, predicted = [], 0
    while predicted < len(ids):
      n = min(self.max_len, len(ids) - predicted)  # tokens this window predicts
      end = predicted + n
      window = ([self.prefix_id] + ids)[max(0, end - self.max_len):end + 1]
      windows.append((window[:-n], window[-n:]))
      predicted = end
    return windows


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple
