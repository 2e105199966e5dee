import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm.model import GPT, TransformerConfig

CFG = TransformerConfig(vocab_size=256, max_len=32, num_layers=2, num_heads=4, d_model=32,
                        d_ff=128)


def _params(cfg=CFG, seed=0):
  return nn.meta.unbox(GPT(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32)))[
      "params"]


def test_untrained_loss_is_close_to_uniform():
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 33), 0, CFG.vocab_size)
  logits = GPT(CFG).apply({"params": _params()}, tokens[:, :-1])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  assert abs(float(loss) - math.log(CFG.vocab_size)) < 0.05


def test_gpt2_initialisation_and_tied_head():
  params = _params()
  assert "lm_head" not in params  # tied: logits use the token embedding
  std = lambda x: float(jnp.std(x))
  assert abs(std(params["wte"]["embedding"]) - 0.02) < 0.002
  # Projections into the residual stream start smaller: 0.02 / sqrt(2 * layers).
  assert abs(std(params["block_0"]["mlp"]["wo"]["kernel"]) - 0.01) < 0.001
  untied = _params(TransformerConfig(**{**CFG.__dict__, "tie_embeddings": False}))
  assert untied["lm_head"]["kernel"].shape == (32, 256)


def _cached_logits(model, params, tokens, prefill):
  B, L = tokens.shape
  cache = jax.tree.map(jnp.zeros_like,
                       model.init(jax.random.PRNGKey(0), jnp.zeros((B, L), jnp.int32),
                                  decode=True)["cache"])
  apply = jax.jit(model.apply, static_argnames=("decode", "mutable"))
  logits, state = apply({"params": params, "cache": cache}, tokens[:, :prefill],
                        decode=True, mutable=("cache",))
  out = [logits]
  for i in range(prefill, L):
    logits, state = apply({"params": params, **state}, tokens[:, i:i + 1],
                          jnp.full((B, 1), i), decode=True, mutable=("cache",))
    out.append(logits)
  return jnp.concatenate(out, axis=1)


def test_kv_cache_logits_equal_a_full_forward_pass():
  model, params = GPT(CFG), _params()
  tokens = jax.random.randint(jax.random.PRNGKey(2), (3, 20), 0, CFG.vocab_size)
  full = model.apply({"params": params}, tokens)
  np.testing.assert_allclose(_cached_logits(model, params, tokens, 7), full, atol=1e-5)


def test_left_padding_changes_nothing():
  model, params = GPT(CFG), _params()
  tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 10), 0, CFG.vocab_size)
  alone = model.apply({"params": params}, tokens)
  padded = jnp.concatenate([jnp.zeros((1, 5), jnp.int32), tokens], axis=1)
  valid = jnp.arange(15)[None] >= 5
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  out = model.apply({"params": params}, padded, positions, valid)
  np.testing.assert_allclose(out[:, 5:], alone, atol=1e-5)


def test_norms_equal_flax_values_and_gradients():
  # layers.Norm writes its backward pass out; flax's LayerNorm and RMSNorm are the reference.
  from llm.model import layers
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(2.0, 3.0, size=(3, 5, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  for centred, reference in ((True, nn.LayerNorm(epsilon=1e-5)),
                             (False, nn.RMSNorm(epsilon=1e-6))):
    ours = layers.Norm(centred=centred, eps=1e-6 if not centred else 1e-5)
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                          nn.meta.unbox(ours.init(jax.random.key(0), x)))
    assert jax.tree.structure(params) == jax.tree.structure(reference.init(jax.random.key(0), x))
    loss = lambda module: jax.value_and_grad(
        lambda p, x: jnp.sum(module.apply(p, x) * w), argnums=(0, 1))(params, x)
    (value, grads), (ref_value, ref_grads) = loss(ours), loss(reference)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(g, ref, atol=1e-4 * float(jnp.abs(ref).max()))
