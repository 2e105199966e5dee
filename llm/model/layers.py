"""Transformer layers shared by the model families: attention, MLP, the block.

Shapes are in the names: B batch, L query length, S key length (the KV cache's size when
decoding), D d_model, N query heads, K key/value heads, H head dim, F d_ff. Every parameter
carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `kv`, `mlp`) that the
config's rules map onto the device mesh.

The blocks of current models are switches of the same code: positions (learned, sinusoidal,
rotary, none), the norm (LayerNorm, RMSNorm), the MLP (plain or gated: SwiGLU with SiLU) and
grouped-query attention (K < N key/value heads), and a mixture of experts in place of the MLP
(moe.py).
"""

import dataclasses
import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm.model import attention
from llm.model.moe import COLLECTION as MOE_COLLECTION, MoE, MoEConfig


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """The shape of a transformer stack; built from the run config's `model` section."""
  vocab_size: int
  max_len: int
  num_layers: int
  num_heads: int
  d_model: int
  d_ff: int
  dropout: float = 0.0
  dtype: Any = jnp.float32  # compute dtype; parameters are float32
  tie_embeddings: bool = True
  use_bias: bool = True  # biases in every projection
  qkv_bias: bool = False  # biases in the query, key and value projections even without use_bias
  ln_eps: float = 1e-5
  activation: str = "gelu_tanh"  # a key of ACTIVATIONS
  norm: str = "layernorm"  # or "rmsnorm"
  mlp: str = "plain"  # activation(x W_in) W_out; "gated": (activation(x W_gate) * x W_in) W_out
  num_kv_heads: int = 0  # key/value heads (grouped-query attention); 0: num_heads
  positions: str = "learned"  # a key of POSITIONS
  rope_theta: float = 10000.0
  rope_scaling: tuple = ()  # Llama 3's: (factor, low_freq_factor, high_freq_factor,
  #                                       original context); empty: none
  pre_ln: bool = True  # LayerNorm before each sublayer (GPT-2); False: after the residual (BERT)
  type_vocab_size: int = 2  # BERT's segment (token type) embeddings
  attention_impl: str = "auto"  # a key of attention.IMPLS
  remat: str = "none"  # a key of REMAT_POLICIES: what each block keeps for the backward pass
  scan_layers: bool = False  # the blocks as one nn.scan over stacked parameters (see make_blocks)
  qk_norm: bool = False  # RMSNorm over each head's queries and keys before rotation (Qwen3)
  moe: MoEConfig = MoEConfig()  # routed experts in place of some blocks' MLP (moe.py)

  head_dim: int = 0  # each head's width; 0: d_model / num_heads (set so after init)

  def __post_init__(self):
    object.__setattr__(self, "head_dim", self.head_dim or self.d_model // self.num_heads)

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads


# GPT-2 uses GELU's tanh approximation ("gelu_new" in transformers); BERT the exact one.
ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,  # the gated MLP's SwiGLU (Llama)
}

MLPS = ("plain", "gated")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = {
    "learned": "a trained embedding per position, added to the tokens' (GPT-2, BERT)",
    "sinusoidal": "the original transformer's fixed sines and cosines, added to the tokens'",
    "rope": "rotary: queries and keys rotated by their position (Llama)",
    "none": "no position information (NoPE; causal attention still orders the tokens)",
}


# What a block saves for the backward pass; the rest is recomputed there (MaxText's choices).
REMAT_POLICIES = {
    "none": None,  # everything: no recomputation
    "full": jax.checkpoint_policies.nothing_saveable,  # only the block's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # the matmul outputs
}


def dense_init(std: float = 0.02):
  return nn.initializers.normal(stddev=std)


class Dense(nn.Module):
  """x @ kernel + bias, contracting x's last `len(shape) - len(out_axes)` dimensions.

  The kernel is float32 and named by logical axes; the product runs in the compute dtype.
  """
  shape: tuple[int, ...]  # the kernel's: input dims, then output dims
  axes: tuple[str | None, ...]  # a logical name per kernel dim
  num_out: int = 1  # how many trailing kernel dims are outputs
  use_bias: bool = True
  std: float = 0.02
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.with_logical_partitioning(dense_init(self.std), self.axes),
                        self.shape, jnp.float32)
    num_in = len(self.shape) - self.num_out
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=num_in)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.axes[num_in:]),
                        self.shape[num_in:], jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def norm(cfg: TransformerConfig, name: str) -> nn.Module:
  """`cfg.norm`: LayerNorm (scale and bias) or RMSNorm (scale only)."""
  return Norm(centred=cfg.norm == "layernorm", eps=cfg.ln_eps, dtype=cfg.dtype, name=name)


class Norm(nn.Module):
  """LayerNorm ((x - mean) / std * scale + bias) or, not `centred`, RMSNorm (x / rms * scale),
  over the last axis in float32, whatever the compute and parameter dtypes; parameters named as
  flax's LayerNorm and RMSNorm name them. Its backward pass is the one fused norm kernels
  compute, written out (`_normalize`): the same code on every backend, where XLA's derivation
  makes more passes over x (on the CPU the baby GPT's whole step is 1.25x faster with it;
  docs/performance.md)."""
  centred: bool = True
  eps: float = 1e-5
  dtype: Any = jnp.float32
  axis_name: str = "embed"  # the normalised axis's logical name

  @nn.compact
  def __call__(self, x):
    param = lambda name, init: self.param(
        name, nn.with_logical_partitioning(init, (self.axis_name,)), x.shape[-1:], jnp.float32)
    scale = param("scale", nn.initializers.ones)
    bias = param("bias", nn.initializers.zeros) if self.centred else jnp.zeros_like(scale)
    f32 = lambda a: a.astype(jnp.float32)  # whatever the parameters' dtype (model.param_dtype)
    return _normalize(f32(x), f32(scale), f32(bias), self.eps, self.centred).astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize(x, scale, bias, eps: float, centred: bool):
  return _normalize_fwd(x, scale, bias, eps, centred)[0]


def _normalize_fwd(x, scale, bias, eps: float, centred: bool):
  centred_x = x - jnp.mean(x, -1, keepdims=True) if centred else x
  inv_std = jax.lax.rsqrt(jnp.mean(centred_x * centred_x, -1, keepdims=True) + eps)
  normed = centred_x * inv_std
  return normed * scale + bias, (normed, inv_std, scale)


def _normalize_bwd(eps: float, centred: bool, residuals, dy):
  normed, inv_std, scale = residuals
  batch_axes = tuple(range(dy.ndim - 1))
  dnormed = dy * scale
  # d/dx of (x - mean) / std: the gradient less its mean (LayerNorm only) and less its
  # component along the normalised x.
  dx = dnormed - normed * jnp.mean(dnormed * normed, -1, keepdims=True)
  if centred:
    dx = dx - jnp.mean(dnormed, -1, keepdims=True)
  return inv_std * dx, jnp.sum(dy * normed, batch_axes), jnp.sum(dy, batch_axes)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def sinusoidal(positions_BxL, d_model: int):
  """The original transformer's position encoding: sin and cos of position / 10000^(2i/D)."""
  inv_freq_D2 = 1.0 / 10000 ** (jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)
  angles_BxLxD2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_D2
  return jnp.stack([jnp.sin(angles_BxLxD2), jnp.cos(angles_BxLxD2)], -1).reshape(
      *positions_BxL.shape, d_model)


def rope_frequencies(cfg: TransformerConfig):
  """The rotation speed of each pair of head dims, inv_freq_H2; with `rope_scaling`, Llama 3's
  stretch of the slow ones (long wavelengths) for a longer context."""
  H = cfg.head_dim
  inv_freq_H2 = 1.0 / cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H)
  if cfg.rope_scaling:
    factor, low, high, original = cfg.rope_scaling
    wavelength_H2 = 2 * np.pi / inv_freq_H2
    smooth_H2 = np.clip((original / wavelength_H2 - low) / (high - low), 0.0, 1.0)
    inv_freq_H2 = (1 - smooth_H2) * inv_freq_H2 / factor + smooth_H2 * inv_freq_H2
  return jnp.asarray(inv_freq_H2, jnp.float32)


def rope(x_BxLxNxH, positions_BxL, inv_freq_H2):
  """Rotates each pair (i, i + H/2) of head dims by position x inv_freq[i] (the "rotate half"
  layout of Hugging Face's Llama), so q . k depends on the distance between the positions."""
  angles_BxLx1xH = jnp.concatenate([positions_BxL[..., None].astype(jnp.float32)
                                    * inv_freq_H2] * 2, -1)[:, :, None, :]
  first, second = jnp.split(x_BxLxNxH, 2, axis=-1)
  rotated_BxLxNxH = jnp.concatenate([-second, first], axis=-1)
  x = x_BxLxNxH.astype(jnp.float32)
  out = x * jnp.cos(angles_BxLx1xH) + rotated_BxLxNxH.astype(jnp.float32) * jnp.sin(
      angles_BxLx1xH)
  return out.astype(x_BxLxNxH.dtype)


class Attention(nn.Module):
  """Multi-head self-attention, causal or bidirectional, with a padding mask and a KV cache.

  With `decode=True` the keys and values of every call are written into a cache of fixed size
  (the `cache` collection, created at init with the cache's shape), so a prompt runs once and
  each new token then costs one position.
  """
  cfg: TransformerConfig
  causal: bool = True
  out_std: float = 0.02

  @nn.compact
  def __call__(self, x_BxLxD, valid_BxL, positions_BxL, documents_BxL, deterministic: bool,
               decode: bool = False):
    """valid_BxL: False at padding (never attended to); None: every position is valid.
    positions_BxL: each token's position (rotary positions only).
    documents_BxL: each token's document in a packed window (a token attends only to its own
    document's); None: one sequence."""
    cfg = self.cfg
    N, K, H = cfg.num_heads, cfg.kv_heads, cfg.head_dim

    def proj(name, heads, axis):
      return Dense((cfg.d_model, heads, H), ("embed", axis, "kv"), num_out=2,
                   use_bias=cfg.use_bias or cfg.qkv_bias, dtype=cfg.dtype, name=name)

    q_BxLxNxH = proj("query", N, "heads")(x_BxLxD)
    k_BxLxKxH = proj("key", K, "kv_heads")(x_BxLxD)
    v_BxLxKxH = proj("value", K, "kv_heads")(x_BxLxD)
    if cfg.qk_norm:  # over the head dim, one scale per dim shared by the heads
      q_BxLxNxH = Norm(centred=False, eps=cfg.ln_eps, dtype=cfg.dtype, axis_name="kv",
                       name="query_norm")(q_BxLxNxH)
      k_BxLxKxH = Norm(centred=False, eps=cfg.ln_eps, dtype=cfg.dtype, axis_name="kv",
                       name="key_norm")(k_BxLxKxH)
    if cfg.positions == "rope":
      inv_freq_H2 = rope_frequencies(cfg)
      q_BxLxNxH = rope(q_BxLxNxH, positions_BxL, inv_freq_H2)
      k_BxLxKxH = rope(k_BxLxKxH, positions_BxL, inv_freq_H2)

    if decode:  # the cache holds the K key/value heads only
      k_BxSxKxH, v_BxSxKxH, mask_BxLxS = self._update_cache(k_BxLxKxH, v_BxLxKxH, valid_BxL)
      is_causal = False  # the mask already says which cache slots each query sees
    else:
      k_BxSxKxH, v_BxSxKxH = k_BxLxKxH, v_BxLxKxH
      mask_BxLxS = None if valid_BxL is None else valid_BxL[:, None, :]
      is_causal = self.causal

    # Initialisation traces a one-token input: any kernel gives the same parameters.
    impl = "xla" if self.is_initializing() else attention.choose(
        cfg.attention_impl, cfg.dtype, x_BxLxD.shape[1], decode)
    # Each group of N / K query heads reads one key/value head.
    out_BxLxNxH = attention.attend(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxLxS, is_causal,
                                   impl, None if decode else documents_BxL)
    out_BxLxD = Dense((N, H, cfg.d_model), ("heads", "kv", "embed"), use_bias=cfg.use_bias,
                      std=self.out_std, dtype=cfg.dtype, name="out")(out_BxLxNxH)
    return nn.Dropout(cfg.dropout)(out_BxLxD, deterministic=deterministic)

  def _update_cache(self, k_BxLxNxH, v_BxLxNxH, valid_BxL):
    """Writes this call's keys and values at the cache's index; returns the whole cache.

    Decoding is causal: a query sees the valid cache slots up to its own.
    """
    if valid_BxL is None:
      valid_BxL = jnp.ones(k_BxLxNxH.shape[:2], bool)
    is_init = not self.has_variable("cache", "cached_key")
    key = self.variable("cache", "cached_key", jnp.zeros, k_BxLxNxH.shape, k_BxLxNxH.dtype)
    value = self.variable("cache", "cached_value", jnp.zeros, v_BxLxNxH.shape, v_BxLxNxH.dtype)
    valid = self.variable("cache", "valid", jnp.zeros, valid_BxL.shape, bool)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if is_init:  # init only allocates: the shapes given at init are the cache's size
      return k_BxLxNxH, v_BxLxNxH, jnp.ones(valid_BxL.shape[:1] + (1, valid_BxL.shape[1]), bool)
    i, L, S = index.value, k_BxLxNxH.shape[1], key.value.shape[1]
    key.value = jax.lax.dynamic_update_slice(key.value, k_BxLxNxH.astype(key.value.dtype),
                                             (0, i, 0, 0))
    value.value = jax.lax.dynamic_update_slice(value.value, v_BxLxNxH.astype(value.value.dtype),
                                               (0, i, 0, 0))
    valid.value = jax.lax.dynamic_update_slice(valid.value, valid_BxL, (0, i))
    index.value = i + L
    # A query at slot i + l sees the filled, valid slots up to itself.
    slot_q_L = i + jnp.arange(L)
    seen_LxS = jnp.arange(S)[None, :] <= slot_q_L[:, None]
    mask_BxLxS = seen_LxS[None] & valid.value[:, None, :]
    return key.value, value.value, mask_BxLxS


class MLP(nn.Module):
  """Plain: activation(x W_in) W_out. Gated: (activation(x W_gate) * x W_in) W_out, SwiGLU
  with SiLU (Llama)."""
  cfg: TransformerConfig
  out_std: float = 0.02

  @nn.compact
  def __call__(self, x_BxLxD, deterministic: bool):
    cfg = self.cfg

    def proj(name):
      return Dense((cfg.d_model, cfg.d_ff), ("embed", "mlp"), use_bias=cfg.use_bias,
                   dtype=cfg.dtype, name=name)(x_BxLxD)

    h_BxLxF = ACTIVATIONS[cfg.activation](proj("wg" if cfg.mlp == "gated" else "wi"))
    if cfg.mlp == "gated":
      h_BxLxF = h_BxLxF * proj("wi")
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
    out_BxLxD = Dense((cfg.d_ff, cfg.d_model), ("mlp", "embed"), use_bias=cfg.use_bias,
                      std=self.out_std, dtype=cfg.dtype, name="wo")(h_BxLxF)
    return nn.Dropout(cfg.dropout)(out_BxLxD, deterministic=deterministic)


def make_blocks(cfg: TransformerConfig, causal: bool) -> list:
  """The stack's blocks; `run_blocks` calls them in turn.

  Unrolled (default): modules block_0 ... block_{L-1}, each traced and compiled on its own.
  Scanned (`cfg.scan_layers`): one module `blocks` run by nn.scan, whose parameters and KV cache
  carry a leading `layers` axis; the step compiles one block whatever the depth. `to_layout`
  converts parameters (and optimizer states, checkpoints) between the two.
  With `cfg.remat`, each block recomputes in the backward pass what the policy does not save
  (same parameters, same gradients).
  """
  block = Block
  if cfg.remat != "none":  # deterministic and decode are static (argument 0 is the module)
    block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(5, 6))
  if not cfg.scan_layers:
    return [block(cfg, causal=causal, layer=i, name=f"block_{i}") for i in range(cfg.num_layers)]
  # Scanned blocks are alike (config.validate): all MoE or none.
  block = nn.scan(block, variable_axes={"params": 0, "cache": 0, MOE_COLLECTION: 0},
                  split_rngs={"params": True, "dropout": True},
                  in_axes=(nn.broadcast,) * 5, length=cfg.num_layers,
                  metadata_params={nn.PARTITION_NAME: "layers"})
  return [block(cfg, causal=causal, layer=cfg.num_layers - 1, scanned=True, name=SCANNED)]


def run_blocks(blocks: list, x_BxLxD, valid_BxL, positions_BxL, deterministic: bool,
               decode: bool, documents_BxL=None):
  """x through `make_blocks`'s blocks in turn."""
  for block in blocks:
    x_BxLxD = block(x_BxLxD, valid_BxL, positions_BxL, documents_BxL, deterministic, decode)
    if block.scanned:
      x_BxLxD = x_BxLxD[0]  # nn.scan's (carry, per-layer outputs)
  return x_BxLxD


SCANNED = "blocks"  # the scanned stack's name; unrolled blocks are block_0, block_1, ...


def _holds_blocks(node) -> bool:
  return isinstance(node, dict) and (SCANNED in node or "block_0" in node)


def is_scanned(tree) -> bool | None:
  """Whether a parameter tree (or anything holding one: a train state, a checkpoint's metadata)
  has its blocks scanned; None when it holds no blocks."""
  holders = [n for n in jax.tree.leaves(tree, is_leaf=_holds_blocks) if _holds_blocks(n)]
  return SCANNED in holders[0] if holders else None


def to_layout(tree, scanned: bool):
  """`tree` with its blocks stacked into `blocks` (scanned) or split into block_0 ... (unrolled).

  Works on parameters and on whatever holds them (optimizer states, a whole train state), with
  leaves that are numpy arrays, jax arrays (inside jit for sharded ones), ShapeDtypeStructs
  (whose shardings gain or lose the leading, unsharded `layers` axis) or boxes with logical
  axis names (which gain or lose `layers`). Already in that layout: returned as it is.
  """
  def convert(node: dict) -> dict:
    node = dict(node)
    if scanned and "block_0" in node:
      num_layers = sum(1 for k in node if re.fullmatch(r"block_\d+", k))
      layers = [node.pop(f"block_{i}") for i in range(num_layers)]
      return {**node, SCANNED: jax.tree.map(_stack, *layers, is_leaf=_is_box)}
    if not scanned and SCANNED in node:
      stacked = node.pop(SCANNED)
      num_layers = jax.tree.leaves(stacked)[0].shape[0]
      return {**node, **{f"block_{i}": jax.tree.map(lambda x: _index(x, i), stacked,
                                                    is_leaf=_is_box)
                         for i in range(num_layers)}}
    return node
  return jax.tree.map(lambda node: convert(node) if _holds_blocks(node) else node, tree,
                      is_leaf=_holds_blocks)


_is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
_LAYERS_AXIS = {nn.PARTITION_NAME: "layers"}


def _stack(*xs):
  x = xs[0]
  if _is_box(x):
    return x.replace(value=_stack(*(box.value for box in xs))).add_axis(0, _LAYERS_AXIS)
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(xs),) + x.shape, x.dtype,
                                sharding=_respec(x.sharding, lambda spec: (None, *spec)))
  return (np if isinstance(x, np.ndarray) else jnp).stack(xs)


def _index(x, i: int):
  if _is_box(x):
    return x.remove_axis(0, _LAYERS_AXIS).replace(value=_index(x.value, i))
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype,
                                sharding=_respec(x.sharding, lambda spec: tuple(spec)[1:]))
  return x[i]


def _respec(sharding, change):
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
      *change(sharding.spec)))


class Block(nn.Module):
  """A transformer block. Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)) (GPT-2, Llama).
  Post-norm: norm(x + attn(x)), then norm(x + mlp(x)) (BERT)."""
  cfg: TransformerConfig
  causal: bool = True
  layer: int = 0  # its index in the stack: whether its MLP is a mixture of experts
  scanned: bool = False  # a step of nn.scan: returns (x, None)

  @nn.compact
  def __call__(self, x_BxLxD, valid_BxL, positions_BxL, documents_BxL, deterministic: bool,
               decode: bool = False):
    cfg = self.cfg
    # GPT-2 scales the init of the projections into the residual stream by 1/sqrt(2 * layers).
    out_std = 0.02 / math.sqrt(2 * cfg.num_layers) if cfg.pre_ln else 0.02
    attn = Attention(cfg, self.causal, out_std, name="attn")
    is_moe = cfg.moe.is_moe(self.layer)
    parts = [MoE(cfg, ACTIVATIONS[cfg.activation], out_std, name="mlp") if is_moe
             else MLP(cfg, out_std, name="mlp")]
    if is_moe and cfg.moe.num_shared_experts:  # always-on experts: one MLP as wide as they are
      F = cfg.moe.num_shared_experts * (cfg.moe.expert_d_ff or cfg.d_ff)
      parts.append(MLP(dataclasses.replace(cfg, d_ff=F), out_std, name="shared_mlp"))
    mlp = lambda x, deterministic: sum(part(x, deterministic) for part in parts)
    ln_attn, ln_mlp = norm(cfg, "ln_attn"), norm(cfg, "ln_mlp")
    if cfg.pre_ln:
      x_BxLxD = x_BxLxD + attn(ln_attn(x_BxLxD), valid_BxL, positions_BxL, documents_BxL,
                             deterministic, decode)
      x_BxLxD = x_BxLxD + mlp(ln_mlp(x_BxLxD), deterministic)
    else:
      x_BxLxD = ln_attn(x_BxLxD + attn(x_BxLxD, valid_BxL, positions_BxL, documents_BxL,
                                         deterministic, decode))
      x_BxLxD = ln_mlp(x_BxLxD + mlp(x_BxLxD, deterministic))
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    return (x_BxLxD, None) if self.scanned else x_BxLxD
