"""Scaled dot-product attention through the kernel each platform does best.

    out_BxLxNxH = attend(q_BxLxNxH, k_BxSxNxH, v_BxSxNxH, mask_BxLxS, is_causal, impl,
                         documents_BxL)

`impl` (model.attention_impl):
- "xla": jax.nn.dot_product_attention's XLA formulation, everywhere (the reference).
- "flash": the project's fused flash attention for the CPU (flash_cpu.py: C++ behind XLA's
  FFI, built on first use), float32 self-attention. What "auto" runs on the CPU.
- "blocked": the same softmax written as heads-first einsums, one block of queries at a time;
  with causality a block reads only the keys up to its last query, which skips the upper
  triangle's work (3/8 of it at 4 blocks). Every platform; the CPU's when "flash" cannot run
  (no C++ compiler, half precision).
- "cudnn": cuDNN's fused flash attention (NVIDIA GPUs, float16 / bfloat16).
- "splash": the Pallas splash-attention kernel for TPUs (blocked, never materialises the
  L x S scores). Off TPU it runs in Pallas's interpreter: correct but slow, for tests.
- "auto": splash on TPU, cuDNN on GPU in half precision, flash (else blocked) on the CPU, XLA
  otherwise;
  XLA for KV-cache decoding and for lengths the fused kernels do not take.
"""

import contextlib
import contextvars
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm.model import flash_cpu

IMPLS = ("auto", "xla", "flash", "blocked", "cudnn", "splash")
QUERY_BLOCK = 64  # the blocked formulation's: fewer, larger einsums against more skipped keys
SPLASH_BLOCK = 128  # the splash kernel's block: sequence lengths must be multiples of it


_TARGET = contextvars.ContextVar("target_platform", default="")


@contextlib.contextmanager
def compiling_for(platform: str):
  """Traces attention for `platform` ("tpu") rather than the one this process runs on: ahead
  of time compilation for a TPU topology from a CPU machine (llm.bench --topology)."""
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)


def target_platform() -> str:
  return _TARGET.get() or jax.default_backend()


def choose(impl: str, dtype, length: int, decode: bool) -> str:
  """The kernel `attend` uses for `impl` on this platform; KV-cache decoding always XLA's
  (its mask is the cache's, not a padding mask the fused kernels take)."""
  if decode:
    return "xla"
  if impl != "auto":
    return impl
  platform = target_platform()
  if platform == "tpu" and length % SPLASH_BLOCK == 0:
    return "splash"
  if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  if platform == "cpu":
    return "flash" if jnp.dtype(dtype) == jnp.float32 and flash_cpu.available() else "blocked"
  return "xla"


def attend(q_BxLxNxH, k_BxSxNxH, v_BxSxNxH, mask_BxLxS, is_causal: bool, impl: str,
           documents_BxL=None):
  """Softmax(q k^T / sqrt(H)) v over the keys the mask (None: all), causality and the
  documents (None: one; else a query sees only keys of its own document, L = S) allow.

  Keys and values may have fewer heads than the queries (grouped-query attention: K divides N,
  and query head n reads key/value head n // (N / K)); their arrays are named ..NxH here all
  the same."""
  if impl in ("splash", "flash"):
    if mask_BxLxS is not None and mask_BxLxS.shape[1] != 1:
      raise ValueError(f"{impl} attention takes a padding mask ([B, 1, S]), not a full one")
    valid_BxS = None if mask_BxLxS is None else mask_BxLxS[:, 0]
  if impl == "flash":
    B, L = q_BxLxNxH.shape[:2]
    valid_BxS = jnp.ones((B, L), bool) if valid_BxS is None else valid_BxS
    documents_BxL = jnp.zeros((B, L), jnp.int32) if documents_BxL is None else documents_BxL
    kernel = lambda q, k, v, valid, documents: flash_cpu.attend(q, k, v, valid, is_causal,
                                                                 documents)
    return _per_shard(kernel, q_BxLxNxH, k_BxSxNxH, v_BxSxNxH, valid_BxS, documents_BxL)
  if impl == "splash":
    segments_BxS = None if documents_BxL is None else documents_BxL + 1  # 0: padding
    group = q_BxLxNxH.shape[2] // k_BxSxNxH.shape[2]  # grouped-query: each KV head N/K times
    k_BxSxNxH, v_BxSxNxH = (jnp.repeat(x, group, axis=2) for x in (k_BxSxNxH, v_BxSxNxH))
    return _splash(q_BxLxNxH, k_BxSxNxH, v_BxSxNxH, valid_BxS, is_causal, segments_BxS)
  if impl == "blocked":
    return _blocked(q_BxLxNxH, k_BxSxNxH, v_BxSxNxH, mask_BxLxS, is_causal, documents_BxL)
  if documents_BxL is not None:
    same_BxLxS = documents_BxL[:, :, None] == documents_BxL[:, None, :]
    mask_BxLxS = same_BxLxS if mask_BxLxS is None else mask_BxLxS & same_BxLxS
  if impl == "cudnn" and mask_BxLxS is not None:  # cuDNN takes a mask only as the scores' shape
    B, L, S = q_BxLxNxH.shape[0], q_BxLxNxH.shape[1], k_BxSxNxH.shape[1]
    mask_BxLxS = jnp.broadcast_to(mask_BxLxS, (B, L, S))
  return jax.nn.dot_product_attention(
      q_BxLxNxH, k_BxSxNxH, v_BxSxNxH,
      mask=None if mask_BxLxS is None else mask_BxLxS[:, None], is_causal=is_causal,
      implementation=None if impl == "xla" else impl)


def _blocked(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxLxS, is_causal: bool, documents_BxL,
             block: int = QUERY_BLOCK):
  """`attend` as jax.nn.dot_product_attention computes it (scores and softmax in float32, masked
  scores at a large negative number), one block of queries at a time; a causal block's keys
  stop at its last query. Causal attention is self-attention here (L = S)."""
  B, L, N, H = q_BxLxNxH.shape
  S, K = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
  if is_causal and S != L:
    raise ValueError(f"blocked causal attention is self-attention: {L} queries, {S} keys")
  spans = tuple((start, min(start + block, L), min(start + block, L) if is_causal else S)
                for start in range(0, L, block))  # (first query, query stop, keys seen)
  allowed = []  # [B or 1, Q, keys] per block: the keys each query may read
  for start, stop, keys in spans:
    allowed_BxQxS = jnp.ones((1, stop - start, keys), bool)
    if is_causal:
      allowed_BxQxS = jnp.arange(keys)[None, None, :] <= jnp.arange(start, stop)[None, :, None]
    if mask_BxLxS is not None:  # [B, 1, S] (padding) or [B, L, S]
      rows = slice(None) if mask_BxLxS.shape[1] == 1 else slice(start, stop)
      allowed_BxQxS = allowed_BxQxS & mask_BxLxS[:, rows, :keys]
    if documents_BxL is not None:
      allowed_BxQxS = allowed_BxQxS & (documents_BxL[:, start:stop, None]
                                       == documents_BxL[:, None, :keys])
    allowed.append(allowed_BxQxS)
  # Heads first, G = N / K query heads per key/value head: each product is a batched [B, K]
  # matmul over contiguous rows.
  scale = np.float32(1 / np.sqrt(H)).astype(q_BxLxNxH.dtype)  # exact when H is a power of 4
  q_BxKxGxLxH = (q_BxLxNxH * scale).reshape(B, L, K, N // K, H).transpose(0, 2, 3, 1, 4)
  k_BxKxSxH, v_BxKxSxH = (x.transpose(0, 2, 1, 3) for x in (k_BxSxKxH, v_BxSxKxH))
  out_BxKxGxLxH = _softmax_blocks(spans, q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, tuple(allowed))
  return out_BxKxGxLxH.transpose(0, 3, 1, 2, 4).reshape(B, L, N, H)


_NEGATIVE = np.float32(-0.7 * np.finfo(np.float32).max)  # jax.nn's score for a masked key
_mm = lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32)  # a @ b
_mm_nt = lambda a, b: jnp.einsum("...ik,...jk->...ij", a, b,
                                 preferred_element_type=jnp.float32)  # a @ b^T
_T = lambda x: jnp.swapaxes(x, -1, -2)


def _transposed(x):
  """x^T written out, so that a product with it stays a plain matmul: XLA would otherwise fold
  the transpose into the product (a^T @ b), which the CPU runs in a slower, generic kernel."""
  return jax.lax.optimization_barrier(_T(x))


def _forward_blocks(spans, q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, allowed):
  """The output and each block's probabilities ([B, K, R, keys], R = G x its queries)."""
  B, K, G, L, H = q_BxKxGxLxH.shape
  outs, probs = [], []
  for (start, stop, keys), allowed_BxQxS in zip(spans, allowed):
    q_BxKxRxH = q_BxKxGxLxH[:, :, :, start:stop].reshape(B, K, G * (stop - start), H)
    logits = _mm_nt(q_BxKxRxH, k_BxKxSxH[:, :, :keys]).reshape(B, K, G, stop - start, keys)
    logits = jnp.where(allowed_BxQxS[:, None, None], logits, _NEGATIVE)
    probs_BxKxRxS = jax.nn.softmax(logits, axis=-1).reshape(B, K, -1, keys)
    out_BxKxRxH = _mm(probs_BxKxRxS.astype(v_BxKxSxH.dtype), v_BxKxSxH[:, :, :keys])
    outs.append(out_BxKxRxH.reshape(B, K, G, -1, H))
    probs.append(probs_BxKxRxS)
  out_BxKxGxLxH = jnp.concatenate(outs, axis=3)
  return out_BxKxGxLxH.astype(v_BxKxSxH.dtype), probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _softmax_blocks(spans, q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, allowed):
  """softmax(q k^T) v over each span's queries and keys (q already scaled), [B, K, G, L, H].
  Its own backward pass: the softmax's gradient from the row sums of dout * out (over H rather
  than over the keys), and products in the forms the CPU's matmul kernels run fastest."""
  return _forward_blocks(spans, q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, allowed)[0]


def _softmax_blocks_fwd(spans, q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, allowed):
  out_BxKxGxLxH, probs = _forward_blocks(spans, q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, allowed)
  return out_BxKxGxLxH, (q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, out_BxKxGxLxH, probs)


def _softmax_blocks_bwd(spans, residuals, dout_BxKxGxLxH):
  q_BxKxGxLxH, k_BxKxSxH, v_BxKxSxH, out_BxKxGxLxH, probs = residuals
  B, K, G, L, H = q_BxKxGxLxH.shape
  S = v_BxKxSxH.shape[2]
  # d softmax: p * (dp - sum_s p dp), and sum_s p dp = sum_h dout * out.
  delta_BxKxGxLx1 = jnp.sum(dout_BxKxGxLxH.astype(jnp.float32) * out_BxKxGxLxH, -1,
                            keepdims=True)
  dq, dkT_BxKxHxS, dvT_BxKxHxS = [], 0, 0
  for (start, stop, keys), probs_BxKxRxS in zip(spans, probs):
    rows = lambda x: x[:, :, :, start:stop].reshape(B, K, -1, x.shape[-1])
    dout_BxKxRxH = rows(dout_BxKxGxLxH)
    dprobs_BxKxRxS = _mm_nt(dout_BxKxRxH, v_BxKxSxH[:, :, :keys])
    dlogits_BxKxRxS = (probs_BxKxRxS * (dprobs_BxKxRxS - rows(delta_BxKxGxLx1))).astype(
        q_BxKxGxLxH.dtype)
    dq.append(_mm(dlogits_BxKxRxS, k_BxKxSxH[:, :, :keys]).reshape(B, K, G, -1, H))
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, S - keys)))  # keys seen -> S
    dkT_BxKxHxS = dkT_BxKxHxS + pad(_mm(_transposed(rows(q_BxKxGxLxH)), dlogits_BxKxRxS))
    dvT_BxKxHxS = dvT_BxKxHxS + pad(_mm(_transposed(dout_BxKxRxH),
                                        probs_BxKxRxS.astype(dout_BxKxRxH.dtype)))
  dq_BxKxGxLxH = jnp.concatenate(dq, axis=3)
  return (dq_BxKxGxLxH.astype(q_BxKxGxLxH.dtype), _T(dkT_BxKxHxS).astype(k_BxKxSxH.dtype),
          _T(dvT_BxKxHxS).astype(v_BxKxSxH.dtype), None)


_softmax_blocks.defvjp(_softmax_blocks_fwd, _softmax_blocks_bwd)


def _splash(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, valid_BxL, is_causal: bool, segments_BxL=None):
  """Splash attention, split over the mesh by batch and heads (each device runs the kernel on
  its own share: a Pallas kernel is not partitioned by XLA). Tokens attend within their segment
  (`segments_BxL`, from 1; None: one); padding is segment 0, so real tokens never see it."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  B, L, N, H = q_BxLxNxH.shape
  if L % SPLASH_BLOCK:
    raise ValueError(f"splash attention needs a sequence length that is a multiple of "
                     f"{SPLASH_BLOCK}, not {L}; use model.attention_impl=auto or xla")
  if valid_BxL is None:
    valid_BxL = jnp.ones((B, L), bool)
  q_BxLxNxH = q_BxLxNxH / np.sqrt(H).astype(q_BxLxNxH.dtype)  # the kernel does not scale

  def local(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segments_BxL):
    kernel = _splash_kernel(q_BxLxNxH.shape[2], L, is_causal, target_platform() != "tpu")
    to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # the kernel's [N, L, H] per example
    out_BxNxLxH = jax.vmap(kernel)(
        to_heads_first(q_BxLxNxH), to_heads_first(k_BxLxNxH), to_heads_first(v_BxLxNxH),
        segment_ids=sk.SegmentIds(q=segments_BxL, kv=segments_BxL))
    return to_heads_first(out_BxNxLxH)

  if segments_BxL is None:
    segments_BxL = jnp.ones((B, L), jnp.int32)
  segments_BxL = jnp.where(valid_BxL, segments_BxL, 0).astype(jnp.int32)
  return _per_shard(local, q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segments_BxL)


def _per_shard(kernel, q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, *per_token_BxL):
  """kernel(q, k, v, *per_token) on each device's share of the batch and the heads: XLA does not
  partition a custom kernel (Pallas, FFI) over the mesh itself. Key/value heads that do not
  split like the query heads (fewer than the devices along their axis) are repeated first."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, *per_token_BxL)
  spec_q = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
  spec_kv = nn.logical_to_mesh_axes(("batch", "length", "kv_heads", "kv"))
  axes = spec_kv[2] if isinstance(spec_kv[2], tuple) else (spec_kv[2],)
  if k_BxSxKxH.shape[2] % np.prod([mesh.shape[a] for a in axes if a is not None]):
    group = q_BxLxNxH.shape[2] // k_BxSxKxH.shape[2]
    k_BxSxKxH, v_BxSxKxH = (jnp.repeat(x, group, axis=2) for x in (k_BxSxKxH, v_BxSxKxH))
    spec_kv = spec_q
  spec_BxL = nn.logical_to_mesh_axes(("batch", "length"))
  return jax.shard_map(kernel, mesh=mesh,
                       in_specs=(spec_q, spec_kv, spec_kv) + (spec_BxL,) * len(per_token_BxL),
                       out_specs=spec_q, check_vma=False)(
                           q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, *per_token_BxL)


def _splash_kernel(num_heads: int, length: int, is_causal: bool, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  mask = sm.CausalMask((length, length)) if is_causal else sm.FullMask((length, length))
  return sk.make_splash_mha(sm.MultiHeadMask([mask] * num_heads), head_shards=1,
                            q_seq_shards=1, interpret=interpret)
