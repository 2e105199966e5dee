"""`llm.bench evaluate`: multiple-choice scoring at the config's shape in examples/s (and
lm-evaluation-harness's Hugging Face backend beside it)."""

import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm import config as config_lib
from llm import model as model_lib
from llm.bench import torch_reference
from llm.errors import UserError
from llm.evals import loglikelihood
from llm.training import sharding


def bench_evaluate(cfg, examples: int, context_len: int, choice_len: int, batch_size: int,
                   compare_hf: bool = False) -> dict:
  """Multiple-choice scoring at the config's model shape (random weights): `examples` examples
  of 4 choices, a `context_len`-token context and `choice_len`-token choices of random tokens,
  through loglikelihood.LogLikelihood after one untimed pass (which compiles); examples/s.
  With `compare_hf`, lm-evaluation-harness's Hugging Face backend on transformers' GPT-2 of the
  same shape, on the same token ids, in the same process."""
  config_lib.validate(cfg)
  model = model_lib.build(cfg.model, cfg.tokenizer.vocab_size)
  if context_len + choice_len > model.cfg.max_len + 1:
    raise UserError(f"context_len + choice_len is more than model.max_len + 1 = "
                    f"{model.cfg.max_len + 1}")
  params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 1), jnp.int32)))["params"])()
  rng = np.random.default_rng(0)
  ids = lambda n: rng.integers(0, model.cfg.vocab_size, n).tolist()
  requests = [(context, ids(choice_len)) for context in (ids(context_len)
                                                         for _ in range(examples))
              for _ in range(4)]
  scorer = loglikelihood.LogLikelihood(model, types.SimpleNamespace(bos_id=None, eot_id=0),
                                       sharding.make_mesh(cfg.mesh), cfg.mesh, batch_size)
  scorer(params, requests)  # compiles
  started = time.perf_counter()
  scorer(params, requests)
  result = {"examples_per_sec": examples / (time.perf_counter() - started),
            "requests_per_batch": batch_size}
  if compare_hf:
    seconds = torch_reference.harness_hf_seconds(model.cfg, requests, batch_size)
    result["harness_hf_examples_per_sec"] = examples / seconds
    result["examples_per_sec_over_harness_hf"] = result["examples_per_sec"] * seconds / examples
  return result
