"""The token stream cut into windows: the book's sliding window, and document masks.

    token stream (documents joined by end-of-text)
      -> train / validation split (the last `val_fraction` of the stream is held out)
      -> windows of max_length + 1 tokens every `stride` tokens
      -> examples: inputs = window[:-1], targets = window[1:], weights = 1 (with
         data.document_masks, also each token's document and its position in it)
"""

import numpy as np

from llm.data import shards, batches as batches_lib
from llm.errors import UserError


def split(tokens, val_fraction: float) -> tuple[shards.Tokens, shards.Tokens]:
  """Holds out the last `val_fraction` of the token stream for validation."""
  tokens = shards.as_tokens(tokens)
  cut = int(round(len(tokens) * (1.0 - val_fraction)))
  return tokens.sub(0, cut), tokens.sub(cut, len(tokens))


def window_starts(num_tokens: int, max_length: int, stride: int) -> np.ndarray:
  """Starts of the windows of max_length + 1 tokens, one every `stride` tokens."""
  return np.arange(0, max(num_tokens - max_length, 0), stride, dtype=np.int64)


def window_examples(windows, eot_id: int | None = None) -> dict:
  """Windows [n, max_length + 1] of tokens -> inputs, targets and weights [n, max_length].

  With `eot_id` (data.document_masks) also each input's document, counted from 0 in the window
  (`documents`: a document starts after each end-of-text), and its position in that document
  (`positions`), so that attention stays within a document and positions restart in each.
  """
  windows = windows.astype(np.int32)
  example = {"inputs": windows[..., :-1], "targets": windows[..., 1:],
             "weights": np.ones(windows[..., 1:].shape, np.float32)}
  if eot_id is not None:
    inputs = example["inputs"]
    starts_doc = np.ones(inputs.shape, bool)
    starts_doc[:, 1:] = inputs[:, :-1] == eot_id
    index = np.broadcast_to(np.arange(inputs.shape[1]), inputs.shape)
    first = np.maximum.accumulate(np.where(starts_doc, index, 0), axis=1)
    example["documents"] = (np.cumsum(starts_doc, axis=1) - 1).astype(np.int32)
    example["positions"] = (index - first).astype(np.int32)
  return example


def _read(tokens: shards.Tokens, starts: np.ndarray, max_length: int, eot_id) -> dict:
  return window_examples(np.stack([tokens.read(s, s + max_length + 1) for s in starts]), eot_id)


def train_windows(tokens, max_length, stride, batch_size, grad_accum, seed, process_index=0,
                  process_count=1, eot_id=None) -> batches_lib.Batches:
  """Training windows of the token stream, shuffled (with documents kept apart: `eot_id`).

  Each process reads only the windows of its share of each batch from the (memory-mapped)
  stream; the global order depends on the seed alone, not on the number of processes.
  """
  tokens = shards.as_tokens(tokens)
  starts = window_starts(len(tokens), max_length, stride)
  if len(starts) == 0:
    raise UserError(f"the training text has {len(tokens)} tokens, fewer than one window of "
                    f"data.max_length + 1 = {max_length + 1}; use more text or a smaller "
                    f"data.max_length")
  return batches_lib.Batches(len(starts),
                             lambda idx, _: _read(tokens, starts[idx], max_length, eot_id),
                             batch_size, grad_accum, seed, process_index, process_count)


def eval_windows(tokens, max_length, batch_size, num_batches, process_index=0,
                 process_count=1, eot_id=None) -> list[dict]:
  """The validation tokens cut into back-to-back windows."""
  tokens = shards.as_tokens(tokens)
  starts = window_starts(len(tokens), max_length, max_length)
  if len(starts) == 0:
    raise UserError(f"the evaluation text has {len(tokens)} tokens, fewer than one window of "
                    f"{max_length + 1}; use more text (or raise data.val_fraction)")
  return batches_lib.fixed_batches(len(starts),
                                   lambda idx, _: _read(tokens, starts[idx], max_length, eot_id),
                                   batch_size, num_batches, process_index, process_count)
