"""Checkpoint tensors by name, both ways: handed out with their shapes checked (`Tensors`), and a
parameter tree flattened to transformers-style float32 arrays (`flat_numpy`)."""

import numpy as np
from flax import traverse_util

from llm.errors import UserError


class Tensors:
  """Hands out checkpoint tensors by name, checking shapes; says which tensor is wrong."""

  def __init__(self, tensors: dict[str, np.ndarray], directory: str, ignore=()):
    self.tensors, self.directory = tensors, directory
    self.unused = {k for k in tensors if not k.endswith(tuple(ignore))}

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in self.tensors:
      raise UserError(f"{self.directory}: tensor {name} is missing (config.json expects it with "
                      f"shape {shape})")
    x = self.tensors[name]
    if x.shape != shape:
      raise UserError(f"{self.directory}: tensor {name} has shape {x.shape}, but config.json "
                      f"implies {shape}")
    self.unused.discard(name)
    return x

  def check_all_used(self) -> None:
    if self.unused:
      raise UserError(f"{self.directory}: tensor {sorted(self.unused)[0]} does not belong to the "
                      f"model config.json describes ({len(self.unused)} such tensors)")


def flat_numpy(params) -> dict[str, np.ndarray]:
  """{"block_0/attn/query/kernel": float32 array, ...}"""
  return {k: np.asarray(v, dtype=np.float32)
          for k, v in traverse_util.flatten_dict(params, sep="/").items()}
