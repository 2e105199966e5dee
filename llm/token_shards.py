"""A corpus tokenized once, into shards that every process of every run reads memory-mapped.

    DIR/index.json      written last, so its presence means complete:
                        {"format", "tokenizer" (fingerprint), "eot_id", "dtype", "documents",
                         "tokens", "documents_per_shard", "source", "text_field",
                         "shards": [{"file", "documents", "tokens"}, ...]}
    DIR/tokenizer/      the tokenizer's files: a run that reads DIR needs nothing else
    DIR/00000.npy ...   shard i: the token ids of documents [i * K, (i + 1) * K), each document
                        followed by end-of-text (K: documents_per_shard), a 1-D .npy array
    DIR/00000.json      shard i's record {"documents", "tokens", "tokenizer"}, written after its
                        array: a killed preparation keeps the shards that have one
    DIR/plan.json       what is being prepared (a resumed preparation must match it)

The shards concatenated are the run's token stream, so windows, batches and their order do not
depend on how the corpus was cut. DIR may be a local folder or a bucket (gs://...), through
etils.epath; local shards are memory-mapped, remote ones read by byte range.
"""

import concurrent.futures
import json
import os
import tempfile
import time

import numpy as np
from etils import epath

from llm.errors import UserError

FORMAT = "llm-token-shards/1"
INDEX, PLAN = "index.json", "plan.json"
DOCUMENTS_PER_SHARD = 20_000  # OpenWebText: about 100 MB of text, 25M tokens, per shard
BATCH = 1_000  # documents tokenized at once


def _is_local(path) -> bool:
  return "://" not in str(path)


def _write_atomic(path: epath.Path, write) -> None:
  """write(file) into a temporary name beside `path`, then renamed: never half a file."""
  tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
  with tmp.open("wb") as f:
    write(f)
  tmp.replace(path)


def _write_json(path: epath.Path, value) -> None:
  _write_atomic(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


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
  ids = tokenizer.encode_batch([t or "" for t in texts])
  lengths = np.fromiter((len(d) + 1 for d in ids), np.int64, len(ids))
  out = np.empty(int(lengths.sum()), dtype)
  ends = np.cumsum(lengths)
  out[ends - 1] = tokenizer.eot_id
  for doc, end, n in zip(ids, ends, lengths):
    out[end - n:end - 1] = doc
  return out


def _tokenized_batches(batches, tokenizer, dtype):
  """`encode_documents` of each batch of texts; the next batch is tokenized (the tokenizer's
  batch API, on every core) while this one is handed on."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    pending = None
    for batch in batches:
      following = pool.submit(encode_documents, batch, tokenizer, dtype)
      if pending is not None:
        yield pending.result()
      pending = following
    if pending is not None:
      yield pending.result()


def _shard_done(directory: epath.Path, i: int, fingerprint: str, itemsize: int) -> bool:
  """Shard i was written whole by a preparation with this tokenizer."""
  record, array = directory / f"{shard_name(i)}.json", directory / f"{shard_name(i)}.npy"
  if not (record.exists() and array.exists()):
    return False
  saved = _read_json(record, f"the record of shard {i}")
  return (saved.get("tokenizer") == fingerprint
          and _npy_size(array) == _npy_header_size(array) + saved["tokens"] * itemsize)


def prepare(ds, tokenizer, text_field: str, out: str,
            documents_per_shard: int = DOCUMENTS_PER_SHARD, progress: bool = True) -> "Shards":
  """Tokenizes the `datasets.Dataset` `ds` into shards in `out`; returns them opened.

  A folder that is already complete is opened as it is (after checking that it holds this
  tokenizer's shards); one left by a killed preparation of the same data is completed. Memory
  stays at one shard and two batches of documents whatever the corpus size.
  """
  directory = epath.Path(out)
  if (directory / INDEX).exists():
    return open_shards(out, tokenizer)
  directory.mkdir(parents=True, exist_ok=True)
  dtype = dtype_for(tokenizer.vocab_size)
  plan = {"format": FORMAT, "tokenizer": tokenizer.fingerprint(), "eot_id": tokenizer.eot_id,
          "dtype": np.dtype(dtype).name, "documents": len(ds),
          "documents_per_shard": documents_per_shard, "source": ds._fingerprint,
          "text_field": text_field}
  if (directory / PLAN).exists():
    unfinished = _read_json(directory / PLAN, "the preparation's plan")
    if unfinished != plan:
      differ = ", ".join(k for k in plan if unfinished.get(k) != plan[k])
      raise UserError(f"{out} holds an unfinished preparation of other data or another tokenizer "
                      f"({differ} differ); use another folder, or delete it to start over")
  else:
    _write_json(directory / PLAN, plan)
  with tempfile.TemporaryDirectory() as tmp:  # tokenizer.save writes local files
    tokenizer.save(tmp)
    (directory / "tokenizer").mkdir(exist_ok=True)
    for name in os.listdir(tmp):
      (directory / "tokenizer" / name).write_bytes(open(os.path.join(tmp, name), "rb").read())

  n, k = len(ds), documents_per_shard
  num_shards = -(-n // k)
  itemsize = np.dtype(dtype).itemsize
  todo = [i for i in range(num_shards)
          if not _shard_done(directory, i, plan["tokenizer"], itemsize)]
  bar = None
  if progress:
    import tqdm
    bar = tqdm.tqdm(total=n, initial=n - sum(min(k, n - i * k) for i in todo), unit="doc",
                    desc="tokenizing", smoothing=0.1, dynamic_ncols=True)
  started, tokens_made = time.perf_counter(), 0
  for i in todo:
    first, last = i * k, min((i + 1) * k, n)
    batches = (ds[a:min(a + BATCH, last)][text_field] for a in range(first, last, BATCH))
    parts = []
    for part in _tokenized_batches(batches, tokenizer, dtype):
      parts.append(part)
      tokens_made += len(part)
      if bar is not None:
        bar.update(int((part == tokenizer.eot_id).sum()))
        bar.set_postfix(tokens_per_s=f"{tokens_made / (time.perf_counter() - started):,.0f}")
    shard = np.concatenate(parts) if parts else np.zeros(0, dtype)
    del parts
    _write_atomic(directory / f"{shard_name(i)}.npy", lambda f: np.save(f, shard))
    _write_json(directory / f"{shard_name(i)}.json",
                {"documents": last - first, "tokens": len(shard), "tokenizer": plan["tokenizer"]})
  if bar is not None:
    bar.close()

  shards = [{"file": f"{shard_name(i)}.npy", **_read_json(directory / f"{shard_name(i)}.json",
                                                          f"the record of shard {i}")}
            for i in range(num_shards)]
  for shard in shards:
    shard.pop("tokenizer")
  _write_json(directory / INDEX, {**plan, "tokens": sum(s["tokens"] for s in shards),
                                  "shards": shards})
  (directory / PLAN).unlink()
  return open_shards(out, tokenizer)


# ---------------------------------------------------------------------------------------------
# Reading


def _npy_header_size(path: epath.Path) -> int:
  with path.open("rb") as f:
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    read(f)
    return f.tell()


def _npy_size(path: epath.Path) -> int:
  return path.stat().length


class _RemoteArray:
  """A 1-D .npy array in a bucket, read by byte range (what memory-mapping is for local files)."""

  def __init__(self, path: epath.Path, length: int, dtype):
    self.path, self.length, self.dtype = path, length, np.dtype(dtype)
    self.offset = _npy_header_size(path)

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


def read_tokenizer(path: str):
  """The tokenizer saved with the shards in `path`."""
  from llm import tokenizer as tokenizer_lib
  folder = epath.Path(path) / "tokenizer"
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
  directory = epath.Path(path)
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
    expected = _npy_header_size(file) + shard["tokens"] * dtype.itemsize
    if _npy_size(file) != expected:
      raise UserError(f"{file} holds {_npy_size(file):,} bytes, not the {expected:,} its index "
                      "says: the shard is truncated or damaged; prepare the data again")
    if _is_local(file):
      parts.append(np.load(os.fspath(file), mmap_mode="r"))
    else:
      parts.append(_RemoteArray(file, shard["tokens"], dtype))
  return Shards(path, index, Tokens(parts))
