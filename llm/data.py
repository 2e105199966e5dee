"""Text in, batches of token windows out.

    documents (hub, local files or the embedded corpus)
      -> token stream (documents joined by end-of-text, tokenized once and cached as .npy)
      -> train / validation split (the last `val_fraction` of the stream is held out)
      -> windows of max_length + 1 tokens every `stride` tokens (the book's sliding window)
      -> batches: inputs = window[:-1], targets = window[1:], weights = 1

A batch is a dict of numpy arrays shaped [grad_accum, micro_batch, length] holding this process's
share of the global batch. Batch k of the run is a pure function of (seed, k), so the iterator's
whole state is k: it goes into the checkpoint and a resumed run continues exactly.
"""

import glob
import hashlib
import os

import numpy as np

from llm.errors import UserError

EXTENSIONS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
              ".tsv": "csv", ".parquet": "parquet"}


def embedded_corpus():
  """The English documentation that ships inside CPython: offline text on every machine."""
  import datasets
  from pydoc_data.topics import topics
  return datasets.Dataset.from_dict({"text": [topics[k] for k in sorted(topics)]})


def _local_files(path: str) -> list[str]:
  if os.path.isdir(path):
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if os.path.splitext(f)[1].lower() in EXTENSIONS)
  elif any(ch in path for ch in "*?["):
    files = sorted(glob.glob(path, recursive=True))
  else:
    files = [path] if os.path.isfile(path) else []
  if not files:
    raise UserError(f"data.path={path!r}: no such file (or no {'/'.join(EXTENSIONS)} files there)")
  kinds = {os.path.splitext(f)[1].lower() for f in files}
  unknown = kinds - set(EXTENSIONS)
  if unknown:
    raise UserError(f"data.path: cannot read {'/'.join(sorted(unknown))} files; "
                    f"use one of {', '.join(EXTENSIONS)}")
  if len({EXTENSIONS[k] for k in kinds}) > 1 or kinds == {".csv", ".tsv"}:
    raise UserError(f"data.path: files of one format please, found {', '.join(sorted(kinds))}")
  return files


def load_documents(data_cfg):
  """A `datasets.Dataset` with one document per row, from the hub, local files or the corpus."""
  import datasets
  datasets.logging.set_verbosity_error()
  datasets.disable_progress_bars()
  try:
    if data_cfg.hf_name:
      ds = datasets.load_dataset(data_cfg.hf_name, data_cfg.hf_config or None,
                                 split=data_cfg.split)
    elif data_cfg.path:
      files = _local_files(data_cfg.path)
      ext = os.path.splitext(files[0])[1].lower()
      kwargs = {"sample_by": "document"} if EXTENSIONS[ext] == "text" else {}
      if ext == ".tsv":
        kwargs["delimiter"] = "\t"
      ds = datasets.load_dataset(EXTENSIONS[ext], data_files=files, split="train", **kwargs)
    else:
      return embedded_corpus()
  except UserError:
    raise
  except Exception as e:  # datasets raises many types for unreadable input
    where = data_cfg.hf_name or data_cfg.path
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    hint = ("check the name, the network (HF_DATASETS_OFFLINE) or use data.path"
            if data_cfg.hf_name else "check that the file is well-formed")
    raise UserError(f"could not read data from {where!r}: {first[:300]}; {hint}") from None
  if data_cfg.text_field not in ds.column_names:
    raise UserError(f"data.text_field={data_cfg.text_field!r} is not a column of the data; "
                    f"columns: {', '.join(ds.column_names)}")
  return ds


def texts(ds, text_field: str, max_chars: int):
  """The first `max_chars` characters of text, document by document (to train a tokenizer)."""
  seen = 0
  for row in ds:
    text = row[text_field] or ""
    yield text
    seen += len(text)
    if seen >= max_chars:
      return


def token_stream(ds, tokenizer, text_field: str, cache_dir: str) -> np.ndarray:
  """All documents' tokens, each followed by end-of-text, as one array (memory-mapped).

  Tokenized once with `datasets.map` and cached by (data, tokenizer) fingerprint: a second run
  on the same data reads the cache instead of tokenizing again.
  """
  cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "llm")
  os.makedirs(cache_dir, exist_ok=True)
  key = hashlib.sha256(
      f"{ds._fingerprint}|{tokenizer.fingerprint()}|{text_field}".encode()).hexdigest()[:20]
  path = os.path.join(cache_dir, f"tokens-{key}.npy")
  if not os.path.exists(path):
    eot = tokenizer.eot_id
    tokenized = ds.map(
        lambda batch: {"ids": [ids + [eot] for ids in tokenizer.encode_batch(
            [t or "" for t in batch[text_field]])]},
        batched=True, batch_size=1000, remove_columns=ds.column_names,
        desc="tokenizing")
    lengths = np.array([len(ids) for ids in tokenized["ids"]], np.int64)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    tmp = f"{path}.{os.getpid()}.tmp"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(int(lengths.sum()),))
    pos = 0
    for batch in tokenized.iter(batch_size=1000):
      for ids in batch["ids"]:
        out[pos:pos + len(ids)] = ids
        pos += len(ids)
    out.flush()
    del out
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache
  return np.load(path, mmap_mode="r")


def split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Holds out the last `val_fraction` of the token stream for validation."""
  cut = int(round(len(tokens) * (1.0 - val_fraction)))
  return tokens[:cut], tokens[cut:]


def window_starts(num_tokens: int, max_length: int, stride: int) -> np.ndarray:
  """Starts of the windows of max_length + 1 tokens, one every `stride` tokens."""
  return np.arange(0, max(num_tokens - max_length, 0), stride, dtype=np.int64)


def _lm_example(tokens: np.ndarray, starts: np.ndarray, max_length: int) -> dict:
  windows = np.stack([tokens[s:s + max_length + 1] for s in starts]).astype(np.int32)
  return {"inputs": windows[..., :-1], "targets": windows[..., 1:],
          "weights": np.ones(windows[..., 1:].shape, np.float32)}


class LMBatches:
  """Shuffled windows, epoch after epoch; batch k is fixed by (seed, k).

  Every process computes the same global order and reads only its own share of each batch.
  """

  def __init__(self, tokens, max_length, stride, batch_size, grad_accum, seed,
               process_index=0, process_count=1):
    self.tokens, self.max_length = tokens, max_length
    self.starts = window_starts(len(tokens), max_length, stride)
    if len(self.starts) == 0:
      raise UserError(f"the training text has {len(tokens)} tokens, fewer than one window of "
                      f"data.max_length + 1 = {max_length + 1}; use more text or a smaller "
                      f"data.max_length")
    if batch_size % (grad_accum * process_count):
      raise UserError(f"train.batch_size={batch_size} must divide into train.grad_accum="
                      f"{grad_accum} micro-batches over {process_count} processes")
    self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
    self.process_index, self.process_count = process_index, process_count
    self.step = 0  # batches handed out so far: the iterator's whole state
    self._epoch, self._order = -1, None

  def __len__(self):
    return len(self.starts)

  def _window(self, g: int) -> int:
    """The start of the g-th window of the run: a fresh permutation every epoch."""
    epoch, i = divmod(g, len(self.starts))
    if epoch != self._epoch:
      self._epoch = epoch
      self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.starts))
    return self.starts[self._order[i]]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    micro = self.batch_size // self.grad_accum
    local = micro // self.process_count
    first = self.step * self.batch_size
    g = [first + a * micro + self.process_index * local + j
         for a in range(self.grad_accum) for j in range(local)]
    batch = _lm_example(self.tokens, np.array([self._window(i) for i in g]), self.max_length)
    self.step += 1
    return {k: v.reshape(self.grad_accum, local, -1) for k, v in batch.items()}

  def state(self) -> dict:
    return {"step": self.step}

  def restore(self, state: dict) -> None:
    self.step = int(state["step"])


def eval_batches(tokens, max_length, batch_size, num_batches, process_index=0,
                 process_count=1) -> list[dict]:
  """The validation part cut into back-to-back windows: the same batches at every evaluation.

  The last batch is filled up with zero-weight windows, so every window counts exactly once.
  """
  starts = window_starts(len(tokens), max_length, max_length)
  if len(starts) == 0:
    raise UserError(f"the validation part has {len(tokens)} tokens, fewer than one window of "
                    f"{max_length + 1}; raise data.val_fraction or use more text")
  starts = starts[:num_batches * batch_size]
  n = -(-len(starts) // batch_size) * batch_size
  weight = np.arange(n) < len(starts)
  starts = np.resize(starts, n)  # cycles: the filler windows carry weight 0
  local = batch_size // process_count
  batches = []
  for b in range(n // batch_size):
    rows = slice(b * batch_size + process_index * local, b * batch_size + (process_index + 1) * local)
    example = _lm_example(tokens, starts[rows], max_length)
    example["weights"] *= weight[rows, None]
    batches.append(example)
  return batches
