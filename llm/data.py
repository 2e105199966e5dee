"""Text in, batches of token windows out.

    documents (hub, local files or the embedded corpus)
      -> token stream (documents joined by end-of-text, tokenized once into memory-mapped
         shards: token_shards.py; or streamed from the hub and tokenized on the fly: streaming.py)
      -> train / validation split (the last `val_fraction` of the stream is held out)
      -> windows of max_length + 1 tokens every `stride` tokens (the book's sliding window)
      -> batches: inputs = window[:-1], targets = window[1:], weights = 1 (with
         data.document_masks, also each token's document and its position in it)

Fine-tuning reads records instead (text + label for classification; Alpaca instruction, input,
output for instruction tuning), split into train / validation / test by fractions and seed, and
padded to one length.

A batch is a dict of numpy arrays shaped [grad_accum, micro_batch, ...] holding this process's
share of the global batch. Batch k of the run is a pure function of (seed, k), so the iterator's
whole state is k: it goes into the checkpoint and a resumed run continues exactly.
"""

import csv
import glob
import hashlib
import os
import queue
import re
import threading

import numpy as np

from llm import token_shards
from llm.errors import UserError

EXTENSIONS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
              ".tsv": "csv", ".parquet": "parquet"}


def embedded_corpus():
  """The English documentation that ships inside CPython: offline text on every machine."""
  import datasets
  from pydoc_data.topics import topics
  return datasets.Dataset.from_dict({"text": [topics[k] for k in sorted(topics)]})


def _local_files(path: str, fmt: str = "") -> list[str]:
  if os.path.isdir(path):
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if os.path.splitext(f)[1].lower() in EXTENSIONS)
  elif any(ch in path for ch in "*?["):
    files = sorted(glob.glob(path, recursive=True))
  else:
    files = [path] if os.path.isfile(path) else []
  if not files:
    raise UserError(f"data.path={path!r}: no such file (or no {'/'.join(EXTENSIONS)} files there)")
  if fmt:  # the user says what the files are, whatever their names
    return files
  kinds = {os.path.splitext(f)[1].lower() for f in files}
  unknown = kinds - set(EXTENSIONS)
  if unknown:
    raise UserError(f"data.path: cannot read {'/'.join(sorted(unknown))} files; "
                    f"use one of {', '.join(EXTENSIONS)} or set data.format")
  if len({EXTENSIONS[k] for k in kinds}) > 1 or kinds == {".csv", ".tsv"}:
    raise UserError(f"data.path: files of one format please, found {', '.join(sorted(kinds))}")
  return files


def local_builder(data_cfg) -> tuple[str, list[str], dict]:
  """(the `datasets` builder, the files, its arguments) that read data.path's files."""
  fmt = data_cfg.get("format", "")
  files = _local_files(data_cfg.path, fmt)
  if all(os.path.getsize(f) == 0 for f in files):
    raise UserError(f"data.path={data_cfg.path!r} is empty")
  ext = os.path.splitext(files[0])[1].lower()
  fmt = fmt or ("tsv" if ext == ".tsv" else EXTENSIONS[ext])
  kwargs = {"sample_by": "document"} if fmt == "text" else {}
  if fmt == "tsv":  # tab-separated values carry no quoting: a quote is text
    kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
  if fmt in ("csv", "tsv") and data_cfg.get("columns", ""):  # a file without a header row
    kwargs["column_names"] = [c.strip() for c in data_cfg.columns.split(",")]
  return ("csv" if fmt == "tsv" else fmt), files, kwargs


def load_documents(data_cfg, fields=None, complete: bool = False):
  """A `datasets.Dataset` with one document (or record) per row, from the hub, local files or
  the embedded corpus; `fields` (default: the text field) must be among its columns.

  `complete`: every record must have a value for every field (a classifier's text and label);
  records that lack one are named, or dropped with `data.skip_bad_rows`.
  """
  import datasets
  datasets.logging.set_verbosity_error()
  datasets.disable_progress_bars()
  try:
    if data_cfg.hf_name:
      ds = datasets.load_dataset(data_cfg.hf_name, data_cfg.hf_config or None,
                                 split=data_cfg.split)
    elif data_cfg.path:
      builder, files, kwargs = local_builder(data_cfg)
      ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    else:
      return embedded_corpus()
  except UserError:
    raise
  except Exception as e:  # datasets raises many types for unreadable input
    raise read_error(data_cfg, e) from None
  for field in fields or (data_cfg.text_field,):
    if field not in ds.column_names:
      raise UserError(f"the data has no field {field!r} (columns: {', '.join(ds.column_names)}); "
                      "set data.text_field / data.label_field, or data.columns for a CSV/TSV "
                      "file without a header row")
  if complete:
    ds = _complete_records(ds, fields, data_cfg.get("skip_bad_rows", False))
  if len(ds) == 0:
    raise UserError(f"the data at {data_cfg.hf_name or data_cfg.path!r} holds no records")
  return ds


def _find_problem(files: list[str], fmt: str) -> str | None:
  """What makes a local file unreadable, with its line number: text that is not UTF-8, or a
  JSON line that does not parse. None when nothing is found."""
  import json
  for path in files:
    with open(path, "rb") as f:
      for number, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          return (f"{path} line {number} is not UTF-8 text ({e.reason} at byte {e.start}); "
                  "convert the file to UTF-8")
        if fmt == "json" and path.endswith(".jsonl") and line.strip():
          try:
            json.loads(line)
          except ValueError as e:
            return f"{path} line {number} is not valid JSON ({e})"
  return None


def _complete_records(ds, fields, skip: bool):
  """The records that have every field; the others named (or dropped, with `skip`)."""
  missing = [row for row, record in enumerate(ds)
             if any(record[f] is None or str(record[f]).strip() == "" for f in fields)]
  if not missing:
    return ds
  shown = ", ".join(str(row + 1) for row in missing[:10]) + (" ..." if len(missing) > 10 else "")
  what = f"{len(missing)} of {len(ds)} records (number {shown}, counting from 1)"
  if not skip:
    raise UserError(f"{what} lack a value for {' or '.join(fields)}; fix them, or set "
                    "data.skip_bad_rows=True to leave them out")
  print(f"note: left out {what}, which lack a value for {' or '.join(fields)}")
  return ds.select(sorted(set(range(len(ds))) - set(missing)))


def texts(ds, text_field: str, max_chars: int):
  """The first `max_chars` characters of text, document by document (to train a tokenizer)."""
  seen = 0
  for row in ds:
    text = row[text_field] or ""
    yield text
    seen += len(text)
    if seen >= max_chars:
      return


def prepare_tokens(data_cfg, ds, tokenizer, out: str = "",
                   documents_per_shard: int = token_shards.DOCUMENTS_PER_SHARD,
                   progress: bool = True) -> token_shards.Shards:
  """The documents of `ds` (the data `data_cfg` names) tokenized into shards in `out` (default:
  its token_cache folder), once: a folder already complete is opened, one left unfinished is
  completed."""
  out = out or token_cache(data_cfg, tokenizer)
  try:
    return token_shards.prepare(ds, tokenizer, data_cfg.text_field, out, documents_per_shard,
                                progress, source=source_key(data_cfg))
  except token_shards.ReadError as e:
    raise read_error(data_cfg, e.args[0]) from None


def source_key(data_cfg) -> str:
  """What names a corpus: the hub data set, the local files (with their sizes and times, so
  that an edited file is tokenized again) or the embedded corpus."""
  if data_cfg.hf_name:
    return f"hub|{data_cfg.hf_name}|{data_cfg.hf_config}|{data_cfg.split}"
  if data_cfg.path:
    files = _local_files(data_cfg.path, data_cfg.get("format", ""))
    return "files|" + "|".join(
        f"{os.path.abspath(f)}:{os.path.getsize(f)}:{os.stat(f).st_mtime_ns}" for f in files) + (
            f"|{data_cfg.get('format', '')}|{data_cfg.get('columns', '')}")
  from pydoc_data.topics import topics
  return "embedded|" + hashlib.sha256("".join(topics[k] for k in sorted(topics)).encode()
                                      ).hexdigest()[:16]


def token_cache(data_cfg, tokenizer, cache_dir: str = "") -> str:
  """The cache folder of the shards of (data, tokenizer, text field): where a run's token
  stream is prepared and read (and `python -m llm.prepare` writes without --out)."""
  cache_dir = cache_dir or data_cfg.cache_dir or os.path.join(
      os.path.expanduser("~"), ".cache", "llm")
  key = hashlib.sha256(f"{source_key(data_cfg)}|{tokenizer.fingerprint()}|"
                       f"{data_cfg.text_field}".encode()).hexdigest()[:20]
  return os.path.join(cache_dir, f"tokens-{key}")


def read_error(data_cfg, error) -> UserError:
  """One line for documents that could not be read: what in the local files is wrong (with its
  line number), or the error's first line and what to check."""
  where = data_cfg.hf_name or data_cfg.path or "the embedded corpus"
  if data_cfg.path and not data_cfg.hf_name:
    files = _local_files(data_cfg.path, data_cfg.get("format", ""))
    fmt = data_cfg.get("format", "") or EXTENSIONS.get(os.path.splitext(files[0])[1].lower(), "")
    problem = _find_problem(files, fmt)
    if problem:
      return UserError(f"could not read data.path={where!r}: {problem}")
  first = (str(error).strip().splitlines() or [type(error).__name__])[0]
  hint = ("check the name, the network (HF_DATASETS_OFFLINE) or use data.path"
          if data_cfg.hf_name else "check that the file is well-formed")
  return UserError(f"could not read data from {where!r}: {first[:300]}; {hint}")


def split(tokens, val_fraction: float) -> tuple[token_shards.Tokens, token_shards.Tokens]:
  """Holds out the last `val_fraction` of the token stream for validation."""
  tokens = token_shards.as_tokens(tokens)
  cut = int(round(len(tokens) * (1.0 - val_fraction)))
  return tokens.sub(0, cut), tokens.sub(cut, len(tokens))


def window_starts(num_tokens: int, max_length: int, stride: int) -> np.ndarray:
  """Starts of the windows of max_length + 1 tokens, one every `stride` tokens."""
  return np.arange(0, max(num_tokens - max_length, 0), stride, dtype=np.int64)


def _lm_example(tokens: token_shards.Tokens, starts: np.ndarray, max_length: int,
                eot_id: int | None = None) -> dict:
  """Windows of max_length + 1 tokens from `starts`: inputs, targets and weights [n, max_length].

  With `eot_id` (data.document_masks) also each input's document, counted from 0 in the window
  (`documents`: a document starts after each end-of-text), and its position in that document
  (`positions`), so that attention stays within a document and positions restart in each.
  """
  return window_examples(np.stack([tokens.read(s, s + max_length + 1) for s in starts]), eot_id)


def window_examples(windows, eot_id: int | None = None) -> dict:
  """`_lm_example` of windows [n, max_length + 1] already read."""
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
  """Examples 0..n-1 in a fresh shuffle every epoch; batch k is fixed by (seed, k).

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
    self.step = 0  # batches handed out so far: the iterator's whole state
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
    g = self.step * self.batch_size + process_rows(self.batch_size, self.grad_accum,
                                                   self.process_index, self.process_count)
    batch = self.take(np.array([self._example(i) for i in g]), g // self.num_examples)
    self.step += 1
    return as_micro_batches(batch, self.grad_accum)

  def state(self) -> dict:
    return {"step": self.step}

  def restore(self, state: dict) -> None:
    self.step = int(state["step"])


class Prefetch:
  """An iterator with `state()` (Batches), run `size` batches ahead in a thread.

  Each batch is made and then passed through `place` (the copy onto the devices) while the
  devices still compute the step before, so the step never waits for the host. `state()` is
  the source's state after the last batch handed out, not after the ones made ahead: what a
  checkpoint must hold for a resumed run to see the same batches.
  """

  def __init__(self, batches, place=lambda batch: batch, size: int = 2):
    self._queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._state = batches.state()
    self._thread = threading.Thread(target=self._fill, args=(batches, place), daemon=True,
                                    name="prefetch")
    self._thread.start()

  def _fill(self, batches, place):
    try:
      while not self._stop.is_set():
        self._put((place(next(batches)), batches.state()))
    except BaseException as error:  # handed to the consumer, raised by __next__
      self._put((error, None))

  def _put(self, item) -> None:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def __iter__(self):
    return self

  def __next__(self):
    batch, state = self._queue.get()
    if isinstance(batch, BaseException):
      raise batch
    self._state = state
    return batch

  def state(self) -> dict:
    return self._state

  def close(self) -> None:
    self._stop.set()
    while self._thread.is_alive():  # unblock a put waiting on a full queue
      try:
        self._queue.get(timeout=0.1)
      except queue.Empty:
        pass


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


def lm_batches(tokens, max_length, stride, batch_size, grad_accum, seed, process_index=0,
               process_count=1, eot_id=None) -> Batches:
  """Training windows of the token stream, shuffled (with documents kept apart: `eot_id`).

  Each process reads only the windows of its share of each batch from the (memory-mapped)
  stream; the global order depends on the seed alone, not on the number of processes.
  """
  tokens = token_shards.as_tokens(tokens)
  starts = window_starts(len(tokens), max_length, stride)
  if len(starts) == 0:
    raise UserError(f"the training text has {len(tokens)} tokens, fewer than one window of "
                    f"data.max_length + 1 = {max_length + 1}; use more text or a smaller "
                    f"data.max_length")
  return Batches(len(starts),
                 lambda idx, _: _lm_example(tokens, starts[idx], max_length, eot_id),
                 batch_size, grad_accum, seed, process_index, process_count)


def eval_batches(tokens, max_length, batch_size, num_batches, process_index=0,
                 process_count=1, eot_id=None) -> list[dict]:
  """The validation tokens cut into back-to-back windows."""
  tokens = token_shards.as_tokens(tokens)
  starts = window_starts(len(tokens), max_length, max_length)
  if len(starts) == 0:
    raise UserError(f"the evaluation text has {len(tokens)} tokens, fewer than one window of "
                    f"{max_length + 1}; use more text (or raise data.val_fraction)")
  return fixed_batches(len(starts),
                       lambda idx, _: _lm_example(tokens, starts[idx], max_length, eot_id),
                       batch_size, num_batches, process_index, process_count)


# ---------------------------------------------------------------------------------------------
# Fine-tuning records

SPLITS = ("train", "eval", "test")


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


def label_ids(values, labels: list[str]) -> np.ndarray:
  """Label values (names, or ids 0..N-1) -> class ids, by the order of `labels`."""
  index = {name: i for i, name in enumerate(labels)}
  ids = np.empty(len(values), np.int32)
  for row, value in enumerate(values):
    key = str(value).strip()
    if key not in index and not (key.isdigit() and int(key) < len(labels)):
      raise UserError(f"data: row {row} has label {value!r}, which is not one of task.labels="
                      f"{','.join(labels)} (nor an id below {len(labels)})")
    ids[row] = index[key] if key in index else int(key)
  return ids


def label_names(values) -> list[str]:
  """The classes found in the data: sorted names, or 0..max for integer labels."""
  keys = sorted({str(v).strip() for v in values})
  if all(k.isdigit() for k in keys):
    return [str(i) for i in range(max(int(k) for k in keys) + 1)]
  return keys


def balance(labels: np.ndarray, seed: int) -> np.ndarray:
  """Row indices keeping every class at the smallest class's size (random undersampling)."""
  rng = np.random.default_rng([seed, 2])
  counts = np.bincount(labels)
  smallest = counts[counts > 0].min()
  keep = [rng.choice(np.flatnonzero(labels == c), smallest, replace=False)
          for c in range(len(counts)) if counts[c]]
  return np.sort(np.concatenate(keep))


def pad(rows: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows of ids right-padded to `length`: (tokens [N, length] int32, valid [N, length])."""
  tokens = np.full((len(rows), length), pad_id, np.int32)
  valid = np.zeros((len(rows), length), bool)
  for r, ids in enumerate(rows):
    tokens[r, :len(ids)], valid[r, :len(ids)] = ids, True
  return tokens, valid


def with_specials(ids: list[int], tokenizer, max_length: int) -> list[int]:
  """A text's ids as the model reads them: [CLS] ids [SEP] for WordPiece (BERT), else as they
  are; cut to max_length."""
  if tokenizer.kind == "wordpiece":
    return [tokenizer.cls_id] + ids[:max_length - 2] + [tokenizer.sep_id]
  return ids[:max_length] or [tokenizer.pad_id]


def encode_texts(texts: list[str], tokenizer, max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Texts as a classifier or encoder reads them: right-padded ids [n, L] (L: the longest text,
  at most max_length) and their validity mask."""
  rows = [with_specials(ids, tokenizer, max_length) for ids in tokenizer.encode_batch(texts)]
  return pad(rows, max(map(len, rows)), tokenizer.pad_id)


def classification_examples(texts: list[str], labels: np.ndarray, tokenizer,
                            max_length: int) -> dict:
  """`encode_texts` plus the class ids and weight 1 per example."""
  tokens, valid = encode_texts(texts, tokenizer, max_length)
  return {"tokens": tokens, "valid": valid, "labels": labels.astype(np.int32),
          "weights": np.ones(len(texts), np.float32)}


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
  """The Alpaca template, up to where the response starts."""
  prompt = ("Below is an instruction that describes a task. Write a response that "
            f"appropriately completes the request.\n\n### Instruction:\n{instruction}")
  if input_text:
    prompt += f"\n\n### Input:\n{input_text}"
  return prompt + "\n\n### Response:\n"


def instruction_examples(records, tokenizer, max_length: int, mask_prompt: bool) -> dict:
  """Prompt + response + end-of-text, as LM inputs/targets/weights padded with end-of-text.

  Targets are the response and its end-of-text (and the prompt unless `mask_prompt`); padding
  is never a target. Sequences are cut to max_length + 1 tokens.
  """
  eot = tokenizer.eot_id
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]  # as generation starts a prompt
  prompts = [bos + p for p in tokenizer.encode_batch(
      [alpaca_prompt(r["instruction"], r.get("input") or "") for r in records])]
  responses = tokenizer.encode_batch([r["output"] for r in records])
  rows = [(p + r + [eot])[:max_length + 1] for p, r in zip(prompts, responses)]
  length = max(map(len, rows)) - 1
  seq, _ = pad(rows, length + 1, eot)
  weights = np.zeros((len(rows), length), np.float32)
  for i, (p, row) in enumerate(zip(prompts, rows)):
    # The target at position len(p) - 1 is the response's first token.
    first = len(p) - 1 if mask_prompt else 0
    weights[i, first:len(row) - 1] = 1.0
  return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "weights": weights}


PREFERENCE = ("chosen", "rejected")  # the two answers of a pair, in this order


def preference_examples(records, tokenizer, max_length: int, chosen_field: str = "chosen",
                        rejected_field: str = "rejected") -> tuple[dict, dict]:
  """Pairs of answers to one prompt (the Alpaca template of instruction and input), as
  (examples, report).

  Examples, with N pairs and the two answers (chosen, rejected) on axis 1:
    tokens [N, 2, T]    prompt + answer + end-of-text, padded with end-of-text
    valid [N, 2, T]     the real tokens
    response [N, 2, T]  1 at the answer's tokens and its end-of-text: what a log-probability sums
    weights [N]         1 per pair
  A sequence longer than `max_length` is cut (its end-of-text lost); a record whose prompt
  alone takes `max_length` tokens is dropped. The report counts both: {"kept", "cut",
  "dropped"}, and "rows", the index of each kept record.
  """
  eot = tokenizer.eot_id
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  prompts = [bos + p for p in tokenizer.encode_batch(
      [alpaca_prompt(r["instruction"], r.get("input") or "") for r in records])]
  answers = [tokenizer.encode_batch([r[field] for r in records])
             for field in (chosen_field, rejected_field)]
  rows, kept, cut = [], [], 0
  for i, prompt in enumerate(prompts):
    if len(prompt) >= max_length:
      continue
    pair = [prompt + answer[i] + [eot] for answer in answers]
    cut += any(len(seq) > max_length for seq in pair)
    rows.append([seq[:max_length] for seq in pair])
    kept.append(i)
  if not rows:
    raise UserError(f"data.max_length={max_length}: every prompt fills it; no preference pair "
                    "is left")
  length = max(len(seq) for pair in rows for seq in pair)
  tokens, valid = (x.reshape(len(rows), 2, length)
                   for x in pad([seq for pair in rows for seq in pair], length, eot))
  response = np.zeros((len(rows), 2, length), np.float32)
  for n, (i, pair) in enumerate(zip(kept, rows)):
    for a, seq in enumerate(pair):
      response[n, a, len(prompts[i]):len(seq)] = 1.0
  examples = {"tokens": tokens, "valid": valid, "response": response,
              "weights": np.ones(len(rows), np.float32)}
  return examples, {"kept": len(rows), "cut": cut, "dropped": len(records) - len(rows),
                    "rows": np.asarray(kept)}


def take_rows(arrays: dict):
  """`take` for examples held in memory."""
  return lambda idx, _: {k: v[idx] for k, v in arrays.items()}


# ---------------------------------------------------------------------------------------------
# BERT pre-training: sentence pairs and masking

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
IS_NEXT, RANDOM_NEXT = 0, 1  # next-sentence labels, as transformers' BertForPreTraining


def sentences(text: str) -> list[str]:
  """A document cut at line breaks and after . ! ? followed by space."""
  return [s.strip() for s in _SENTENCE_END.split(text or "") if s.strip()]


def _segments(doc_sentence_ids: list[list[int]], target: int) -> list[list[int]]:
  """Consecutive sentences joined until each piece holds at least `target` tokens."""
  pieces, current = [], []
  for ids in doc_sentence_ids:
    current = current + ids
    if len(current) >= target:
      pieces.append(current)
      current = []
  if current:
    pieces.append(current)
  return pieces


class SentencePairs:
  """[CLS] A [SEP] B [SEP] pairs for next-sentence prediction.

  Documents are cut into pieces of consecutive sentences (at least half a pair's length each);
  example i is piece A_i, and in each epoch B is drawn from (seed, epoch, i): the piece after
  A_i half of the time, a piece of another document otherwise. A pair too long loses tokens
  from its longer side.
  """

  def __init__(self, texts: list[str], tokenizer, max_length: int, seed: int):
    self.tokenizer, self.max_length, self.seed = tokenizer, max_length, seed
    self.docs = []
    for text in texts:
      sentence_ids = [ids for ids in tokenizer.encode_batch(sentences(text)) if ids]
      self.docs.append(_segments(sentence_ids, (max_length - 3) // 2))
    self.anchors = [(d, k) for d, pieces in enumerate(self.docs) for k in range(len(pieces) - 1)]
    if sum(1 for d in self.docs if d) < 2 or not self.anchors:
      raise UserError(f"next-sentence prediction needs at least 2 documents, one of them with 2 "
                      f"pieces of {(max_length - 3) // 2} tokens; use more text or a smaller "
                      "data.max_length")
    self.non_empty = [d for d, pieces in enumerate(self.docs) if pieces]

  def __len__(self):
    return len(self.anchors)

  def take(self, indices: np.ndarray, epochs: np.ndarray) -> dict:
    """Arrays tokens, segments, valid [n, max_length]; nsp_labels, weights [n]."""
    tok, L = self.tokenizer, self.max_length
    rows, labels = [], []
    for i, epoch in zip(indices, epochs):
      rng = np.random.default_rng([self.seed, 3, int(epoch), int(i)])
      d, k = self.anchors[int(i)]
      a = list(self.docs[d][k])
      others = [o for o in self.non_empty if o != d]
      if rng.random() < 0.5 or not others:
        b, label = list(self.docs[d][k + 1]), IS_NEXT
      else:
        other = self.docs[others[rng.integers(len(others))]]
        b, label = list(other[rng.integers(len(other))]), RANDOM_NEXT
      while len(a) + len(b) > L - 3:
        (a if len(a) >= len(b) else b).pop()
      rows.append(([tok.cls_id] + a + [tok.sep_id] + b + [tok.sep_id], len(a) + 2))
      labels.append(label)
    tokens, valid = pad([r for r, _ in rows], L, tok.pad_id)
    segments = (np.arange(L)[None, :] >= np.array([n for _, n in rows])[:, None]) & valid
    return {"tokens": tokens, "segments": segments.astype(np.int32), "valid": valid,
            "nsp_labels": np.array(labels, np.int32), "weights": np.ones(len(rows), np.float32)}


def max_predictions(max_length: int, rate: float) -> int:
  return max(1, int(np.ceil(rate * max_length)) + 1)


def mask_tokens(examples: dict, indices: np.ndarray, epochs: np.ndarray, tokenizer, rate: float,
                seed: int) -> dict:
  """BERT's masking of each example, drawn from (seed, epoch, example): `rate` of the
  non-special tokens are selected; of those 80% become [MASK], 10% a random token, 10% stay.

  Adds mlm_positions, mlm_ids (the original tokens) and mlm_weights [n, P] to the examples.
  """
  tokens = examples["tokens"].copy()
  n, L = tokens.shape
  P = max_predictions(L, rate)
  positions = np.zeros((n, P), np.int32)
  ids = np.zeros((n, P), np.int32)
  weights = np.zeros((n, P), np.float32)
  specials = np.isin(tokens, list(tokenizer.special_ids)) | ~examples["valid"]
  for r in range(n):
    rng = np.random.default_rng([seed, 4, int(epochs[r]), int(indices[r])])
    candidates = np.flatnonzero(~specials[r])
    k = min(max(1, int(round(rate * len(candidates)))), P, len(candidates))
    chosen = np.sort(rng.choice(candidates, k, replace=False))
    positions[r, :k], ids[r, :k], weights[r, :k] = chosen, tokens[r, chosen], 1.0
    draw = rng.random(k)
    tokens[r, chosen[draw < 0.8]] = tokenizer.mask_id
    random = chosen[(draw >= 0.8) & (draw < 0.9)]
    tokens[r, random] = rng.integers(0, tokenizer.vocab_size, len(random))
  return {**examples, "tokens": tokens, "mlm_positions": positions, "mlm_ids": ids,
          "mlm_weights": weights}
