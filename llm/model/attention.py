"""Scaled dot-product attention through the kernel each platform does best.

    out_BxLxNxH = attend(q_BxLxNxH, k_BxSxNxH, v_BxSxNxH, mask_BxLxS, is_causal, impl,
                         documents_BxL)

`impl` (model.attention_impl):
- "xla": jax.nn.dot_product_attention's XLA formulation, everywhere (the reference).
- "cudnn": cuDNN's fused flash attention (NVIDIA GPUs, float16 / bfloat16).
- "splash": the Pallas splash-attention kernel for TPUs (blocked, never materialises the
  L x S scores). Off TPU it runs in Pallas's interpreter: correct but slow, for tests.
- "auto": splash on TPU, cuDNN on GPU in half precision, XLA otherwise (the CPU included);
  XLA for KV-cache decoding and for lengths the fused kernels do not take.
"""

import contextlib
import contextvars

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "xla", "cudnn", "splash")
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
  return "xla"


def attend(q_BxLxNxH, k_BxSxNxH, v_BxSxNxH, mask_BxLxS, is_causal: bool, impl: str,
           documents_BxL=None):
  """Softmax(q k^T / sqrt(H)) v over the keys the mask (None: all), causality and the
  documents (None: one; else a query sees only keys of its own document, L = S) allow.

  Keys and values may have fewer heads than the queries (grouped-query attention: K divides N,
  and query head n reads key/value head n // (N / K)); their arrays are named ..NxH here all
  the same."""
  if impl == "splash":
    if mask_BxLxS is not None and mask_BxLxS.shape[1] != 1:
      raise ValueError("splash attention takes a padding mask ([B, 1, S]), not a full one")
    valid_BxS = None if mask_BxLxS is None else mask_BxLxS[:, 0]
    segments_BxS = None if documents_BxL is None else documents_BxL + 1  # 0: padding
    group = q_BxLxNxH.shape[2] // k_BxSxNxH.shape[2]  # grouped-query: each KV head N/K times
    k_BxSxNxH, v_BxSxNxH = (jnp.repeat(x, group, axis=2) for x in (k_BxSxNxH, v_BxSxNxH))
    return _splash(q_BxLxNxH, k_BxSxNxH, v_BxSxNxH, valid_BxS, is_causal, segments_BxS)
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
  partition a Pallas kernel over the mesh itself. Key/value heads that do not
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
