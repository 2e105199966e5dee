"""Sampling from a language model: temperature, top-k and top-p, a KV-cache decode loop on
device, and `Generator`, which turns prompts into text for an opened run directory.

Prompts of different lengths run as one batch, left-padded: positions count from each prompt's
first token and padding is never attended to, so every prompt gets what it would get alone.
With the KV cache (default) the prompt runs once and each new token costs one position; the
decode loop is a `jax.lax.while_loop` on device, compiled once per shape.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llm import model as model_lib
from llm.errors import UserError
from llm.text import prompts as prompts_lib, tokenizer as tokenizer_lib
from llm.training import sharding

# ---------------------------------------------------------------------------------------------
# Sampling


def sample_logits(logits_BxV, rng, temperature: float, top_k: int, top_p: float):
  """One token per row. temperature 0: greedy; top_k 0 and top_p 1: no truncation."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    logits_BxV = jnp.where(nucleus(logits_BxV, top_p), logits_BxV, -jnp.inf)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def nucleus(logits_xV, top_p: float):
  """Which tokens (True) make the smallest set of most likely ones whose probability reaches
  top_p: what top-p sampling draws from (over the last axis, any leading ones)."""
  sorted_xV = jnp.sort(logits_xV, axis=-1)[..., ::-1]
  probs_xV = jax.nn.softmax(sorted_xV, axis=-1)
  num_kept_x1 = jnp.sum(jnp.cumsum(probs_xV, axis=-1) - probs_xV < top_p, axis=-1,
                        keepdims=True)
  return logits_xV >= jnp.take_along_axis(sorted_xV, num_kept_x1 - 1, axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "use_cache", "on_token",
                                             "num_tokens"))
def generate_tokens(model, params, prompt_BxP, valid_BxP, rng, stop_ids, *, max_new_tokens,
                    temperature, top_k, top_p, use_cache, on_token=None, num_tokens=None):
  """Left-padded prompts -> new tokens [B, max_new_tokens]. A row ends at its first token of
  `stop_ids` (an id or a list: end-of-text, a chat template's end of turn); after it come
  copies of the first stop id.

  `num_tokens`: the tokenizer's vocabulary, when the model's is padded past it (padding rows
  are never sampled). `on_token(token_B)`, if given, is called on the host with each step's
  tokens as they come.
  """
  B, P = prompt_BxP.shape
  T = P + max_new_tokens
  stop_S = jnp.atleast_1d(jnp.asarray(stop_ids, jnp.int32))
  eot_id = stop_S[0]
  lengths_B = jnp.sum(valid_BxP, axis=1)
  positions_BxP = jnp.maximum(jnp.cumsum(valid_BxP, axis=1) - 1, 0)
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

  if use_cache:
    cache = jax.tree.map(jnp.zeros_like, model.init(
        jax.random.PRNGKey(0), jnp.zeros((B, T), jnp.int32), decode=True)["cache"])
    logits_BxPxV, mutated = model.apply({"params": params, "cache": cache}, prompt_BxP,
                                        positions_BxP, valid_BxP, decode=True, mutable=["cache"])
    cache, last_logits_BxV = mutated["cache"], logits_BxPxV[:, -1]
  else:  # the whole sequence so far runs again at every step
    tokens_BxT = jnp.concatenate([prompt_BxP, jnp.zeros((B, max_new_tokens), jnp.int32)], 1)
    valid_BxT = jnp.concatenate([valid_BxP, jnp.ones((B, max_new_tokens), bool)], 1)
    positions_BxT = jnp.maximum(jnp.cumsum(valid_BxT, axis=1) - 1, 0)
    full = lambda toks: model.apply({"params": params}, toks, positions_BxT, valid_BxT)
    cache, last_logits_BxV = tokens_BxT, full(tokens_BxT)[:, P - 1]

  def step(carry):
    i, cache, logits_BxV, out_BxN, done_B, rng = carry
    rng, key = jax.random.split(rng)
    token_B = jnp.where(done_B, eot_id, sample(logits_BxV[:, :num_tokens], key))
    out_BxN = out_BxN.at[:, i].set(token_B)
    if on_token is not None:
      jax.debug.callback(on_token, token_B, ordered=True)
    done_B = done_B | jnp.isin(token_B, stop_S)
    if use_cache:
      logits_Bx1xV, mutated = model.apply(
          {"params": params, "cache": cache}, token_B[:, None], (lengths_B + i)[:, None],
          None, decode=True, mutable=["cache"])
      cache, logits_BxV = mutated["cache"], logits_Bx1xV[:, 0]
    else:
      cache = cache.at[:, P + i].set(token_B)
      logits_BxV = full(cache)[:, P + i]
    return i + 1, cache, logits_BxV, out_BxN, done_B, rng

  def keep_going(carry):
    i, _, _, _, done_B, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  out_BxN = jnp.full((B, max_new_tokens), eot_id, jnp.int32)
  init = (0, cache, last_logits_BxV, out_BxN, jnp.zeros((B,), bool), rng)
  return jax.lax.while_loop(keep_going, step, init)[3]


# ---------------------------------------------------------------------------------------------
# A trained run, ready to sample from


class Generator:
  """An opened run (runs.load) that turns prompts into text."""

  def __init__(self, run):
    workdir = run.workdir or "this run"
    if run.task.produces == "classes":
      raise UserError(f"{workdir} is a classifier; use python -m llm.classify --workdir={workdir}")
    if not model_lib.family(run.cfg.model.kind).causal:
      raise UserError(f"{workdir} holds a {run.cfg.model.kind.upper()} encoder, which does not "
                      f"generate text; use python -m llm.embed or fine-tune a classifier")
    self.cfg, self.tokenizer = run.cfg, run.tokenizer
    self.model, self.params = run.model, run.params
    self.mesh, self.mesh_cfg = run.mesh, run.mesh_cfg
    self.stop_ids = prompts_lib.stop_ids(self.tokenizer)

  def generate(self, prompts: list[str], max_new_tokens: int = 100, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, num_samples: int = 1, seed: int = 0,
               stop: str | None = None, use_cache: bool = True,
               stream=None) -> list[list[str]]:
    """For each prompt, `num_samples` continuations (text after the prompt).

    `stream(text)`, for one prompt and one sample, receives the text piece by piece as it is
    generated (up to the stop string).
    """
    return self.generate_ids(prompts_lib.encode_prompts(self.tokenizer, prompts),
                             max_new_tokens, temperature, top_k, top_p, num_samples, seed, stop,
                             use_cache, stream)

  def generate_ids(self, encoded: list[list[int]], max_new_tokens: int = 100,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   num_samples: int = 1, seed: int = 0, stop: str | None = None,
                   use_cache: bool = True, stream=None) -> list[list[str]]:
    """`generate` for prompts already encoded (their ids as the model reads them)."""
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0 or num_samples < 1:
      raise UserError("sampling: use temperature >= 0, top_k >= 0, 0 < top_p <= 1 and "
                      "num_samples >= 1")
    if max_new_tokens < 1:
      raise UserError(f"max_new_tokens={max_new_tokens}: ask for at least 1 new token")
    encoded = [ids or [self.tokenizer.eot_id] for ids in encoded]
    longest = max(map(len, encoded))
    context = self.model.cfg.max_len
    if longest + max_new_tokens > context:
      raise UserError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} is "
                      f"more than the model's context of {context} tokens; ask for at most "
                      f"{max(context - longest, 0)} new tokens")
    rows = [ids for ids in encoded for _ in range(num_samples)]
    prompt, valid = tokenizer_lib.pad(rows, longest, 0, left=True)
    with sharding.activate(self.mesh, self.mesh_cfg):
      new = generate_tokens(self.model, self.params, prompt, valid, jax.random.PRNGKey(seed),
                      self.stop_ids, max_new_tokens=max_new_tokens,
                      temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                      use_cache=use_cache, num_tokens=self.tokenizer.vocab_size,
                      on_token=None if stream is None else self._streamer(stream, stop))
    texts = [self._text(row, stop) for row in np.asarray(new)]
    return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(encoded))]

  def _streamer(self, stream, stop):
    ids, shown = [], [""]

    def on_token(token_B):
      if len(token_B) != 1:
        raise UserError("streaming is for one prompt and one sample")
      ids.append(int(token_B[0]))
      text = self._text(ids, stop)
      if text.startswith(shown[0]) and len(text) > len(shown[0]):
        stream(text[len(shown[0]):])
        shown[0] = text

    return on_token

  def _text(self, ids, stop):
    ids = list(ids)
    ends = [ids.index(i) for i in self.stop_ids if i in ids]
    ids = ids[:min(ends)] if ends else ids
    text = self.tokenizer.decode(ids)
    return text.split(stop, 1)[0] if stop else text


