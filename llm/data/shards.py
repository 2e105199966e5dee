"""A corpus tokenized once, into shards that every process of every run reads memory-mapped.

    DIR/index.json      written last, so its presence means complete:
                        {"format", "tokenizer" (fingerprint), "eot_id", "dtype", "documents",
                         "tokens", "documents_per_shard", "source", "text_field",
                         "shards": [{"file", "documents", "tokens"}, ...]}
    DIR/tokenizer/      the tokenizer's files: a run that reads DIR needs nothing else
    DIR/00000.npy ...   shard i: the token ids of documents [i * K, (i + 1) * K), each document
                        followed by end-of-text (K: documents_per_shard), a 1-D .npy array
                        (written as it is tokenized; its header, 128 bytes, last)
    DIR/00000.json      shard i's record {"documents", "tokens", "tokenizer"}, written after its
                        array: a killed preparation keeps the shards that have one
    DIR/plan.json       what is being prepared (a resumed preparation must match it)

The shards concatenated are the run's token stream, so windows, batches and their order do not
depend on how the corpus was cut. DIR may be a local folder or a bucket (gs://...), through
etils.epath; local shards are memory-mapped, remote ones read by byte range.
"""

import collections
import concurrent.futures
import ctypes
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np
from etils import epath

from llm import files
from llm.data import sources
from llm.errors import UserError

FORMAT = "llm-token-shards/1"
INDEX, PLAN = "index.json", "plan.json"
DOCUMENTS_PER_SHARD = 20_000  # OpenWebText: about 100 MB of text, 25M tokens, per shard
BATCH = 1_000  # documents tokenized at once, at most ...
BATCH_CHARS = 2_000_000  # ... and characters


def _is_local(path) -> bool:
  return "://" not in str(path)


def _folder(path: str) -> epath.Path:
  directory = epath.Path(path)
  try:
    directory.exists()
  except ImportError as e:  # a bucket without its file system library (gcsfs)
    raise UserError(f"{path}: {e} (pip install gcsfs)") from None
  return directory


def _write_json(path: epath.Path, value) -> None:
  with files.written(path) as tmp:
    tmp.write_text(json.dumps(value, indent=1))


def _read_json(path: epath.Path, what: str) -> dict:
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError):
    raise UserError(f"{path} is not valid JSON: {what} damaged; prepare the data into a new "
                    "folder") from None


def dtype_for(vocab_size: int):
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def shard_name(i: int) -> str:
  return f"{i:05d}"


# ---------------------------------------------------------------------------------------------
# Writing


def encode_documents(texts, tokenizer, dtype) -> np.ndarray:
  """The documents' tokens in one array, each document followed by end-of-text."""
  eot = np.array([tokenizer.eot_id], dtype)
  arrays = tokenizer.encode_arrays([t or "" for t in texts])
  return np.concatenate([part for ids in arrays for part in (ids.astype(dtype), eot)])


def _tokenized_batches(batches, tokenizer, dtype, ahead: int = 2):
  """(`encode_documents` of each batch of texts, its number of documents), in order; `ahead`
  batches are tokenized at once (each by the tokenizer's batch API, on every core), so that
  one batch's tokenizing overlaps another's conversion into an array, which holds Python's
  lock."""
  with concurrent.futures.ThreadPoolExecutor(ahead) as pool:
    pending = collections.deque()
    for batch in batches:
      pending.append((pool.submit(encode_documents, batch, tokenizer, dtype), len(batch)))
      if len(pending) > ahead:
        future, count = pending.popleft()
        yield future.result(), count
    while pending:
      future, count = pending.popleft()
      yield future.result(), count


def _shard_done(directory: epath.Path, i: int, fingerprint: str, itemsize: int) -> bool:
  """Shard i was written whole by a preparation with this tokenizer."""
  record, array = directory / f"{shard_name(i)}.json", directory / f"{shard_name(i)}.npy"
  if not (record.exists() and array.exists()):
    return False
  saved = _read_json(record, f"the record of shard {i}")
  return (saved.get("tokenizer") == fingerprint
          and _npy_size(array) == HEADER + saved["tokens"] * itemsize)


class ReadError(Exception):
  """The documents could not be read (a malformed file, a network error); its argument is the
  error that says why."""


class _Texts:
  """The documents' texts in order from document `first`, taken shard by shard, from a
  `datasets.IterableDataset` (a stream: what llm.prepare and llm.train read) or Dataset."""

  def __init__(self, ds, text_field: str, first: int):
    self._chunks, self._left = self._read(ds, text_field, first), collections.deque()
    self.taken = 0  # texts handed out (or skipped) since `first`

  @staticmethod
  def _read(ds, text_field, first):
    try:
      seen = 0
      for batch in ds.iter(batch_size=BATCH):
        texts = batch[text_field]
        if seen + len(texts) > first:
          yield texts[max(first - seen, 0):]
        seen += len(texts)
    except Exception as e:  # datasets, pyarrow and the network raise many types
      raise ReadError(e) from e

  def take(self, n: int):
    """Up to `n` more texts (fewer at the end of the data), in lists of at most BATCH texts or
    BATCH_CHARS characters (one longer text alone), so that the memory a batch takes does not
    depend on the corpus."""
    while n > 0:
      batch, chars = [], 0
      while n > 0 and len(batch) < BATCH and chars < BATCH_CHARS:
        if not self._left:
          self._left.extend(next(self._chunks, ()))
          if not self._left:
            n = 0
            break
        text = self._left.popleft()
        batch.append(text)
        chars += len(text or "")
        n -= 1
      self.taken += len(batch)
      if batch:
        yield batch

  def skip(self, n: int) -> None:
    for _ in self.take(n):
      pass


def _return_freed_memory():
  """A callable that hands memory freed by the tokenizer's threads back to the system (glibc's
  malloc_trim): their allocator arenas otherwise keep every batch's peak, and resident memory
  grows with the corpus (1 GB: 655 MB instead of 515 MB). Elsewhere, nothing to do."""
  try:
    return ctypes.CDLL("libc.so.6").malloc_trim
  except (OSError, AttributeError):
    return lambda pad: None


HEADER = 128  # bytes: every shard's .npy header, padded, so its token count is written last
#               and a reader knows where the tokens start without reading it


def _npy_header(dtype, length: int) -> bytes:
  """The .npy (version 1.0) header of a 1-D array of `length` items, HEADER bytes long."""
  text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
               "shape": (length,)})
  text = text.ljust(HEADER - 10 - 1) + "\n"
  return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")


def _local_file() -> epath.Path:
  """A new file on this machine's disk, where a bucket's file is made before it is copied."""
  handle, name = tempfile.mkstemp(suffix=".npy")
  os.close(handle)
  return epath.Path(name)


def _write_shard(path: epath.Path, parts, dtype, on_part=lambda part, documents: None) -> int:
  """Writes the arrays of `parts` ((tokens, documents) pairs) one after another as one .npy
  file at `path`, never holding more than one; returns the number of tokens. Written locally,
  then moved into place."""
  length = 0
  local = path if _is_local(path) else _local_file()  # a bucket's file cannot be written out
  try:                                                  # of order: made here, copied there
    with files.written(local) as tmp, open(os.fspath(tmp), "wb") as f:
      f.write(b"\0" * HEADER)
      for part, documents in parts:
        f.write(part.tobytes())
        length += len(part)
        on_part(part, documents)
      f.seek(0)
      f.write(_npy_header(dtype, length))
    if local != path:
      with local.open("rb") as made, files.written(path) as tmp, tmp.open("wb") as out:
        shutil.copyfileobj(made, out)
  finally:
    if local != path:
      local.unlink(missing_ok=True)
  return length


def prepare(ds, tokenizer, text_field: str, out: str,
            documents_per_shard: int = DOCUMENTS_PER_SHARD, progress: bool = True,
            source: str = "") -> "Shards":
  """Tokenizes the documents of `ds` (a `datasets.Dataset`, or an `IterableDataset` read as a
  stream: no copy of the corpus first) into shards in `out`; returns them opened.

  `source` names the data (default: the Dataset's fingerprint). A folder that is already
  complete is opened as it is (after checking that it holds this tokenizer's shards); one left
  by a killed preparation of the same data is completed. Memory stays at a few batches of
  documents whatever the corpus and shard sizes.
  """
  directory = _folder(out)
  if (directory / INDEX).exists():
    return open_shards(out, tokenizer)
  directory.mkdir(parents=True, exist_ok=True)
  dtype = dtype_for(tokenizer.vocab_size)
  plan = {"format": FORMAT, "tokenizer": tokenizer.fingerprint(), "eot_id": tokenizer.eot_id,
          "dtype": np.dtype(dtype).name, "documents_per_shard": documents_per_shard,
          "source": source or ds._fingerprint, "text_field": text_field}
  if (directory / PLAN).exists():
    unfinished = _read_json(directory / PLAN, "the preparation's plan")
    if unfinished != plan:
      differ = ", ".join(k for k in plan if unfinished.get(k) != plan[k])
      raise UserError(f"{out} holds an unfinished preparation of other data or another tokenizer "
                      f"({differ} differ); use another folder, or delete it to start over")
  else:
    _write_json(directory / PLAN, plan)
  if _is_local(directory):
    files.remove_stale(directory)
  with tempfile.TemporaryDirectory() as tmp:  # tokenizer.save writes local files
    tokenizer.save(tmp)
    (directory / "tokenizer").mkdir(exist_ok=True)
    for name in os.listdir(tmp):
      (directory / "tokenizer" / name).write_bytes(epath.Path(tmp, name).read_bytes())

  k, itemsize = documents_per_shard, np.dtype(dtype).itemsize
  done = 0  # the shards before the first one to write
  while _shard_done(directory, done, plan["tokenizer"], itemsize):
    done += 1
  records = [_read_json(directory / f"{shard_name(i)}.json", f"the record of shard {i}")
             for i in range(done)]
  bar, started, made = None, time.perf_counter(), [0]
  if progress:
    import tqdm
    bar = tqdm.tqdm(total=_length(ds), initial=done * k, unit="doc", desc="tokenizing",
                    smoothing=0.1, dynamic_ncols=True)
  trim = _return_freed_memory()

  def on_part(part, documents):
    trim(0)
    made[0] += len(part)
    if bar is not None:
      bar.update(documents)
      bar.set_postfix(tokens_per_s=f"{made[0] / (time.perf_counter() - started):,.0f}")

  last_written = records and records[-1]["documents"] < k  # nothing is left to read
  texts = None if last_written else _Texts(ds, text_field, done * k)
  i = done
  while texts is not None:
    name = shard_name(i)
    if _shard_done(directory, i, plan["tokenizer"], itemsize):  # written by another process
      record = _read_json(directory / f"{name}.json", f"the record of shard {i}")
      texts.skip(record["documents"])
    else:
      before = texts.taken
      tokens = _write_shard(directory / f"{name}.npy",
                            _tokenized_batches(texts.take(k), tokenizer, dtype), dtype, on_part)
      record = {"documents": texts.taken - before, "tokens": tokens,
                "tokenizer": plan["tokenizer"]}
      if record["documents"] == 0:  # the data ended with the shard before
        (directory / f"{name}.npy").unlink()
        break
      _write_json(directory / f"{name}.json", record)
    records.append(record)
    if record["documents"] < k:
      break
    i += 1
  if bar is not None:
    bar.close()
  if not records:
    raise UserError("the data holds no documents")

  shards = [{"file": f"{shard_name(i)}.npy", "documents": r["documents"], "tokens": r["tokens"]}
            for i, r in enumerate(records)]
  _write_json(directory / INDEX, {**plan, "documents": sum(s["documents"] for s in shards),
                                  "tokens": sum(s["tokens"] for s in shards), "shards": shards})
  (directory / PLAN).unlink(missing_ok=True)  # (another process may have done the same)
  return open_shards(out, tokenizer)


def _length(ds) -> int | None:
  """The number of documents, where it is known before reading them."""
  try:
    return len(ds)
  except TypeError:  # a stream: the hub's count of the split, if it has one
    splits = ds.info.splits or {}
    split = splits.get(str(ds.split)) if ds.split else None
    return split.num_examples if split and split.num_examples else None


# ---------------------------------------------------------------------------------------------
# Reading


def _npy_size(path: epath.Path) -> int:
  return path.stat().length


class _RemoteArray:
  """A 1-D .npy array in a bucket, read by byte range (what memory-mapping is for local files)."""

  def __init__(self, path: epath.Path, length: int, dtype):
    self.path, self.length, self.dtype = path, length, np.dtype(dtype)
    self.offset = HEADER

  def __len__(self):
    return self.length

  def __getitem__(self, index: slice) -> np.ndarray:
    start, stop, _ = index.indices(self.length)
    with self.path.open("rb") as f:
      f.seek(self.offset + start * self.dtype.itemsize)
      data = f.read(max(stop - start, 0) * self.dtype.itemsize)
    return np.frombuffer(data, self.dtype)


class Tokens:
  """A token stream held in consecutive arrays (shards), read without loading them: `len`,
  `read(start, stop)` (a numpy array, across shard boundaries) and `sub(start, stop)`."""

  def __init__(self, parts, start: int = 0, stop: int | None = None):
    self.parts = list(parts)
    self.ends = np.cumsum([len(p) for p in self.parts], dtype=np.int64)
    self.start = start
    self.stop = int(self.ends[-1]) if stop is None else stop

  def __len__(self):
    return self.stop - self.start

  def sub(self, start: int, stop: int) -> "Tokens":
    return Tokens(self.parts, self.start + start, self.start + stop)

  def read(self, start: int, stop: int) -> np.ndarray:
    start, stop = self.start + start, self.start + min(stop, len(self))
    pieces = []
    while start < stop:
      i = int(np.searchsorted(self.ends, start, side="right"))
      begin = int(self.ends[i - 1]) if i else 0
      end = min(stop, int(self.ends[i]))
      pieces.append(np.asarray(self.parts[i][start - begin:end - begin]))
      start = end
    return np.concatenate(pieces) if len(pieces) != 1 else pieces[0]

  def __array__(self, dtype=None, copy=None):
    array = self.read(0, len(self))
    return array if dtype is None else array.astype(dtype)


def as_tokens(tokens) -> Tokens:
  return tokens if isinstance(tokens, Tokens) else Tokens([np.asarray(tokens)])


class Shards:
  """A prepared folder: its index and its tokens."""

  def __init__(self, path: str, index: dict, tokens: Tokens):
    self.path, self.index, self.tokens = path, index, tokens

  @property
  def eot_id(self) -> int:
    return self.index["eot_id"]


def saved_tokenizer(path: str):
  """The tokenizer saved with the shards in `path`."""
  from llm.text import tokenizer as tokenizer_lib
  folder = _folder(path) / "tokenizer"
  if not folder.exists():
    open_shards(path)  # says what is wrong with the folder
    raise UserError(f"{path} has no tokenizer/ folder; prepare it again with python -m llm.prepare")
  with tempfile.TemporaryDirectory() as tmp:
    for file in folder.iterdir():
      with open(os.path.join(tmp, file.name), "wb") as f:
        f.write(file.read_bytes())
    return tokenizer_lib.load(tmp)


def open_shards(path: str, tokenizer=None) -> Shards:
  """The shards prepared in `path`, checked: complete, of `tokenizer` (when given), not
  truncated. Local shards are memory-mapped; nothing is read yet."""
  directory = _folder(path)
  if not directory.exists():
    raise UserError(f"data.prepared={path!r}: no such folder; prepare it with python -m "
                    "llm.prepare --config=... --out=FOLDER")
  if not (directory / INDEX).exists():
    unfinished = (directory / PLAN).exists()
    raise UserError(f"data.prepared={path!r} holds no complete preparation ("
                    + ("an unfinished one: run python -m llm.prepare again to complete it)"
                       if unfinished else "no index.json; prepare it with python -m llm.prepare)"))
  index = _read_json(directory / INDEX, "the index of the shards")
  if index.get("format") != FORMAT:
    raise UserError(f"{path}: format {index.get('format')!r}, not {FORMAT!r}; prepare it again")
  if tokenizer is not None and index["tokenizer"] != tokenizer.fingerprint():
    raise UserError(f"{path} was prepared with another tokenizer ({index['tokenizer']}, this run "
                    f"uses {tokenizer.fingerprint()}); prepare it again for this tokenizer")
  if not index["shards"] or index["tokens"] == 0:
    raise UserError(f"{path} holds no tokens")
  dtype = np.dtype(index["dtype"])
  parts = []
  for shard in index["shards"]:
    file = directory / shard["file"]
    if not file.exists():
      raise UserError(f"{file} is missing; prepare the data again")
    expected = HEADER + shard["tokens"] * dtype.itemsize
    if _npy_size(file) != expected:
      raise UserError(f"{file} holds {_npy_size(file):,} bytes, not the {expected:,} its index "
                      "says: the shard is truncated or damaged; prepare the data again")
    if _is_local(file):
      parts.append(np.load(os.fspath(file), mmap_mode="r"))
    else:
      parts.append(_RemoteArray(file, shard["tokens"], dtype))
  return Shards(path, index, Tokens(parts))


def prepare_tokens(data_cfg, ds, tokenizer, out: str = "",
                   documents_per_shard: int = DOCUMENTS_PER_SHARD,
                   progress: bool = True) -> Shards:
  """The documents of `ds` (the data `data_cfg` names) tokenized into shards in `out` (default:
  its cache folder), once: a folder already complete is opened, one left unfinished is
  completed."""
  out = out or cache_folder(data_cfg, tokenizer)
  try:
    return prepare(ds, tokenizer, data_cfg.text_field, out, documents_per_shard, progress,
                   source=sources.source_key(data_cfg))
  except ReadError as e:
    raise sources.read_error(data_cfg, e.args[0]) from None


def cache_folder(data_cfg, tokenizer) -> str:
  """The cache folder of the shards of (data, tokenizer, text field): where a run's token
  stream is prepared and read (and `python -m llm.prepare` writes without --out)."""
  cache_dir = data_cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "llm")
  key = hashlib.sha256(f"{sources.source_key(data_cfg)}|{tokenizer.fingerprint()}|"
                       f"{data_cfg.text_field}".encode()).hexdigest()[:20]
  return os.path.join(cache_dir, f"tokens-{key}")
