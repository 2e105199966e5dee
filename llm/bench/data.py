"""`llm.bench data`: the data path on real text (CPython's documentation and standard library):
the tokenizer's batch throughput, `llm.prepare`'s throughput, wall time and peak memory per corpus
size, and the time from starting `llm.train` on prepared shards to its first step."""

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


from llm import config as config_lib
from llm.data import shards, sources
from llm.errors import UserError
from llm.text import tokenizer as tokenizer_lib


def make_corpus(path: str, megabytes: int) -> str:
  """JSON lines of real text, `megabytes` of it: CPython's documentation and its standard
  library's sources, again and again."""
  if os.path.exists(path):
    return path
  stdlib = os.path.dirname(os.__file__)
  texts = list(sources.embedded_corpus()["text"])
  for file in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
    try:
      texts.append(open(file, encoding="utf-8").read())
    except (UnicodeDecodeError, OSError):
      continue
  target, written = megabytes * 10**6, 0
  with open(path + ".tmp", "w") as f:
    while written < target:
      for text in texts:
        line = json.dumps({"text": text}) + "\n"
        f.write(line)
        written += len(line)
        if written >= target:
          break
  os.replace(path + ".tmp", path)
  return path


def _peak_rss_run(command: list[str]) -> tuple[float, float, str]:
  """(seconds, peak resident MB, stderr) of a command run to its end."""
  started = time.perf_counter()
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
  stderr = process.stderr.read()
  _, status, usage = os.wait4(process.pid, 0)
  if status:
    raise UserError(f"{' '.join(command[:4])} ... failed: {stderr.strip()[-500:]}")
  return time.perf_counter() - started, usage.ru_maxrss / 1024, stderr


def _config_flags() -> list[str]:
  """The command line's --config and --config.* flags, for a subprocess."""
  return [arg for arg in sys.argv[1:] if arg.startswith("--config")]


def bench_data(cfg, sizes_mb: list[int], workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  cfg = config_lib.resolve(cfg)
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = tokenizer_lib.build(cfg, None, tmp)
  corpora = {mb: make_corpus(os.path.join(workdir, f"corpus-{mb}MB.jsonl"), mb)
             for mb in sizes_mb}
  result = {}
  for mb, corpus in corpora.items():  # the whole command: reading, tokenizing, writing
    out = os.path.join(workdir, f"shards-{mb}MB")
    shutil.rmtree(out, ignore_errors=True)
    seconds, rss, _ = _peak_rss_run(
        [sys.executable, "-m", "llm.prepare", *_config_flags(), f"--config.data.path={corpus}",
         "--config.data.hf_name=", f"--out={out}"])
    result[f"prepare_{mb}MB_seconds"] = seconds
    result[f"prepare_{mb}MB_peak_rss_mb"] = rss
  smallest, largest = min(sizes_mb), max(sizes_mb)
  result["peak_rss_largest_over_smallest"] = (result[f"prepare_{largest}MB_peak_rss_mb"]
                                              / result[f"prepare_{smallest}MB_peak_rss_mb"])

  # Throughput on the smallest corpus, side by side: the tokenizer's batch API alone on texts in
  # memory, then preparation as llm.prepare does it (the corpus streamed, tokenized, written).
  with open(corpora[smallest]) as f:
    texts = [json.loads(line)["text"] for line in f]
  started, tokens = time.perf_counter(), 0
  for i in range(0, len(texts), shards.BATCH):
    tokens += sum(map(len, tokenizer.encode_batch(texts[i:i + shards.BATCH])))
  result["tokenizer_tokens_per_sec"] = tokens / (time.perf_counter() - started)
  del texts
  out = os.path.join(workdir, "shards-throughput")
  shutil.rmtree(out, ignore_errors=True)
  stream = sources.open_documents(config_lib.replace(
      cfg, {"data.path": corpora[smallest], "data.hf_name": ""}).data, stream=True)
  started = time.perf_counter()
  prepared = shards.prepare(stream, tokenizer, "text", out, progress=False, source="bench")
  result["prepare_tokens_per_sec"] = prepared.index["tokens"] / (time.perf_counter() - started)
  result["prepare_over_tokenizer"] = (result["prepare_tokens_per_sec"]
                                      / result["tokenizer_tokens_per_sec"])
  shutil.rmtree(out, ignore_errors=True)

  # From `python -m llm.train` to its first step, on the largest corpus's shards.
  with tempfile.TemporaryDirectory() as run:
    metrics_file = os.path.join(run, "metrics.jsonl")
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "llm.train", f"--config={_config_file()}:tiny",
         *[f for f in _config_flags() if f.startswith("--config.tokenizer")],
         f"--config.data.prepared={os.path.join(workdir, f'shards-{largest}MB')}",
         "--config.train.steps=1", f"--workdir={run}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not (
        os.path.exists(metrics_file) and '"train"' in open(metrics_file).read()):
      time.sleep(0.05)
    result[f"first_step_on_{largest}MB_seconds"] = time.perf_counter() - started
    if process.wait():
      raise UserError(f"llm.train on the prepared corpus failed: {process.stderr.read()[-500:]}")
  return result


def _config_file() -> str:
  flag = next(arg for arg in sys.argv[1:] if arg.startswith("--config="))
  return flag.split("=", 1)[1].split(":")[0]
