"""A hub data set (or local files) read as a stream: nothing downloaded or prepared first.

    documents (`datasets` streaming, in the data set's order)
      -> batches of BATCH documents tokenized in a background thread (a bounded queue)
      -> windows of max_length + 1 tokens every `stride` tokens, across documents
      -> blocks of `shuffle_buffer` windows, each block permuted by (seed, block)
      -> global batches; each process takes its share

The first `eval_batches` micro-batches of windows are held out for validation; training reads
the stream after them, starting over at its end (a new epoch, shuffled anew by block).

The position in the stream is small and exact: where the current block started (the data
set's `state_dict` before a batch of documents, and how many of that batch's tokens were
used), the block's number and how many of its windows were handed out. A resumed run reads the
block again and continues with the next window. Every process reads the whole stream, so the
global order does not depend on the number of processes; the price is that every host reads
and tokenizes all of it. Prepared shards (llm.prepare) cost a preparation first but give a
shuffle over the whole corpus and no tokenizing during training: prefer them for long runs.
"""

import copy

import numpy as np

from llm.data import shards, batches as batches_lib, windows as windows_lib
from llm.errors import UserError

BATCH = 64  # documents tokenized at once
QUEUE = 16  # tokenized batches made ahead


def _token_batches(ds, tokenizer, text_field: str, state: dict, beginning: dict):
  """(state before, tokens, state after) of each batch of documents, from `state` on, made in a
  background thread; the stream starts over at its end."""
  dtype = shards.dtype_for(tokenizer.vocab_size)

  def make(keep_going):
    ds.load_state_dict(copy.deepcopy(state))
    before = state
    while keep_going():
      empty = True
      for batch in ds.iter(batch_size=BATCH):
        empty = False
        after = copy.deepcopy(ds.state_dict())
        yield before, shards.encode_documents(batch[text_field], tokenizer, dtype), after
        before = after
      if empty and before == beginning:
        raise UserError("the streamed data set holds no documents")
      ds.load_state_dict(copy.deepcopy(beginning))  # a new epoch
      before = beginning

  return batches_lib.Producer(make, QUEUE, "stream")


class StreamWindows:
  """Windows of `length` tokens, one every `stride` tokens, of a document stream (each document
  followed by end-of-text), from `position` (see `position()`). `ds` has not been read yet:
  its state is the stream's beginning."""

  def __init__(self, ds, tokenizer, text_field: str, length: int, stride: int,
               position: dict | None = None):
    self.ds, self.tokenizer, self.text_field = ds, tokenizer, text_field
    self.length, self.stride = length, stride
    self._source = None
    self._beginning = copy.deepcopy(ds.state_dict())
    self.seek(position or {"source": self._beginning, "skip": 0})

  def seek(self, position: dict) -> None:
    if self._source is not None:
      self._source.close()
    self._source = _token_batches(self.ds, self.tokenizer, self.text_field, position["source"],
                                  self._beginning)
    self._batches = []  # (state before, number of tokens) of the batches in the buffer
    self._after = position["source"]  # the state after the last batch read
    self._buffer = np.zeros(0, np.int64)  # their tokens
    self._used = position["skip"]  # tokens of the buffer already handed on (or to skip)

  def position(self) -> dict:
    """Where the next window starts: the stream's state before a batch of documents and how
    many of the tokens from there on are used. Small and JSON-able."""
    source = self._batches[0][0] if self._batches else self._after
    return {"source": copy.deepcopy(source), "skip": int(self._used)}

  def _drop_used_batches(self):
    while self._batches and self._used >= self._batches[0][1]:
      n = self._batches.pop(0)[1]
      self._used -= n
      self._buffer = self._buffer[n:]

  def __next__(self) -> np.ndarray:
    while len(self._buffer) < self._used + self.length:
      before, tokens, self._after = next(self._source)
      self._batches.append((before, len(tokens)))
      self._buffer = np.concatenate([self._buffer, tokens])
      self._drop_used_batches()
    window = self._buffer[self._used:self._used + self.length].copy()
    self._used += self.stride
    self._drop_used_batches()
    return window

  def close(self):
    self._source.close()


class StreamBatches:
  """Global batches of shuffled windows of the stream; like batches.Batches, a process gets its
  share [grad_accum, micro_batch / processes, ...], and `state()` / `restore()` resume exactly.
  """

  def __init__(self, windows: StreamWindows, start: dict, batch_size: int, grad_accum: int,
               shuffle_buffer: int, seed: int, eot_id=None, process_index=0, process_count=1):
    batches_lib.check_batch_size(batch_size, grad_accum, process_count)
    self.windows, self.batch_size, self.grad_accum = windows, batch_size, grad_accum
    self.block_size, self.shuffle, self.seed = max(shuffle_buffer, 1), shuffle_buffer > 0, seed
    self.eot_id, self.process_index, self.process_count = eot_id, process_index, process_count
    self.restore({"step": 0, "block_start": start, "block": 0, "used": 0})

  def _read_block(self) -> None:
    self._block = np.stack([next(self.windows) for _ in range(self.block_size)])
    if self.shuffle:
      order = np.random.default_rng([self.seed, 5, self._state["block"]]).permutation(
          self.block_size)
      self._block = self._block[order]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rows = []
    while len(rows) < self.batch_size:
      s = self._state
      if s["used"] == self.block_size:
        s.update(block_start=self.windows.position(), block=s["block"] + 1, used=0)
        self._read_block()
      take = min(self.batch_size - len(rows), self.block_size - s["used"])
      rows.extend(self._block[s["used"]:s["used"] + take])
      s["used"] += take
    self._state["step"] += 1
    mine = batches_lib.process_rows(self.batch_size, self.grad_accum, self.process_index,
                             self.process_count)
    batch = windows_lib.window_examples(np.stack([rows[i] for i in mine]), self.eot_id)
    return batches_lib.as_micro_batches(batch, self.grad_accum)

  def example(self) -> dict:
    """One example (its arrays' shapes are every example's)."""
    return windows_lib.window_examples(self._block[:1], self.eot_id)

  def state(self) -> dict:
    return copy.deepcopy(self._state)

  def restore(self, state: dict) -> None:
    self._state = copy.deepcopy(dict(state))
    self.windows.seek(self._state["block_start"])
    self._read_block()


def stream_batches(ds, tokenizer, text_field: str, max_length: int, stride: int, batch_size: int,
               grad_accum: int, eval_batches: int, shuffle_buffer: int, seed: int, eot_id=None,
               process_index=0, process_count=1) -> tuple[StreamBatches, list[dict]]:
  """(training batches, validation batches) of the stream: validation is its first
  `eval_batches` micro-batches of windows, training the windows after them."""
  micro = batch_size // grad_accum
  windows = StreamWindows(ds, tokenizer, text_field, max_length + 1, stride)
  held_out = np.stack([next(windows) for _ in range(eval_batches * micro)])
  evals = batches_lib.fixed_batches(
      len(held_out), lambda idx, _: windows_lib.window_examples(held_out[idx], eot_id), micro,
      eval_batches, process_index, process_count)
  return StreamBatches(windows, windows.position(), batch_size, grad_accum, shuffle_buffer,
                       seed, eot_id, process_index, process_count), evals
