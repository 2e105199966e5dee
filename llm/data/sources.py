"""Documents (or records), from the hub, local files or the embedded corpus: one reader, loaded
whole (a `datasets.Dataset`) or read as a stream (a `datasets.IterableDataset`), and one line
for what cannot be read.
"""

import csv
import glob
import hashlib
import json
import os

from llm.errors import UserError

EXTENSIONS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
              ".tsv": "csv", ".parquet": "parquet"}


def embedded_corpus():
  """The English documentation that ships inside CPython: offline text on every machine."""
  import datasets
  from pydoc_data.topics import topics
  return datasets.Dataset.from_dict({"text": [topics[k] for k in sorted(topics)]})


def local_files(path: str, fmt: str = "") -> list[str]:
  """The files data.path names (a file, glob or folder), all of one readable format."""
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
  files = local_files(data_cfg.path, data_cfg.format)
  if all(os.path.getsize(f) == 0 for f in files):
    raise UserError(f"data.path={data_cfg.path!r} is empty")
  ext = os.path.splitext(files[0])[1].lower()
  fmt = data_cfg.format or ("tsv" if ext == ".tsv" else EXTENSIONS[ext])
  kwargs = {"sample_by": "document"} if fmt == "text" else {}
  if fmt == "tsv":  # tab-separated values carry no quoting: a quote is text
    kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
  if fmt in ("csv", "tsv") and data_cfg.columns:  # a file without a header row
    kwargs["column_names"] = [c.strip() for c in data_cfg.columns.split(",")]
  return ("csv" if fmt == "tsv" else fmt), files, kwargs


def open_documents(data_cfg, fields=None, complete: bool = False, stream: bool = False,
                   check: bool = True):
  """The documents (or records) data_cfg names, one per row: data.hf_name from the hub,
  data.path's local files, or else the embedded corpus; `fields` (default: the text field;
  or a function of the columns, for records of several formats) must be among their columns.

  Loaded whole by default (a `datasets.Dataset`; `complete`: every record must have a value
  for every field, or is named, or dropped with data.skip_bad_rows). With `stream`, a
  `datasets.IterableDataset` read as it is needed: nothing downloaded or copied first; `check`
  reads its first record to check the fields, after which the stream's state is no longer its
  beginning (open it again, unchecked, to read it from the start).
  """
  import datasets
  # A file that does not parse is said in one line (read_error), not logged on the way.
  datasets.logging.set_verbosity(datasets.logging.CRITICAL)
  datasets.disable_progress_bars()
  fields = fields or (data_cfg.text_field,)
  try:
    if data_cfg.hf_name:
      ds = datasets.load_dataset(data_cfg.hf_name, data_cfg.hf_config or None,
                                 split=data_cfg.split, streaming=stream)
    elif data_cfg.path:
      builder, files, kwargs = local_builder(data_cfg)
      ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=stream,
                                 **kwargs)
    else:
      ds = embedded_corpus()
      return ds.to_iterable_dataset() if stream else ds
  except UserError:
    raise
  except Exception as e:  # datasets raises many types for unreadable input
    raise read_error(data_cfg, e) from None
  where = data_cfg.hf_name or data_cfg.path
  if stream:
    ds = ds.map(_TextCheck([f for f in fields if f != data_cfg.label_field], where),
                with_indices=True)
    if not check:
      return ds
    try:
      first_record = next(iter(ds), None)
    except Exception as e:  # a file that does not parse, a network error
      raise read_error(data_cfg, e) from None
    columns = list(first_record or ())
  else:
    first_record, columns = (ds[0] if len(ds) else None), ds.column_names
  if callable(fields):
    fields = fields(columns)
  for field in fields:
    if field not in columns and (first_record is not None or not stream):
      raise UserError(f"the data has no field {field!r} (columns: {', '.join(columns)}); "
                      "set data.text_field / data.label_field, or data.columns for a CSV/TSV "
                      "file without a header row")
  if not stream:
    _check_text(ds, [f for f in fields if f != data_cfg.label_field], where, complete)
  if complete and not stream:
    ds = _complete_records(ds, fields, data_cfg.skip_bad_rows)
  if first_record is None or (not stream and len(ds) == 0):
    raise UserError(f"the data at {where!r} holds no records")
  return ds


def _check_text(ds, fields, where: str, complete: bool) -> None:
  """Every value of the text `fields` is a string or missing (null), read from the column's
  type and null count, not row by row. A missing text of a corpus is said (it adds nothing);
  a record task's are named by _complete_records."""
  import datasets
  for field in fields:
    if isinstance(ds.features[field], (datasets.List, datasets.LargeList)):
      continue  # a conversation's messages: prompts.py checks them record by record
    if not (isinstance(ds.features[field], datasets.Value)
            and ds.features[field].dtype in ("string", "large_string")):
      row, value = next((row, v) for row, v in enumerate(ds[field])
                        if v is not None and not isinstance(v, str))
      raise UserError(f"{where}: record {row + 1} (counting from 1) has {field}={value!r}, "
                      f"not text; every {field!r} must be a string")
    missing = ds.data.column(field).null_count
    if missing and not complete:
      first = ds[field].index(None)
      print(f"note: {missing} of {len(ds)} records of {where} have no {field!r} (null; the "
            f"first: record {first + 1}, counting from 1); they add nothing")


class _TextCheck:
  """A stream's `_check_text`, record by record as it is read: a value that is not text stops
  the run naming its record; the first missing one is said."""

  def __init__(self, fields, where: str):
    self.fields, self.where, self.said = fields, where, False

  def __call__(self, record: dict, row: int) -> dict:
    for field in self.fields:
      value = record.get(field)
      if value is None and not self.said:
        self.said = True
        print(f"note: record {row + 1} of {self.where} (counting from 1) has no {field!r} "
              "(null); such records add nothing")
      elif value is not None and not isinstance(value, str):
        raise UserError(f"{self.where}: record {row + 1} (counting from 1) has "
                        f"{field}={value!r}, not text; every {field!r} must be a string")
    return record


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


def first_chars(texts, max_chars: int):
  """Texts, in order, until `max_chars` characters are read (what a tokenizer trains on)."""
  seen = 0
  for text in texts:
    text = text or ""
    yield text
    seen += len(text)
    if seen >= max_chars:
      return


def source_key(data_cfg) -> str:
  """What names a corpus: the hub data set, the local files (with their sizes and times, so
  that an edited file is tokenized again) or the embedded corpus."""
  if data_cfg.hf_name:
    return f"hub|{data_cfg.hf_name}|{data_cfg.hf_config}|{data_cfg.split}"
  if data_cfg.path:
    files = local_files(data_cfg.path, data_cfg.format)
    return "files|" + "|".join(
        f"{os.path.abspath(f)}:{os.path.getsize(f)}:{os.stat(f).st_mtime_ns}" for f in files) + (
            f"|{data_cfg.format}|{data_cfg.columns}")
  from pydoc_data.topics import topics
  return "embedded|" + hashlib.sha256("".join(topics[k] for k in sorted(topics)).encode()
                                      ).hexdigest()[:16]


def _find_problem(files: list[str], fmt: str) -> str | None:
  """What makes a local file unreadable, with its line number: text that is not UTF-8, or a
  JSON line that does not parse. None when nothing is found."""
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


def read_error(data_cfg, error) -> UserError:
  """One line for documents that could not be read: what in the local files is wrong (with its
  line number), or the error's first line and what to check."""
  where = data_cfg.hf_name or data_cfg.path or "the embedded corpus"
  if data_cfg.path and not data_cfg.hf_name:
    files = local_files(data_cfg.path, data_cfg.format)
    fmt = data_cfg.format or EXTENSIONS.get(os.path.splitext(files[0])[1].lower(), "")
    problem = _find_problem(files, fmt)
    if problem:
      return UserError(f"could not read data.path={where!r}: {problem}")
  first = (str(error).strip().splitlines() or [type(error).__name__])[0]
  hint = ("check the name, the network (HF_DATASETS_OFFLINE) or use data.path"
          if data_cfg.hf_name else "check that the file is well-formed")
  return UserError(f"could not read data from {where!r}: {first[:300]}; {hint}")
