"""The benchmarks the field quotes, scored in-process the way lm-evaluation-harness scores them.

    python -m llm.data_sets fetch hellaswag data
    python -m llm.evaluate --workdir=runs/gpt2 --benchmark=hellaswag --limit=1000

Multiple choice (HellaSwag, ARC-Easy, ARC-Challenge, PIQA, Winogrande, MMLU): each choice is a
(context, continuation) request scored by its log-likelihood (llm/evals/loglikelihood.py); `acc` is
the share of examples whose correct choice scores highest, `acc_norm` the same with each score
divided by its choice's length in characters (the harness's length normalisation). LAMBADA:
`acc`, whether greedy decoding gives the last word exactly, and the `perplexity` of that word.
Prompts, choices and metrics are the harness's task definitions (its YAML files, version 0.4),
so a model gives the same numbers here and there (tested against the harness).

Each benchmark reads one JSON-lines file of records in the layout of the Hugging Face data set
the harness loads (`llm.data_sets fetch NAME DIR` writes it from the original source; any file
in that layout works: `--benchmark=NAME:PATH`).
"""

import dataclasses
import json
import math
import os
import re
from typing import Callable

import numpy as np

from llm.errors import closest, UserError


@dataclasses.dataclass(frozen=True)
class Example:
  requests: tuple  # (context, continuation) per choice; LAMBADA: one
  gold: int = 0  # the correct choice
  choices: tuple = ()  # the choices' texts: acc_norm divides by their lengths


# -- the benchmarks' prompts, as the harness's task files write them -------------------------------


def _choices(context: str, choices: list[str], gold: int) -> Example:
  """A multiple-choice example whose choices follow the context after a space (the harness's
  target_delimiter)."""
  return Example(tuple((context, " " + c) for c in choices), gold, tuple(choices))


def _hellaswag_clean(text: str) -> str:
  text = text.strip().replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)  # WikiHow's bracketed artefacts
  return text.replace("  ", " ")


def hellaswag(r: dict, shots) -> Example:
  context = _hellaswag_clean(r["activity_label"] + ": " + r["ctx_a"] + " " +
                             r["ctx_b"].capitalize())
  return _choices(context, [_hellaswag_clean(e) for e in r["endings"]], int(r["label"]))


def arc(r: dict, shots) -> Example:
  return _choices(f"Question: {r['question']}\nAnswer:", list(r["choices"]["text"]),
                  list(r["choices"]["label"]).index(r["answerKey"]))


def piqa(r: dict, shots) -> Example:
  return _choices(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))


def winogrande(r: dict, shots) -> Example:
  """The blank filled with each option as two contexts; the rest of the sentence is the
  continuation both are scored on (the harness's partial scoring)."""
  blank = r["sentence"].index("_")
  rest = " " + r["sentence"][blank + 1:].strip()
  contexts = [r["sentence"][:blank] + r[f"option{i}"] for i in (1, 2)]
  return Example(tuple((c, rest) for c in contexts), int(r["answer"]) - 1, (rest, rest))


def _mmlu_question(r: dict) -> str:
  lines = [r["question"].strip()] + [f"{letter}. {choice}"
                                     for letter, choice in zip("ABCD", r["choices"])]
  return "\n".join(lines) + "\nAnswer:"


def mmlu(r: dict, shots) -> Example:
  """The subject's description, then `shots` solved questions of its dev split (the first
  ones, as the harness takes them), then the question; the choices are the letters."""
  subject = r["subject"].replace("_", " ")
  context = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
  for s in shots(r["subject"]):
    context += f"{_mmlu_question(s)} {'ABCD'[int(s['answer'])]}\n\n"
  return _choices(context + _mmlu_question(r), list("ABCD"), int(r["answer"]))


def lambada(r: dict, shots) -> Example:
  words = r["text"].split(" ")
  return Example(((" ".join(words[:-1]), " " + words[-1]),))


@dataclasses.dataclass(frozen=True)
class Benchmark:
  example: Callable  # (record, shots) -> Example; shots(subject) -> few-shot records
  file: str  # the JSON-lines file `llm.data_sets fetch NAME DIR` writes
  metrics: tuple = ("acc", "acc_norm")
  shots_file: str = ""  # where few-shot examples come from (MMLU's dev split)


BENCHMARKS = {
    "hellaswag": Benchmark(hellaswag, "hellaswag_val.jsonl"),
    "arc_easy": Benchmark(arc, "arc_easy_test.jsonl"),
    "arc_challenge": Benchmark(arc, "arc_challenge_test.jsonl"),
    "piqa": Benchmark(piqa, "piqa_valid.jsonl"),
    "winogrande": Benchmark(winogrande, "winogrande_dev.jsonl", ("acc",)),
    "mmlu": Benchmark(mmlu, "mmlu_test.jsonl", ("acc",), shots_file="mmlu_dev.jsonl"),
    "lambada": Benchmark(lambada, "lambada_test.jsonl", ("acc", "perplexity")),
}


# -- reading -------------------------------------------------------------------------------------


def read_records(path: str) -> list[dict]:
  """A JSON-lines file's records; a line that is not a JSON object is named."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except OSError as e:
    raise UserError(f"cannot read {path}: {e.strerror or e}") from None
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{path} line {number}: not JSON ({e.msg})") from None
    if not isinstance(record, dict):
      raise UserError(f"{path} line {number}: not a JSON object")
    records.append(record)
  return records


def load(spec: str, data_dir: str = "data", limit: int = 0,
         num_fewshot: int = 0) -> tuple[str, list[Example]]:
  """NAME or NAME:PATH -> (NAME, its first `limit` examples, or all). Without a PATH the file
  is DATA_DIR/<the benchmark's file>. A record the benchmark cannot read is named by file and
  line."""
  name, _, path = spec.partition(":")
  if name not in BENCHMARKS:
    close = closest(name, BENCHMARKS)
    raise UserError(f"no benchmark {name!r}; " + (f"did you mean {close!r}?" if close else
                                                  f"use one of {', '.join(BENCHMARKS)}"))
  bench = BENCHMARKS[name]
  path = path or os.path.join(data_dir, bench.file)
  if not os.path.exists(path):
    raise UserError(f"{name}: no {path}; run `python -m llm.data_sets fetch {name} "
                    f"{os.path.dirname(path) or '.'}` (or give NAME:PATH)")
  shots = _shots(bench, path, num_fewshot, name)
  records = read_records(path)[:limit or None]
  examples = []
  for number, record in enumerate(records, 1):
    try:
      examples.append(bench.example(record, shots))
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
      raise UserError(f"{path} record {number}: not a {name} record ({type(e).__name__}: "
                      f"{e})") from None
  if not examples:
    raise UserError(f"{path} holds no {name} records")
  return name, examples


def _shots(bench: Benchmark, path: str, k: int, name: str):
  """subject -> the first k records of the benchmark's few-shot split for it."""
  if k == 0:
    return lambda subject: []
  if not bench.shots_file:
    raise UserError(f"{name} is scored zero-shot here (the harness's default); few-shot: mmlu")
  records = read_records(os.path.join(os.path.dirname(path), bench.shots_file))
  by_subject = {}
  for r in records:
    by_subject.setdefault(r["subject"], []).append(r)
  return lambda subject: by_subject.get(subject, [])[:k]


# -- scoring -------------------------------------------------------------------------------------


def requests(scorer, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
  """Every example's requests as (context ids, continuation ids), in order."""
  return [scorer.encode(c, x) for e in examples for c, x in e.requests]


def score(scorer, params, name: str, examples: list[Example], progress=None) -> dict:
  """The benchmark's metrics of the model (`params`) through a loglikelihood.LogLikelihood."""
  encoded = requests(scorer, examples)
  return metrics(name, examples, encoded, scorer(params, encoded, progress), scorer.max_len)


def metrics(name: str, examples: list[Example], encoded: list, results: list,
            max_len: int) -> dict:
  """The benchmark's metrics from its requests' (log-likelihood, greedy) results; `cut`
  counts the requests whose context was cut to fit the model's `max_len`."""
  out = {"examples": len(examples),
         "cut": sum(len(c) + len(x) > max_len + 1 for c, x in encoded)}
  kinds = BENCHMARKS[name].metrics
  if "perplexity" in kinds:  # one request per example
    logps = np.array([lp for lp, _ in results])
    out["acc"] = float(np.mean([greedy for _, greedy in results]))
    out["perplexity"] = float(math.exp(-logps.mean()))
    return out
  correct, correct_norm, i = [], [], 0
  for e in examples:
    logps = np.array([lp for lp, _ in results[i:i + len(e.requests)]])
    i += len(e.requests)
    correct.append(int(np.argmax(logps)) == e.gold)
    lengths = np.array([float(len(c)) for c in e.choices])
    correct_norm.append(int(np.argmax(logps / lengths)) == e.gold)
  out["acc"] = float(np.mean(correct))
  if "acc_norm" in kinds:
    out["acc_norm"] = float(np.mean(correct_norm))
  return out


def headline(name: str) -> str:
  """The metric a benchmark is quoted by: acc_norm where it has one, else acc."""
  return "acc_norm" if "acc_norm" in BENCHMARKS[name].metrics else "acc"


def chance(name: str, examples: list[Example]) -> float:
  """What guessing scores: the mean of 1 / the number of choices (LAMBADA: 0)."""
  if "perplexity" in BENCHMARKS[name].metrics:
    return 0.0
  return float(np.mean([1.0 / len(e.requests) for e in examples]))
