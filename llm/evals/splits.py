"""Evaluating a model opened from a run directory: an objective's metrics over batches, and
greedy responses written beside records for judging. The tasks choose what to evaluate
(Task.evaluate); `python -m llm.evaluate` prints it."""

import json
import os

import numpy as np

from llm.errors import UserError
from llm.evals import benchmarks, loglikelihood
from llm.inference import scoring
from llm.inference.sampling import Generator
from llm.text import prompts
from llm.training import objectives, sharding


def evaluate_batches(run, objective: objectives.Objective, batches) -> dict:
  """The objective's metrics of `run`'s model over all the batches."""
  evaluate = objectives.evaluator(objective)
  with sharding.activate(run.mesh, run.mesh_cfg):
    return evaluate(run.params, {}, batches)


def evaluate_splits(run, data) -> dict:
  """The run's metrics on its task data's validation ("eval") and test splits."""
  objective = run.task.objective(run.model)
  return {split: evaluate_batches(run, objective, batches)
          for split, batches in data.evals.items()}


def print_metrics(split: str, result: dict) -> None:
  print(f"{split}: " + "  ".join(f"{k} {v:.4f}" for k, v in result.items()
                                 if isinstance(v, float)))
  for name, m in result.get("per_class", {}).items():
    print(f"  {name:>12}: precision {m['precision']:.4f}  recall {m['recall']:.4f}  "
          f"f1 {m['f1']:.4f}  ({m['support']} examples)")
  if "confusion" in result:
    print(f"  confusion (rows: true, columns: predicted): {result['confusion']}")


def write_responses(run, data, docs, out: str, max_new_tokens: int, batch_size: int,
                    reference=None) -> list[dict]:
  """A run's greedy responses to the prompts of its test split (as its task formats them), as
  JSON lines beside the record's own fields; with `reference` (an opened run: DPO's starting
  model), its responses too."""
  generators = {"response": Generator(run)}
  if reference is not None:
    generators["reference_response"] = Generator(reference)
  if not len(data.splits.get("test", ())):
    raise UserError("this run has no test split (data.test_fraction=0)")
  records = [{"input": "", **dict(docs[int(i)])} for i in data.splits["test"]]
  gen = generators["response"]
  with open(out, "w") as f:
    for b in range(0, len(records), batch_size):
      chunk = records[b:b + batch_size]
      prompts = [run.task.prompt(r, run.tokenizer) for r in chunk]
      room = gen.model.cfg.max_len - max(len(gen.tokenizer.encode(p)) for p in prompts)
      for key, generator in generators.items():
        responses = generator.generate(prompts, max_new_tokens=max(min(max_new_tokens, room), 1),
                                       temperature=0.0)
        for r, [response] in zip(chunk, responses):
          r[key] = response.strip()
      for r in chunk:
        f.write(json.dumps(r) + "\n")
  return records


def write_test_responses(run, data, docs, options, reference=None, open_run=None) -> dict:
  """`write_responses` where llm.evaluate's options say (default DIR/test_responses.jsonl),
  then judged (`judge`; options.judge: a reward model run, opened by `open_run`)."""
  out = options.output or os.path.join(run.workdir, "test_responses.jsonl")
  rows = write_responses(run, data, docs, out, options.max_new_tokens, options.batch_size,
                         reference)
  also = " and the reference model's" if reference is not None else ""
  print(f"wrote {len(rows)} test responses{also} to {out}")
  result = judge(rows, scoring.Scorer(open_run(options.judge)) if options.judge else None)
  print_metrics("test responses", result)
  return result


def judge(rows: list[dict], scorer=None) -> dict:
  """Written responses (`response`, DPO's `reference_response` too) against the records'
  answers (`output`, or a preference record's `chosen`): the share that are the answer exactly;
  and with a reward model's `scorer` as the judge, the mean score of each, and of the answers
  themselves for scale."""
  field = "output" if "output" in rows[0] or "chosen" not in rows[0] else "chosen"
  answers = [prompts.answer_text(r, field) for r in rows]
  columns = [c for c in ("response", "reference_response") if c in rows[0]]
  result = {f"{c}_exact_match": float(np.mean([r[c].strip() == a.strip()
                                                for r, a in zip(rows, answers)]))
            for c in columns}
  if scorer is not None:
    prompt_texts = [prompts.prompt_text(r, scorer.tokenizer) for r in rows]
    for c in columns:
      result[f"judge_{c}"] = float(np.mean(scorer.score(prompt_texts, [str(r[c]) for r in rows])))
    result[f"judge_{field}"] = float(np.mean(scorer.score(prompt_texts, answers)))
  return result


def score_benchmarks(run, specs: list[str], data_dir: str, limit: int, num_fewshot: int,
                     batch_size: int) -> dict:
  """benchmark -> its metrics (llm/evals/benchmarks.py) for the run's language model, printed with
  what chance would score."""
  from tqdm import tqdm
  if run.task.produces != "text":
    raise UserError(f"{run.workdir} is a {run.cfg.task.kind} run: benchmarks score language "
                    f"models (task.kind {run.task.kinds_producing('text')})")
  scorer = loglikelihood.LogLikelihood(run.model, run.tokenizer, run.mesh, run.mesh_cfg,
                                       batch_size)
  results = {}
  for spec in specs:
    name, examples = benchmarks.load(spec, data_dir, limit, num_fewshot)
    with tqdm(total=sum(len(e.requests) for e in examples), desc=name, unit="request",
              dynamic_ncols=True) as bar:
      results[name] = benchmarks.score(scorer, run.params, name, examples, bar.update)
    cut = results[name]["cut"]
    print(f"{name}: " + "  ".join(f"{k} {v:.4f}" for k, v in results[name].items()
                                  if isinstance(v, float))
          + f"  ({len(examples)} examples; chance {benchmarks.chance(name, examples):.4f}"
          + (f"; {cut} requests cut to the model's {scorer.max_len} tokens" if cut else "")
          + ")")
  return results
