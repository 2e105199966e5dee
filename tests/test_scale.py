"""Switches for size: rematerialised blocks, the cross-entropy in chunks and scanned layers give
the same losses, gradients and samples as the plain computation. For speed: the attention
kernels equal XLA's, and on the CPU a step reuses the host memory the last one freed."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import config as config_lib, objectives, params as params_lib, sampling
from llm import model as model_lib
from llm.model import attention, flash_cpu, layers, lora
from conftest import ROOT


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


@pytest.mark.parametrize("impl", ["flash", "blocked"])
@pytest.mark.parametrize("is_causal", [True, False])
def test_cpu_attention_equals_xla(impl, is_causal):
  # The CPU's fused kernel and its blocked formulation (query blocks of 64 over 200 positions:
  # the last block is short; head size 16, a fraction of a vector) against
  # jax.nn.dot_product_attention: grouped-query heads (4 of 2), padding at both ends,
  # documents packed into a window. Outputs at real tokens and gradients equal.
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(3, 200, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(3, 200, 2, 16)), jnp.float32) for _ in range(2))
  valid = np.ones((3, 200), bool)
  valid[0, 150:] = False  # right padding
  valid[1, :30] = False  # left padding (prompts): early queries see no key at all
  documents = jnp.asarray(np.searchsorted([70, 130], np.arange(200), side="right")[None]
                          * np.array([[0], [0], [1]]), jnp.int32)  # the third: 3 documents
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def attend(impl):
    def out(q, k, v):
      return attention.attend(q, k, v, jnp.asarray(valid)[:, None], is_causal, impl, documents)
    loss = lambda *qkv: jnp.sum(jnp.where(valid[..., None, None], out(*qkv) * w, 0.0))
    return jax.jit(out)(q, k, v)[valid], jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  (out, grads), (ref_out, ref_grads) = attend(impl), attend("xla")
  np.testing.assert_allclose(out, ref_out, atol=2e-6)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, atol=2e-6 * float(jnp.abs(ref).max()))
  assert attention.choose("auto", jnp.float32, 200, decode=False) == "flash"  # on CPU
  assert attention.choose("auto", jnp.bfloat16, 200, decode=False) == "blocked"
  assert attention.choose("auto", jnp.float32, 200, decode=True) == "xla"


@pytest.mark.parametrize("x_shape,kernel_shape,num_in", [
    ((2, 5, 8), (8, 3, 4), 1),  # a query projection: x smaller than dy, its transpose copied
    ((2, 5, 3, 4), (3, 4, 8), 2),  # the attention output's projection, two input dims
    ((2, 5, 16), (16, 6), 1)])  # an MLP's second product: dy smaller, its transpose copied
def test_cpu_product_equals_tensordot_with_gradients(x_shape, kernel_shape, num_in):
  # layers._cpu_product (what Dense runs on the CPU) makes the kernel gradient its own way.
  rng = np.random.default_rng(0)
  x, kernel = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x_shape, kernel_shape))
  out_shape = jax.eval_shape(lambda: jnp.tensordot(x, kernel, num_in)).shape
  w = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
  ours = jax.jit(jax.value_and_grad(
      lambda x, k: jnp.sum(layers._cpu_product(x, k, num_in) * w), argnums=(0, 1)))(x, kernel)
  ref = jax.value_and_grad(lambda x, k: jnp.sum(jnp.tensordot(x, k, num_in) * w),
                           argnums=(0, 1))(x, kernel)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6)
  for g, r in zip(ours[1], ref[1]):
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, atol=1e-5)


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


_FAULTS_PER_RUN = """
import resource, sys
from llm import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
@jax.jit
def f(x):  # y is a 64 MiB temporary, above glibc's largest threshold for a fresh mmap (32 MiB)
  y = jax.lax.optimization_barrier(jnp.sin(x))
  return jnp.sum(y * y)
x = jnp.ones(16 * 2**20)
f(x).block_until_ready()
faults = []
for _ in range(20):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, min(faults))
"""


def test_a_step_reuses_the_memory_the_last_one_freed():
  """XLA's CPU temporaries are one block per execution. After keep_freed_memory (what every
  entry point calls first) an execution soon faults in almost none of its pages again (the heap
  settles within a few); without it, every execution faults in all of them (16k pages of 4 KiB)."""
  runs = {way: subprocess.Popen([sys.executable, "-c", _FAULTS_PER_RUN, way], text=True,
                                stdout=subprocess.PIPE, cwd=ROOT)
          for way in ("keep", "default")}
  (kept, kept_faults), (_, default_faults) = (
      runs[way].communicate(timeout=120)[0].split() for way in ("keep", "default"))
  assert kept == "True"
  pages = 64 * 2**20 // 4096
  assert int(kept_faults) < 0.02 * pages < 0.5 * pages < int(default_faults)


def test_flash_kernel_is_built_once_per_machine_and_a_failed_build_says_why(tmp_path,
                                                                              monkeypatch):
  # The CPU kernel compiles into the cache on first use; the next use loads the same file. A
  # compiler that fails leaves nothing in the cache and names the source in its error.
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  library = flash_cpu._build()
  built_at = library.stat().st_mtime_ns
  assert library.parent == tmp_path / "cache" / "llm" and flash_cpu._build() == library
  assert library.stat().st_mtime_ns == built_at
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
  monkeypatch.setenv("CXX", "false")
  with pytest.raises(RuntimeError, match="building flash_attention_cpu.cc failed"):
    flash_cpu._build()
  assert not list((tmp_path / "elsewhere" / "llm").iterdir())
