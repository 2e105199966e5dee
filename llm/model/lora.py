"""LoRA (Hu et al. 2021): a frozen kernel W plus a trainable low-rank update (alpha / r) A @ B.

The adapters live in the parameter tree beside the kernel they adapt:

    {"query": {"kernel": W [D, N, H], "lora_a": A [D, r], "lora_b": B [r, N, H], "bias": ...}}

A mixture's experts ([E, D, F], lora.targets matching experts_wi ...) get an adapter each:
A [E, D, r], B [E, r, F].

`add` puts them there (A random, B zero: the model starts exactly as the base), and `merge`
folds them into the kernels, giving the plain tree the model's `apply` takes. So LoRA works on
every module of every family without touching the layers, and a merged checkpoint is the
base model's layout. Scanned blocks (model.scan_layers) stack every kernel and both its adapters
along a leading `layers` axis. Merging per step costs about r / (batch x length) of the forward
pass.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

A, B = "lora_a", "lora_b"


BATCH_AXES = ("layers", "expert")  # leading kernel dims that hold one matrix each (experts)


def _num_batch(names: tuple) -> int:
  """How many leading kernel dims index separate matrices: a mixture's experts, each adapted
  on its own."""
  return next((i for i, n in enumerate(names) if n not in BATCH_AXES), len(names))


def _num_in(names: tuple) -> int:
  """How many kernel dims after the batch ones are inputs: all but the last, unless that one is
  `embed` (the output projections, [heads, kv, embed] or [mlp, embed])."""
  return len(names) - _num_batch(names) - 1 if names[-1] == "embed" else 1


def add(boxed_params, rank: int, targets: str, rng):
  """Adapters for every kernel whose path ('block_0/attn/query/kernel') matches `targets`.

  `boxed_params` carry logical axis names (nn.with_logical_partitioning), which say which
  kernel dims are inputs.
  """
  pattern = re.compile(targets)
  flat = traverse_util.flatten_dict(boxed_params, sep="/")
  matched = [p for p in flat if pattern.search(p) and p.endswith("/kernel")]
  for i, path in enumerate(matched):
    kernel = flat[path]
    names = kernel.names
    shape = kernel.value.shape
    nb = _num_batch(names)
    k = nb + _num_in(names)
    fan_in = int(np.prod(shape[nb:k]))
    key = jax.random.fold_in(rng, i)
    a = jax.random.uniform(key, shape[:k] + (rank,), jnp.float32, -1.0, 1.0) / np.sqrt(fan_in)
    module = path[:-len("/kernel")]
    # The kernel's own box type (logical names), so the adapters shard like their kernel.
    flat[f"{module}/{A}"] = kernel.replace(value=a, names=names[:k] + (None,))
    flat[f"{module}/{B}"] = kernel.replace(
        value=jnp.zeros(shape[:nb] + (rank,) + shape[k:], jnp.float32),
        names=names[:nb] + (None,) + names[k:])
  return traverse_util.unflatten_dict(flat, sep="/"), len(matched)


def merge(params, scale: float):
  """The tree without adapters: each adapted kernel becomes W + scale * A @ B."""
  flat = traverse_util.flatten_dict(params, sep="/")
  if not any(p.endswith(A) for p in flat):
    return params
  merged = {}
  for path, value in flat.items():
    module, _, leaf = path.rpartition("/")
    if leaf in (A, B):
      continue
    if leaf == "kernel" and f"{module}/{A}" in flat:
      a, b = flat[f"{module}/{A}"], flat[f"{module}/{B}"]
      product = lambda a, b: jnp.tensordot(a, b, axes=1)  # [in..., r] x [r, out...]
      # Leading axes on all three (scanned blocks' layers, experts): a product per matrix.
      for _ in range(a.ndim + b.ndim - 2 - value.ndim):
        product = jax.vmap(product)
      delta = product(a, b)
      value = value + scale * delta.astype(value.dtype)
    merged[path] = value
  return traverse_util.unflatten_dict(merged, sep="/")
