"""Examples -> batches: every process computes the same global order and takes its own rows.

`Batches` shuffles examples 0..n-1 anew every epoch, fixed by the seed, so batch k is a pure
function of (seed, k); `fixed_batches` are the same batches at every evaluation; `Prefetch`
makes the next batches on a thread while the devices compute. Records of different lengths are
padded (`pad`) and cut into train / validation / test splits (`split_indices`).
"""

import queue
import threading

import numpy as np

from llm.errors import UserError

SPLITS = ("train", "eval", "test")


def check_batch_size(batch_size: int, grad_accum: int, process_count: int) -> None:
  if batch_size % (grad_accum * process_count):
    raise UserError(f"train.batch_size={batch_size} must divide into train.grad_accum="
                    f"{grad_accum} micro-batches over {process_count} processes")


def process_rows(batch_size: int, grad_accum: int, process_index: int,
                 process_count: int) -> np.ndarray:
  """This process's rows of a global batch: of each of the grad_accum micro-batches, the
  process_index-th of process_count equal parts."""
  micro = batch_size // grad_accum
  local = micro // process_count
  return (np.arange(grad_accum)[:, None] * micro + process_index * local
          + np.arange(local)[None, :]).reshape(-1)


def as_micro_batches(batch: dict, grad_accum: int) -> dict:
  """Arrays of a process's rows, first dimension split into [grad_accum, rows / grad_accum]."""
  return {k: v.reshape(grad_accum, -1, *v.shape[1:]) for k, v in batch.items()}


class Batches:
  """Examples 0..n-1 in a fresh shuffle every epoch; the run's i-th example drawn is fixed by
  (seed, i).

  `take(indices, epochs)` makes the examples (a dict of arrays, first dim = example); the epoch
  lets an example change from one epoch to the next (BERT's masking). Every process computes
  the same global order and takes only its own share of each batch.
  """

  def __init__(self, num_examples, take, batch_size, grad_accum, seed, process_index=0,
               process_count=1):
    check_batch_size(batch_size, grad_accum, process_count)
    self.num_examples, self.take = num_examples, take
    self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
    self.process_index, self.process_count = process_index, process_count
    self.drawn = 0  # examples handed out so far (every process's): the iterator's whole state
    self._epoch, self._order = -1, None

  def __len__(self):
    return self.num_examples

  def example(self) -> dict:
    """One example (its arrays' shapes are every example's)."""
    return self.take(np.zeros(1, int), np.zeros(1, int))

  def _example(self, g: int) -> int:
    """The example behind the run's g-th draw: a fresh permutation every epoch."""
    epoch, i = divmod(g, self.num_examples)
    if epoch != self._epoch:
      self._epoch = epoch
      self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
    return self._order[i]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    g = self.drawn + process_rows(self.batch_size, self.grad_accum, self.process_index,
                                  self.process_count)
    batch = self.take(np.array([self._example(i) for i in g]), g // self.num_examples)
    self.drawn += self.batch_size
    return as_micro_batches(batch, self.grad_accum)

  def state(self) -> dict:
    return {"drawn": self.drawn}

  def restore(self, state: dict) -> None:
    # Counted in examples, so that a run resumed with another batch size goes on with the
    # next example it has not seen; checkpoints of before counted batches.
    self.drawn = int(state["drawn"] if "drawn" in state else state["step"] * self.batch_size)


class Producer:
  """The items of `make(keep_going)` (a generator function), made in a daemon thread into a
  queue of `size`, so the consumer rarely waits. An exception in the thread is raised by the
  consumer's `next`; `close` stops the thread (make's `keep_going()` turns False)."""

  def __init__(self, make, size: int, name: str):
    self._queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, args=(make,), daemon=True, name=name)
    self._thread.start()

  def _fill(self, make):
    try:
      for item in make(lambda: not self._stop.is_set()):
        if not self._put((item, None)):
          return
    except BaseException as error:  # handed to the consumer, raised by __next__
      self._put((None, error))

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self):
    return self

  def __next__(self):
    item, error = self._queue.get()
    if error is not None:
      raise error
    return item

  def close(self) -> None:
    self._stop.set()
    while self._thread.is_alive():  # unblock a put waiting on a full queue
      try:
        self._queue.get(timeout=0.1)
      except queue.Empty:
        pass


class Prefetch:
  """An iterator with `state()` (Batches), run `size` batches ahead in a thread.

  Each batch is made and then passed through `place` (the copy onto the devices) while the
  devices still compute the step before, so the step never waits for the host. `state()` is
  the source's state after the last batch handed out, not after the ones made ahead: what a
  checkpoint must hold for a resumed run to see the same batches.
  """

  def __init__(self, batches, place=lambda batch: batch, size: int = 2):
    self._state = batches.state()

    def make(keep_going):
      while keep_going():
        yield place(next(batches)), batches.state()

    self._producer = Producer(make, size, "prefetch")

  def __iter__(self):
    return self

  def __next__(self):
    batch, self._state = next(self._producer)
    return batch

  def state(self) -> dict:
    return self._state

  def close(self) -> None:
    self._producer.close()


def fixed_batches(num_examples, take, batch_size, num_batches, process_index=0,
                  process_count=1) -> list[dict]:
  """The first `num_batches` batches of examples in order: the same at every evaluation.

  The last batch is filled up with zero-weight examples, so every example counts exactly once.
  """
  n = min(num_examples, num_batches * batch_size)
  padded = -(-n // batch_size) * batch_size
  local = batch_size // process_count
  batches = []
  for b in range(padded // batch_size):
    rows = np.arange(b * batch_size + process_index * local,
                     b * batch_size + (process_index + 1) * local)
    example = take(rows % n, np.zeros_like(rows))  # the filler cycles back to the first ...
    real = (rows < n).astype(np.float32)  # ... with weight 0
    example["weights"] = example["weights"] * real.reshape(-1, *[1] * (
        example["weights"].ndim - 1))
    batches.append(example)
  return batches


def take_rows(arrays: dict):
  """`take` for examples held in memory."""
  return lambda idx, _: {k: v[idx] for k, v in arrays.items()}


def split_indices(num: int, val_fraction: float, test_fraction: float, seed: int,
                  what: str = "examples") -> dict[str, np.ndarray]:
  """A seeded shuffle of 0..num-1 cut into train / eval (validation) / test."""
  order = np.random.default_rng([seed, 1]).permutation(num)
  n_val, n_test = int(round(num * val_fraction)), int(round(num * test_fraction))
  parts = {"train": order[:num - n_val - n_test], "eval": order[num - n_val - n_test:num - n_test],
           "test": order[num - n_test:]}
  for name, fraction in (("train", 1.0), ("eval", val_fraction), ("test", test_fraction)):
    if fraction > 0 and len(parts[name]) == 0:
      label = {"train": "training", "eval": "validation", "test": "test"}[name]
      raise UserError(f"the {label} split is empty ({num} {what}; data.val_fraction="
                      f"{val_fraction}, data.test_fraction={test_fraction}); use more data or "
                      "larger fractions")
  return parts
