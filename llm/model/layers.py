"""Transformer layers shared by the model families: attention, MLP, the block.

Shapes are in the names: B batch, L query length, S key length (the KV cache's size when
decoding), D d_model, N heads, H head dim, F d_ff. Every parameter carries logical axis names
(`vocab`, `embed`, `heads`, `kv`, `mlp`) that the config's rules map onto the device mesh.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


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
  use_bias: bool = True
  ln_eps: float = 1e-5
  activation: str = "gelu_tanh"  # a key of ACTIVATIONS
  pre_ln: bool = True  # LayerNorm before each sublayer (GPT-2); False: after the residual (BERT)
  type_vocab_size: int = 2  # BERT's segment (token type) embeddings
  attention_impl: str = "xla"
  remat: str = "none"  # a key of REMAT_POLICIES: what each block keeps for the backward pass

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


# GPT-2 uses GELU's tanh approximation ("gelu_new" in transformers); BERT the exact one.
ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
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


def layer_norm(cfg: TransformerConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=cfg.ln_eps, dtype=cfg.dtype, use_bias=True, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


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
  def __call__(self, x_BxLxD, valid_BxL, deterministic: bool, decode: bool = False):
    """valid_BxL: False at padding (never attended to); None: every position is valid."""
    cfg = self.cfg
    N, H = cfg.num_heads, cfg.head_dim

    def proj(name):
      return Dense((cfg.d_model, N, H), ("embed", "heads", "kv"), num_out=2,
                   use_bias=cfg.use_bias, dtype=cfg.dtype, name=name)

    q_BxLxNxH, k_BxLxNxH, v_BxLxNxH = proj("query")(x_BxLxD), proj("key")(x_BxLxD), proj(
        "value")(x_BxLxD)

    if decode:
      k_BxSxNxH, v_BxSxNxH, mask_BxLxS = self._update_cache(k_BxLxNxH, v_BxLxNxH, valid_BxL)
      is_causal = False  # the mask already says which cache slots each query sees
    else:
      k_BxSxNxH, v_BxSxNxH = k_BxLxNxH, v_BxLxNxH
      mask_BxLxS = None if valid_BxL is None else valid_BxL[:, None, :]
      is_causal = self.causal

    out_BxLxNxH = jax.nn.dot_product_attention(
        q_BxLxNxH, k_BxSxNxH, v_BxSxNxH,
        mask=None if mask_BxLxS is None else mask_BxLxS[:, None], is_causal=is_causal,
        implementation=None if cfg.attention_impl == "xla" else cfg.attention_impl)
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
  cfg: TransformerConfig
  out_std: float = 0.02

  @nn.compact
  def __call__(self, x_BxLxD, deterministic: bool):
    cfg = self.cfg
    h_BxLxF = Dense((cfg.d_model, cfg.d_ff), ("embed", "mlp"), use_bias=cfg.use_bias,
                    dtype=cfg.dtype, name="wi")(x_BxLxD)
    h_BxLxF = nn.with_logical_constraint(ACTIVATIONS[cfg.activation](h_BxLxF),
                                         ("batch", "length", "mlp"))
    out_BxLxD = Dense((cfg.d_ff, cfg.d_model), ("mlp", "embed"), use_bias=cfg.use_bias,
                      std=self.out_std, dtype=cfg.dtype, name="wo")(h_BxLxF)
    return nn.Dropout(cfg.dropout)(out_BxLxD, deterministic=deterministic)


def make_blocks(cfg: TransformerConfig, causal: bool) -> list:
  """The stack's blocks, block_0 ... block_{L-1}; with `cfg.remat`, each recomputes in the
  backward pass what the policy does not save (same parameters, same gradients)."""
  block = Block
  if cfg.remat != "none":  # deterministic and decode are static (argument 0 is the module)
    block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(3, 4))
  return [block(cfg, causal=causal, name=f"block_{i}") for i in range(cfg.num_layers)]


class Block(nn.Module):
  """A transformer block. Pre-LN: x + attn(ln(x)), then x + mlp(ln(x)) (GPT-2).
  Post-LN: ln(x + attn(x)), then ln(x + mlp(x)) (BERT)."""
  cfg: TransformerConfig
  causal: bool = True

  @nn.compact
  def __call__(self, x_BxLxD, valid_BxL, deterministic: bool, decode: bool = False):
    cfg = self.cfg
    # GPT-2 scales the init of the projections into the residual stream by 1/sqrt(2 * layers).
    out_std = 0.02 / math.sqrt(2 * cfg.num_layers) if cfg.pre_ln else 0.02
    attn = Attention(cfg, self.causal, out_std, name="attn")
    mlp = MLP(cfg, out_std, name="mlp")
    ln_attn, ln_mlp = layer_norm(cfg, "ln_attn"), layer_norm(cfg, "ln_mlp")
    if cfg.pre_ln:
      x_BxLxD = x_BxLxD + attn(ln_attn(x_BxLxD), valid_BxL, deterministic, decode)
      x_BxLxD = x_BxLxD + mlp(ln_mlp(x_BxLxD), deterministic)
    else:
      x_BxLxD = ln_attn(x_BxLxD + attn(x_BxLxD, valid_BxL, deterministic, decode))
      x_BxLxD = ln_mlp(x_BxLxD + mlp(x_BxLxD, deterministic))
    return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
