"""Records packed into rows (data.packing): best-fit decreasing, each token labelled with its
record (`documents`) and its position in it (`positions`, restarting at 0), so that attention,
positions and every record's loss are what they would be alone (the model's document masks).

    padded  [record 0 ....... pad pad pad]     packed  [record 0 ....... record 3 ..]
            [record 1 .. pad pad pad pad pad]          [record 1 .. record 2 ....  pad]

`pack_lm` packs next-token examples (SFT); `pack_pairs` keeps a preference pair's two sequences
in one row (reward models, DPO).
"""

import bisect

import numpy as np


def best_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
  """Items (their `lengths`) into bins of `capacity`: longest first, each into the fullest bin
  it fits. Bins in the order they were opened; items in each in the order they were put."""
  bins, free = [], []  # free: sorted (room left, bin) pairs
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    if lengths[i] > capacity:
      raise ValueError(f"an item of {lengths[i]} does not fit a bin of {capacity}")
    at = bisect.bisect_left(free, (lengths[i], -1))
    if at == len(free):
      bins.append([i])
      bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
    else:
      room, b = free.pop(at)
      bins[b].append(i)
      bisect.insort(free, (room - lengths[i], b))
  return bins


def _place(segments_per_row, length: int):
  """documents, positions [rows, length] for rows of segments (their lengths) laid end to end;
  padding is a document of its own (the row's last id), never attended to by a record."""
  documents = np.zeros((len(segments_per_row), length), np.int32)
  positions = np.zeros((len(segments_per_row), length), np.int32)
  starts = []
  for r, segments in enumerate(segments_per_row):
    at, row_starts = 0, []
    for d, n in enumerate(segments):
      documents[r, at:at + n] = d
      positions[r, at:at + n] = np.arange(n)
      row_starts.append(at)
      at += n
    documents[r, at:] = len(segments)
    starts.append(row_starts)
  return documents, positions, starts


def pack_lm(examples: dict, lengths: np.ndarray, pad_id: int, length: int = 0) -> dict:
  """Padded next-token examples (inputs, targets, weights [N, T]; record i's first
  `lengths[i]` positions real) -> packed rows [R, max(T, length)] with documents and
  positions."""
  T = max(examples["inputs"].shape[1], length)
  bins = best_fit_decreasing([int(n) for n in lengths], T)
  out = {"inputs": np.full((len(bins), T), pad_id, np.int32),
         "targets": np.full((len(bins), T), pad_id, np.int32),
         "weights": np.zeros((len(bins), T), np.float32)}
  documents, positions, starts = _place([[int(lengths[i]) for i in b] for b in bins], T)
  for r, (b, row_starts) in enumerate(zip(bins, starts)):
    for i, at in zip(b, row_starts):
      n = int(lengths[i])
      for key in out:
        out[key][r, at:at + n] = examples[key][i, :n]
  return {**out, "documents": documents, "positions": positions}


def pack_pairs(examples: dict, lengths: np.ndarray, length: int = 0) -> dict:
  """Padded preference pairs (tokens, response [N, 2, T], weights [N], reference [N, 2] for DPO;
  `lengths` [N, 2] the real tokens of each) -> rows [R, L] holding whole pairs (L: `length`, or
  the longest pair's if longer):

    tokens, documents, positions [R, L]  the pairs' sequences end to end
    response [R, L]     1 at an answer's tokens
    sequence [R, L]     which of the row's sequences a token is (2 p + a for pair p, answer a)
    ends [R, P, 2]      each sequence's last token (where a reward model reads it)
    weights [R, P]      1 per pair in the row (P: the most pairs any row holds)
    reference [R, P, 2] DPO's reference log-probabilities
  """
  N, _, T = examples["tokens"].shape
  pair_lengths = [int(a + b) for a, b in lengths]
  L = max(max(pair_lengths), length)
  bins = best_fit_decreasing(pair_lengths, L)
  P = max(map(len, bins))
  pad = int(examples["tokens"][0, 0, -1]) if lengths.min() < T else 0
  out = {"tokens": np.full((len(bins), L), pad, np.int32),
         "response": np.zeros((len(bins), L), np.float32),
         "sequence": np.full((len(bins), L), 2 * P, np.int32),
         "ends": np.zeros((len(bins), P, 2), np.int32),
         "weights": np.zeros((len(bins), P), np.float32)}
  if "reference" in examples:
    out["reference"] = np.zeros((len(bins), P, 2), np.float32)
  documents, positions, starts = _place(
      [[int(lengths[i, a]) for i in b for a in (0, 1)] for b in bins], L)
  for r, (b, row_starts) in enumerate(zip(bins, starts)):
    for p, i in enumerate(b):
      out["weights"][r, p] = examples["weights"][i]
      if "reference" in out:
        out["reference"][r, p] = examples["reference"][i]
      for a in (0, 1):
        at, n = row_starts[2 * p + a], int(lengths[i, a])
        out["tokens"][r, at:at + n] = examples["tokens"][i, a, :n]
        out["response"][r, at:at + n] = examples["response"][i, a, :n]
        out["sequence"][r, at:at + n] = 2 * p + a
        out["ends"][r, p, a] = at + n - 1
  return {**out, "documents": documents, "positions": positions}
