"""Evaluates a run directory (trained here, fine-tuned or converted).

    python -m llm.evaluate --workdir=runs/gpt_tiny                            # its validation split
    python -m llm.evaluate --workdir=runs/gpt2 --data.path=the-verdict.txt   # any text
    python -m llm.evaluate --workdir=runs/spam                                # a classifier
    python -m llm.evaluate --workdir=runs/instruct                            # instruction tuning
    python -m llm.evaluate --workdir=runs/dpo                                 # reward or DPO

A language model: the loss and perplexity of every token of its own validation split (the run's
data, tokenized and split as in training), or of the file at --data.path, read in back-to-back
windows of `--max_length` tokens (default: the run's training window, or for a file the model's
context). A classifier: accuracy,
per-class precision / recall / F1 and the confusion matrix on its validation and test splits
(the run's own data and seed, or --data.path). An instruction-tuned model: the loss on those
splits, and its responses to the test split written to a JSON lines file beside the references,
ready for judging. A reward model or a DPO run: loss, (reward) accuracy, margin and the chosen
and rejected rewards on those splits; a DPO run also writes its test responses beside those of
the reference model it started from.
"""

import dataclasses
import json
import os

import ml_collections
from absl import flags

from llm import cli, config as config_lib, data, objectives, params as params_lib, rundir
from llm import sharding, streaming, tasks
from llm.errors import UserError


def evaluate_lm(run: rundir.Run, path: str = "", text_field: str = "text",
                max_length: int = 0, batch_size: int = 8, cache_dir: str = "") -> dict:
  """Loss and perplexity of `run`'s model over every token of the text at `path`, or by
  default of the run's own validation split (its data, tokenized and split as in training), in
  back-to-back windows of `max_length` tokens (default: the model's context, or the run's
  training window for its own split)."""
  cfg = run.cfg
  if path:
    data_cfg = ml_collections.ConfigDict({"hf_name": "", "path": path, "text_field": text_field,
                                          "format": "", "columns": "", "cache_dir": cache_dir})
    tokens = data.prepare_tokens(data_cfg, streaming.open_documents(data_cfg),
                                 run.tokenizer).tokens
  else:
    if cfg.data.streaming:
      raise UserError("a streamed run holds out the first windows of its stream; evaluate it "
                      "on a file with --data=PATH")
    docs = tasks.load_data(cfg)
    tokens = data.split(tasks.token_stream(cfg, docs, run.tokenizer, cache_dir),
                        cfg.data.val_fraction)[1]
  max_length = max_length or (not path and cfg.data.max_length) or cfg.model.max_len
  if not 1 <= max_length <= cfg.model.max_len:
    raise UserError(f"--max_length={max_length}: use 1 to the model's context "
                    f"{cfg.model.max_len}")
  batches = data.eval_batches(tokens, max_length, batch_size, num_batches=len(tokens))
  evaluate = objectives.evaluator(objectives.causal_lm(run.model, cfg.model.logits_chunk))
  with sharding.activate(run.mesh, run.mesh_cfg):
    return evaluate(run.params, {}, batches)


def run_task(run: rundir.Run, data_path: str = ""):
  """(the run's task, its records): on the run's own data and seed, or the records at
  `data_path` read and split the same way."""
  cfg = run.cfg
  if data_path:
    cfg = config_lib.replace(cfg, {"data.path": data_path, "data.hf_name": ""})
  docs = tasks.load_data(cfg)
  source = lambda: rundir.Source(cfg.init_from).params() if cfg.init_from else None
  starting = lambda model: params_lib.starting(cfg, model, run.mesh, run.mesh_cfg, source(),
                                               cfg.init_from)
  task_data = "" if data_path else rundir.path(run.workdir, rundir.TASK_DATA)
  return tasks.build(cfg, docs, run.tokenizer, starting_params=starting,
                     task_data=task_data), docs


def evaluate_splits(run: rundir.Run, task: tasks.Task) -> dict:
  """A fine-tuning run's metrics on its validation ("eval") and test splits."""
  evaluate = objectives.evaluator(task.objective)
  with sharding.activate(run.mesh, run.mesh_cfg):
    return {split: evaluate(run.params, {}, batches) for split, batches in task.evals.items()}


def write_responses(run: rundir.Run, task: tasks.Task, docs, out: str, max_new_tokens: int,
                    batch_size: int, reference: rundir.Run | None = None) -> int:
  """An instruction-tuned run's greedy responses to its test split, as JSON lines beside the
  record's own fields; with `reference` (DPO's starting model), its responses too."""
  from llm.sampling import Generator
  generators = {"response": Generator("", run=run)}
  if reference is not None:
    generators["reference_response"] = Generator("", run=reference)
  if not len(task.splits.get("test", ())):
    raise UserError("this run has no test split (data.test_fraction=0)")
  records = [dict(docs[int(i)]) for i in task.splits["test"]]
  gen = generators["response"]
  with open(out, "w") as f:
    for b in range(0, len(records), batch_size):
      chunk = records[b:b + batch_size]
      prompts = [data.alpaca_prompt(r["instruction"], r.get("input") or "") for r in chunk]
      room = gen.model.cfg.max_len - max(len(gen.tokenizer.encode(p)) for p in prompts)
      for key, generator in generators.items():
        responses = generator.generate(prompts, max_new_tokens=max(min(max_new_tokens, room), 1),
                                       temperature=0.0)
        for r, [response] in zip(chunk, responses):
          r[key] = response.strip()
      for r in chunk:
        f.write(json.dumps({"input": "", **r}) + "\n")
  return len(records)


def reference_run(run: rundir.Run) -> rundir.Run:
  """A DPO run's reference: the same model with the parameters it started from."""
  cfg = run.cfg
  source = rundir.Source(cfg.init_from).params() if cfg.init_from else None
  return dataclasses.replace(run, params=params_lib.starting(cfg, run.model, run.mesh,
                                                             run.mesh_cfg, source, cfg.init_from))


def _print_split(split: str, result: dict) -> None:
  print(f"{split}: " + "  ".join(f"{k} {v:.4f}" for k, v in result.items()
                                 if isinstance(v, float)))
  for name, m in result.get("per_class", {}).items():
    print(f"  {name:>12}: precision {m['precision']:.4f}  recall {m['recall']:.4f}  "
          f"f1 {m['f1']:.4f}  ({m['support']} examples)")
  if "confusion" in result:
    print(f"  confusion (rows: true, columns: predicted): {result['confusion']}")


FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "Run directory to evaluate.")
  flags.DEFINE_string("data.path", None, "Text to evaluate on: a file, glob or folder (default: "
                      "the run's own validation data).")
  flags.DEFINE_string("data.text_field", "text", "Column holding the text (JSON/CSV data).")
  flags.DEFINE_integer("max_length", 0, "Tokens per window (0: the run's training window for "
                       "its own data, the model's context for --data.path).")
  flags.DEFINE_integer("batch_size", 8, "Windows (or prompts) per forward pass.")
  flags.DEFINE_string("output", None, "Instruction runs: where the test responses go "
                      "(default DIR/test_responses.jsonl).")
  flags.DEFINE_integer("max_new_tokens", 256, "Instruction runs: longest response.")


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise UserError("usage: python -m llm.evaluate --workdir=DIR [--data.path=FILE]")
  data_path = FLAGS["data.path"].value
  kind = rundir.read_config(FLAGS.workdir).task.kind
  if kind == "lm":
    result = evaluate_lm(rundir.load(FLAGS.workdir), data_path, FLAGS["data.text_field"].value,
                         FLAGS.max_length, FLAGS.batch_size)
    what = data_path or "the validation split"
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
          f"({result['tokens']:,} tokens of {what})")
    return
  run = rundir.load(FLAGS.workdir)
  task, docs = run_task(run, data_path)
  for split, result in evaluate_splits(run, task).items():
    _print_split(split, result)
  if kind in ("instruct", "dpo"):
    out = FLAGS.output or os.path.join(FLAGS.workdir, "test_responses.jsonl")
    reference = reference_run(run) if kind == "dpo" else None
    n = write_responses(run, task, docs, out, FLAGS.max_new_tokens, FLAGS.batch_size, reference)
    also = " and the reference model's" if reference else ""
    print(f"wrote {n} test responses{also} to {out}")


if __name__ == "__main__":
  cli.run(main, define_flags)
