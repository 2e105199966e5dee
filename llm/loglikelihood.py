"""Log-likelihoods of continuations given contexts, tokenized and cut exactly as
lm-evaluation-harness does it: what benchmark scoring (llm/benchmarks.py) and the harness's model
(llm/harness.py) are made of.

    scorer = LogLikelihood(run.model, run.tokenizer, run.mesh, run.mesh_cfg)
    [(logp, greedy)] = scorer(run.params, [scorer.encode("The capital of France is", " Paris")])

`logp` sums log π(continuation token | everything before it); `greedy` says whether greedy
decoding would have produced the whole continuation. Requests are scored in batches of one
shape (the batch size, and lengths rounded up to a power of two), so a set of requests
compiles a handful of programs once, and evaluating again during training compiles nothing.
"""

import jax
import jax.numpy as jnp
import numpy as np

from llm import sharding
from llm import model as model_lib
from llm.errors import UserError


class LogLikelihood:

  def __init__(self, model, tokenizer, mesh, mesh_cfg, batch_size: int = 16):
    self.model, self.tokenizer, self.mesh, self.mesh_cfg = model, tokenizer, mesh, mesh_cfg
    self.max_len = model_lib.shape_of(model).max_len
    self.batch_size = batch_size
    # An empty context is the beginning-of-text token (the harness's prefix_token_id).
    self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id
    self._score = jax.jit(self._score_fn)

  def tok_encode(self, text: str) -> list[int]:
    """A text's ids as the harness's Hugging Face model encodes it: with the tokenizer's
    beginning-of-text token where it adds one (Llama's <s>; GPT-2 adds none)."""
    return ([] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]) + \
        self.tokenizer.encode(text)

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

  def _score_fn(self, params, tokens_BxL, targets_BxL, mask_BxL):
    logits_BxLxV = self.model.apply({"params": params}, tokens_BxL).astype(jnp.float32)
    logps_BxLxV = jax.nn.log_softmax(logits_BxLxV)
    target_BxL = jnp.take_along_axis(logps_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    greedy_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL) | (mask_BxL == 0)
    return jnp.sum(target_BxL * mask_BxL, axis=-1), jnp.all(greedy_BxL, axis=-1)

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
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      longest = max(len(rows[i]) - 1 for i in chunk)
      length = min(self.max_len, 1 << (longest - 1).bit_length())
      tokens = np.zeros((self.batch_size, length), np.int32)
      targets = np.zeros_like(tokens)
      mask = np.zeros(tokens.shape, np.float32)
      for r, i in enumerate(chunk):
        row, n = rows[i], len(requests[i][1])
        tokens[r, :len(row) - 1], targets[r, :len(row) - 1] = row[:-1], row[1:]
        mask[r, len(row) - 1 - n:len(row) - 1] = 1.0  # the continuation's targets
      with sharding.activate(self.mesh, self.mesh_cfg):
        logps, greedy = self._score(params, tokens, targets, mask)
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
