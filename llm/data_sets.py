"""Downloads the public data sets the README's examples use, from their original sources.

    python -m llm.data_sets list
    python -m llm.data_sets fetch sms_spam data/          # -> data/SMSSpamCollection
    python -m llm.data_sets fetch alpaca_book data/       # -> data/instruction-data.json
    python -m llm.data_sets fetch hellaswag data/         # -> data/hellaswag_val.jsonl

Sources are pinned: a git host's files at a commit, a release's at its fixed address, and each
file's sha256 where it could be verified (`DataSet.sha256`). Every file of a data set is
downloaded and checked (its sha256, its format) before any is written, atomically, into DIR; a
mismatch is one line and nothing is written. A file already there is kept. Offline, the command
says in one line where the file comes from, so it can be copied by hand. `--mirror=URL` (or
LLM_DATA_MIRROR) fetches every file as URL/<file name of the source> instead, e.g. from a local
copy, checked the same way.
"""

import dataclasses
import hashlib
import io
import json
import os
import urllib.error
import urllib.request
import zipfile
from typing import Callable

from absl import flags

from llm import cli
from llm.errors import UserError


@dataclasses.dataclass(frozen=True)
class DataSet:
  what: str
  url: str
  files: tuple[str, ...]  # written into DIR
  # The sha256 of each file as written ("": not pinned, because its source could not be read
  # where the pins were taken; its format is still checked, and its sha256 printed).
  sha256: tuple[str, ...] = ()
  member: str = ""  # for a zip archive: the member holding the (single) file
  # Benchmarks: each file made from its own URLs' contents by `convert` (into JSON lines).
  sources: tuple[tuple[str, ...], ...] = ()
  convert: Callable | None = None


def _parquet_to_jsonl(contents: list[bytes]) -> bytes:
  """A Hugging Face data set's parquet file as JSON lines of its records."""
  import pyarrow.parquet as pq
  rows = pq.read_table(io.BytesIO(contents[0])).to_pylist()
  return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _piqa(contents: list[bytes]) -> bytes:
  """PIQA's records (goal, sol1, sol2) with the label of each from its labels file."""
  records = [json.loads(line) for line in contents[0].decode().splitlines() if line.strip()]
  labels = [int(x) for x in contents[1].decode().split()]
  if len(labels) != len(records):
    raise UserError(f"{len(records)} records but {len(labels)} labels; the source may have "
                    "moved")
  return "".join(json.dumps({**r, "label": y}) + "\n" for r, y in zip(records, labels)).encode()


def _zip_member(member: str):
  def convert(contents: list[bytes]) -> bytes:
    try:
      with zipfile.ZipFile(io.BytesIO(contents[0])) as archive:
        return archive.read(member)
    except (zipfile.BadZipFile, KeyError):
      raise UserError(f"the download is not a zip archive holding {member}; the source may "
                      "have moved") from None
  return convert


# rasbt/LLMs-from-scratch at a fixed commit (2026-04-16).
BOOK = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/"
        "28c65cdfbc3338e2e040016eea4b7fdf556e4d57/")
DATA_SETS = {
    "sms_spam": DataSet(
        "UCI SMS Spam Collection v.1: 5,574 'label<TAB>text' lines (4,827 ham, 747 spam); "
        "classification fine-tuning",
        "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
        ("SMSSpamCollection",),
        ("7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",),
        member="SMSSpamCollection"),
    "alpaca_book": DataSet(
        "1,100 Alpaca-style instruction records (the book's chapter 7); instruction tuning",
        BOOK + "ch07/01_main-chapter-code/instruction-data.json", ("instruction-data.json",),
        ("7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",)),
    "preference_book": DataSet(
        "1,100 instruction records with a polite 'chosen' and an impolite 'rejected' answer; "
        "preference tuning",
        BOOK + "ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
        ("instruction-data-with-preference.json",),
        ("305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",)),
    "verdict": DataSet(
        "Edith Wharton's short story 'The Verdict' (public domain), 20,479 characters; "
        "evaluating a language model",
        BOOK + "ch02/01_main-chapter-code/the-verdict.txt", ("the-verdict.txt",),
        ("b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",)),
    "gpt2_bpe": DataSet(
        "OpenAI's GPT-2 BPE files (encoder.json, vocab.bpe): tokenizer.kind=gpt2 offline",
        "https://openaipublic.blob.core.windows.net/gpt-2/models/124M/",
        ("encoder.json", "vocab.bpe"),
        ("196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
         "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")),
}
HUB = "https://huggingface.co/datasets/"
BENCHMARK_SETS = {
    "hellaswag": DataSet(
        "HellaSwag validation, 10,042 sentence completions, 4 endings (Zellers et al. 2019)",
        "https://github.com/rowanz/hellaswag", ("hellaswag_val.jsonl",),
        sources=(("https://raw.githubusercontent.com/rowanz/hellaswag/"
                  "a29ff8e9a04bba4bd6588223785ce105328adc57/data/hellaswag_val.jsonl",),)),
    "lambada": DataSet(
        "LAMBADA test as OpenAI prepared it for GPT-2, 5,153 passages; predict the last word",
        "https://openaipublic.blob.core.windows.net/gpt-2/data/", ("lambada_test.jsonl",),
        sources=(("https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",),)),
    "arc_easy": DataSet(
        "AI2 Reasoning Challenge, Easy test set, 2,376 science questions (Clark et al. 2018)",
        HUB + "allenai/ai2_arc", ("arc_easy_test.jsonl",),
        sources=((HUB + "allenai/ai2_arc/resolve/main/ARC-Easy/test-00000-of-00001.parquet",),),
        convert=_parquet_to_jsonl),
    "arc_challenge": DataSet(
        "AI2 Reasoning Challenge, Challenge test set, 1,172 science questions",
        HUB + "allenai/ai2_arc", ("arc_challenge_test.jsonl",),
        sources=((HUB + "allenai/ai2_arc/resolve/main/ARC-Challenge/"
                  "test-00000-of-00001.parquet",),), convert=_parquet_to_jsonl),
    "piqa": DataSet(
        "PIQA validation, 1,838 physical commonsense goals with 2 solutions (Bisk et al. 2020)",
        "https://yonatanbisk.com/piqa/", ("piqa_valid.jsonl",),
        sources=(("https://yonatanbisk.com/piqa/data/valid.jsonl",
                  "https://yonatanbisk.com/piqa/data/valid-labels.lst"),), convert=_piqa),
    "winogrande": DataSet(
        "WinoGrande 1.1 dev, 1,267 fill-in-the-blank sentences with 2 options (Sakaguchi et al.)",
        "https://winogrande.allenai.org", ("winogrande_dev.jsonl",),
        sources=(("https://storage.googleapis.com/ai2-mosaic/public/winogrande/"
                  "winogrande_1.1.zip",),), convert=_zip_member("winogrande_1.1/dev.jsonl")),
    "mmlu": DataSet(
        "MMLU test, 14,042 questions in 57 subjects, and its dev split for 5-shot prompts "
        "(Hendrycks et al. 2021)", HUB + "cais/mmlu", ("mmlu_test.jsonl", "mmlu_dev.jsonl"),
        sources=((HUB + "cais/mmlu/resolve/main/all/test-00000-of-00001.parquet",),
                 (HUB + "cais/mmlu/resolve/main/all/dev-00000-of-00001.parquet",)),
        convert=_parquet_to_jsonl),
}
DATA_SETS.update(BENCHMARK_SETS)
INSTRUCTION_KEYS = {"instruction", "output"}


def _check(name: str, file: str, content: bytes) -> None:
  """Raises UserError when `content` is not what the data set's file must hold."""
  try:
    text = content.decode("utf-8")
  except UnicodeDecodeError:
    raise UserError(f"{name}: {file} is not UTF-8 text; the source may have moved") from None
  problem = ""
  if name in BENCHMARK_SETS:
    _check_benchmark(name, file, text)
  elif file.endswith(".json"):
    try:
      records = json.loads(text)
    except json.JSONDecodeError as e:
      raise UserError(f"{name}: {file} is not valid JSON ({e}); the source may have "
                      "moved") from None
    if file == "encoder.json":
      problem = "" if isinstance(records, dict) and len(records) == 50257 else "not 50,257 tokens"
    elif not (isinstance(records, list) and records and all(
        INSTRUCTION_KEYS <= set(r) for r in records)):
      problem = f"not a list of records with {sorted(INSTRUCTION_KEYS)}"
    elif name == "preference_book" and not all({"chosen", "rejected"} <= set(r) for r in records):
      problem = "records without 'chosen' and 'rejected'"
  elif file == "SMSSpamCollection":
    lines = [line for line in text.splitlines() if line]
    if not lines or any(line.split("\t", 1)[0] not in ("ham", "spam") for line in lines):
      problem = "not 'ham|spam<TAB>text' lines"
  elif file == "vocab.bpe":
    problem = "" if text.startswith("#version") else "no '#version' header"
  elif not text.strip():
    problem = "empty"
  if problem:
    raise UserError(f"{name}: the downloaded {file} is {problem}; the source may have moved")


def _check_benchmark(name: str, file: str, text: str) -> None:
  """Every line a record the benchmark reads (MMLU's dev split: the test split's layout)."""
  from llm.evals import benchmarks
  bench = benchmarks.BENCHMARKS[name]
  lines = [line for line in text.splitlines() if line.strip()]
  if not lines:
    raise UserError(f"{name}: the downloaded {file} is empty; the source may have moved")
  for number, line in enumerate(lines, 1):
    try:
      bench.example(json.loads(line), lambda subject: [])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
      raise UserError(f"{name}: line {number} of the downloaded {file} is not a {name} record "
                      f"({type(e).__name__}: {e}); the source may have moved") from None


def _download(url: str) -> bytes:
  try:
    with urllib.request.urlopen(url, timeout=60) as response:
      return response.read()
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", None) or e
    raise UserError(f"could not download {url} ({reason}); offline, download it elsewhere and "
                    "copy it into the folder by hand") from None


def fetch(name: str, directory: str, mirror: str = "") -> list[str]:
  """Downloads data set `name` into `directory`; returns the paths of its files. Every missing
  file is downloaded and checked before any is written."""
  if name not in DATA_SETS:
    raise UserError(f"no data set {name!r}; use one of {', '.join(DATA_SETS)}")
  ds = DATA_SETS[name]
  paths = [os.path.join(directory, f) for f in ds.files]
  checked = []
  for i, (file, path) in enumerate(zip(ds.files, paths)):
    if os.path.exists(path):
      print(f"{path} is already there; kept")
      continue
    urls = ds.sources[i] if ds.sources else (ds.url + file if ds.url.endswith("/") else ds.url,)
    if mirror:
      urls = tuple(mirror.rstrip("/") + "/" + url.rsplit("/", 1)[1] for url in urls)
    checked.append((path, urls[0], _checked(ds, name, i, [_download(u) for u in urls], urls[0])))
  if checked:
    os.makedirs(directory, exist_ok=True)
  for path, url, content in checked:
    with open(path + ".tmp", "wb") as f:  # atomic: an interrupted fetch leaves no half file
      f.write(content)
    os.replace(path + ".tmp", path)
    print(f"wrote {path} ({len(content):,} bytes from {url})")
  return paths


def _checked(ds: DataSet, name: str, i: int, contents: list[bytes], url: str) -> bytes:
  """File i of the data set, made from its sources' `contents`, once its sha256 (where pinned)
  and its format are what they must be."""
  file = ds.files[i]
  try:
    content = ds.convert(contents) if ds.convert else contents[0]
  except UserError as e:
    raise UserError(f"{name}: {e}") from None
  if ds.member:
    try:
      with zipfile.ZipFile(io.BytesIO(content)) as archive:
        content = archive.read(ds.member)
    except (zipfile.BadZipFile, KeyError):
      raise UserError(f"{name}: {url} is not a zip archive holding {ds.member}; the source "
                      "may have moved") from None
  digest = hashlib.sha256(content).hexdigest()
  pinned = ds.sha256[i] if ds.sha256 else ""
  if pinned and digest != pinned:
    raise UserError(f"{name}: the downloaded {file} has sha256 {digest}, not the pinned "
                    f"{pinned}; the source (or a mirror) serves other bytes; nothing was written")
  _check(name, file, content)
  if not pinned:
    print(f"note: {file} has no pinned sha256; its format was checked; sha256 {digest}")
  return content


FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("mirror", os.environ.get("LLM_DATA_MIRROR", ""),
                      "Fetch each file as MIRROR/<the source's file name> instead.")


def main(argv):
  if len(argv) == 2 and argv[1] == "list":
    for name, ds in DATA_SETS.items():
      print(f"{name:<16} {ds.what}\n{'':<16} {ds.url}")
    return
  if len(argv) != 4 or argv[1] != "fetch":
    raise UserError("usage: python -m llm.data_sets fetch NAME DIR, or python -m "
                    f"llm.data_sets list (NAME: {', '.join(DATA_SETS)})")
  fetch(argv[2], argv[3], FLAGS.mirror)


if __name__ == "__main__":
  cli.run(main, define_flags)
