"""Switches for size: rematerialised blocks, the cross-entropy in chunks and scanned layers give
the same losses, gradients and samples as the plain computation. For speed: the attention
kernels equal XLA's, and on the CPU a step reuses the host memory the last one freed."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import config as config_lib
from llm import model as model_lib
from llm.inference import sampling
from llm.model import attention, layers, lora
from llm.training import objectives, params as params_lib


def _model(**changes):
  cfg = config_lib.base_config().model
  cfg.update({"num_layers": 2, "num_heads": 2, "d_model": 32, "d_ff": 64, "max_len": 16,
              **changes})
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


@pytest.mark.parametrize("chunk", [5, 16])  # a last chunk padded, and one chunk of all
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


def test_scanned_layers_give_the_losses_gradients_and_tokens_of_unrolled_ones():
  # (scanned without remat trains in test_sharding)
  unrolled, scanned = _model(num_layers=3), _model(num_layers=3, scan_layers=True, remat="dots")
  params = _init(unrolled)
  stacked = layers.to_layout(params, scanned=True)
  assert jax.tree.structure(stacked) == jax.tree.structure(_init(scanned))
  assert stacked["blocks"]["attn"]["query"]["kernel"].shape == (3, 32, 2, 16)
  loss, grads = _loss_and_grads(scanned, stacked)
  _assert_same((loss, layers.to_layout(grads, scanned=False)), _loss_and_grads(unrolled, params),
               1e-6)
  # KV-cache decoding of a left-padded batch: the cache is stacked too.
  prompt = np.array([[0, 5, 6, 7], [8, 9, 10, 11]], np.int32)
  valid = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], bool)
  tokens = [sampling.generate_tokens(model, p, prompt, valid, jax.random.PRNGKey(0), 96,
                                     max_new_tokens=6, temperature=0.0, top_k=0, top_p=1.0,
                                     use_cache=True)
            for model, p in ((unrolled, params), (scanned, stacked))]
  np.testing.assert_array_equal(*tokens)
  assert layers.to_layout(stacked, scanned=False).keys() == params.keys()


def test_scanned_lora_and_imported_weights_equal_unrolled_ones():
  cfg = config_lib.base_config()
  cfg.lora.update(rank=4, targets="attn/(query|out)/kernel")
  model = _model(num_layers=3, scan_layers=True)
  adapted = params_lib.boxed(cfg, model, jax.random.PRNGKey(0))
  query = adapted["blocks"]["attn"]["query"]  # stacked, and split over devices by name
  assert query["lora_a"].value.shape == (3, 32, 4) and query["lora_a"].names[0] == "layers"
  assert query["lora_b"].value.shape == (3, 4, 2, 16)
  # The same seed draws the same model (adapters included) whether its layers scan or not.
  unrolled = params_lib.boxed(cfg, _model(num_layers=3), jax.random.PRNGKey(0))
  params = nn.meta.unbox(adapted)
  for x, y in zip(jax.tree.leaves(params),
                  jax.tree.leaves(layers.to_layout(nn.meta.unbox(unrolled), scanned=True))):
    np.testing.assert_array_equal(x, y)
  params = jax.tree.map(lambda x: x + 0.01, params)  # B no longer zero
  merged = layers.to_layout(lora.merge(params, 2.0), scanned=False)
  expected = lora.merge(layers.to_layout(params, scanned=False), 2.0)
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(expected)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  # Weights with numbered blocks (a Hugging Face import, an unrolled run) go into a scanned
  # model's stacked arrays.
  source = jax.tree.map(np.asarray, _init(_model(num_layers=3)))
  fresh = _init(model)
  placed = params_lib.place(fresh, jax.tree.map(lambda x: x.sharding, fresh), source, "source")
  for x, y in zip(jax.tree.leaves(placed), jax.tree.leaves(layers.to_layout(source, True))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("is_causal", [True, False])
def test_splash_attention_equals_xla(is_causal):
  # The TPU kernel, run by Pallas's interpreter here: causal (GPT, with documents packed into
  # a window: data.document_masks) or bidirectional (BERT), with right padding as fine-tuning
  # batches have. Outputs at real tokens and gradients equal the XLA formulation's.
  rng = np.random.default_rng(0)
  kv_heads = 2 if is_causal else 1  # bidirectional: also multi-query (1 key/value head of 2)
  q = jnp.asarray(rng.normal(size=(2, 128, 2, 32)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 128, kv_heads, 32)), jnp.float32) for _ in range(2))
  valid = np.ones((2, 128), bool)
  valid[0, 100:] = False
  documents = None
  if is_causal:  # the second example: documents of 50, 30 and 48 tokens
    documents = jnp.asarray(np.stack([np.zeros(128), np.searchsorted([50, 80], np.arange(128),
                                                                     side="right")]), jnp.int32)

  def attend(impl):
    def out(q, k, v):
      return attention.attend(q, k, v, jnp.asarray(valid)[:, None], is_causal, impl, documents)
    loss = lambda *qkv: jnp.mean(jnp.where(valid[..., None, None], out(*qkv), 0.0) ** 2)
    return jax.jit(out)(q, k, v)[valid], jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  (out, grads), (ref_out, ref_grads) = attend("splash"), attend("xla")
  np.testing.assert_allclose(out, ref_out, atol=2e-6)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, atol=1e-5 * float(jnp.abs(ref).max()))


def test_cudnn_attention_gets_the_mask_in_the_shape_it_takes(monkeypatch):
  # cuDNN (GPU only) takes a mask only as a bias of the scores' shape, [B, 1 or N, L, S]; a
  # padding mask of [B, 1, S] raised "Bias must have same seq length as QKV" on an H200. Here
  # jax.nn.dot_product_attention checks that shape, as cuDNN's check_layout does, then runs XLA's.
  real = jax.nn.dot_product_attention
  seen = []

  def like_cudnn(q, k, v, mask=None, implementation=None, **kwargs):
    if implementation == "cudnn":
      seen.append(mask.shape)
      assert mask.shape[2:] == (q.shape[1], k.shape[1]), mask.shape
    return real(q, k, v, mask=mask, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", like_cudnn)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 24, 4, 16)), jnp.bfloat16) for _ in range(3))
  valid_Bx1xS = jnp.arange(24)[None, None, :] < jnp.array([24, 17])[:, None, None]
  out = attention.attend(q, k, v, valid_Bx1xS, True, "cudnn")
  ref = attention.attend(q, k, v, valid_Bx1xS, True, "xla")
  assert seen == [(2, 1, 24, 24)]
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
