"""Memory-for-compute switches: rematerialised blocks and the cross-entropy in chunks give the
same losses and gradients as the plain computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import config as config_lib, objectives
from llm import model as model_lib


def _model(**changes):
  cfg = config_lib.base_config().model
  cfg.update(num_layers=2, num_heads=2, d_model=32, d_ff=64, max_len=16, **changes)
  return model_lib.build(cfg, 97)


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 97, (3, 17))
  weights = (rng.random((3, 16)) > 0.3).astype(np.float32)  # padding and masked prompts
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


def _loss_and_grads(model, params, logits_chunk=0, dropout=False):
  objective = objectives.causal_lm(model, logits_chunk)
  batch = _batch()

  def loss(p):
    sums = objective.loss(p, batch, jax.random.PRNGKey(1), dropout)
    return sums["loss"] / sums["weight"]

  return jax.jit(jax.value_and_grad(loss))(params)


def _init(model):
  return nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])


def _assert_same(a, b, tol):
  (loss_a, grads_a), (loss_b, grads_b) = a, b
  assert abs(float(loss_a) - float(loss_b)) <= tol
  for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=1e-5)


@pytest.mark.parametrize("chunk", [3, 5, 16])
def test_chunked_cross_entropy_equals_the_plain_one(chunk):
  model = _model(tie_embeddings=False)
  params = _init(model)
  _assert_same(_loss_and_grads(model, params, chunk), _loss_and_grads(model, params), 1e-6)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_every_remat_policy_gives_the_gradients_of_none(policy):
  plain = _model(dropout=0.1)
  params = _init(plain)
  remat = _model(dropout=0.1, remat=policy)
  assert jax.tree.structure(_init(remat)) == jax.tree.structure(params)  # same checkpoints
  _assert_same(_loss_and_grads(remat, params, dropout=True),
               _loss_and_grads(plain, params, dropout=True), 0.0)
