"""Evaluates a run directory (trained here, fine-tuned or converted).

    python -m llm.evaluate --workdir=runs/gpt_tiny                            # its validation split
    python -m llm.evaluate --workdir=runs/gpt2 --data.path=the-verdict.txt   # any text
    python -m llm.evaluate --workdir=runs/spam                                # a classifier
    python -m llm.evaluate --workdir=runs/instruct                            # instruction tuning
    python -m llm.evaluate --workdir=runs/dpo                                 # reward or DPO
    python -m llm.evaluate --workdir=runs/gpt2 --benchmark=hellaswag,mmlu     # benchmarks

A language model: the loss and perplexity of every token of its own validation split (the run's
data, tokenized and split as in training), or of the file at --data.path, read in back-to-back
windows of `--max_length` tokens (default: the run's training window, or for a file the model's
context). A classifier: accuracy,
per-class precision / recall / F1 and the confusion matrix on its validation and test splits
(the run's own data and seed, or --data.path). An instruction-tuned model: the loss on those
splits, and its responses to the test split written to a JSON lines file beside the references,
ready for judging. A reward model or a DPO run: loss, (reward) accuracy, margin and the chosen
and rejected rewards on those splits; a DPO run also writes its test responses beside those of
the reference model it started from. --benchmark scores a language model on the benchmarks
the field quotes instead, as lm-evaluation-harness does (llm/evals/benchmarks.py).
"""

from absl import flags

from llm import cli, tasks
from llm.errors import UserError
from llm.evals import splits
from llm.runs import loading, startup

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "Run directory to evaluate.")
  flags.DEFINE_bool("use_ema", False, loading.USE_EMA_HELP)
  flags.DEFINE_string("data.path", None, "Text to evaluate on: a file, glob or folder (default: "
                      "the run's own validation data).")
  flags.DEFINE_string("data.text_field", "text", "Column holding the text (JSON/CSV data).")
  flags.DEFINE_integer("max_length", 0, "Tokens per window (0: the run's training window for "
                       "its own data, the model's context for --data.path).")
  flags.DEFINE_integer("batch_size", 8, "Windows (or prompts) per forward pass.",
                       lower_bound=1)
  flags.DEFINE_string("output", None, "Instruction runs: where the test responses go "
                      "(default DIR/test_responses.jsonl).")
  flags.DEFINE_integer("max_new_tokens", 256, "Instruction runs: longest response.",
                       lower_bound=1)
  flags.DEFINE_string("judge", "", "Instruction and DPO runs: a reward model run that scores "
                      "the test responses (and the records' own answers, for scale).")
  flags.DEFINE_list("benchmark", None, "Benchmarks to score instead (llm/evals/benchmarks.py): "
                    "hellaswag, arc_easy, arc_challenge, piqa, winogrande, mmlu, lambada; "
                    "NAME:PATH for a file of its records.")
  flags.DEFINE_string("benchmark_dir", "data", "Where `llm.data_sets fetch` put the benchmarks.")
  flags.DEFINE_integer("limit", 0, "Benchmarks: the first N examples of each (0: all).",
                       lower_bound=0)
  flags.DEFINE_integer("num_fewshot", 0, "Benchmarks: solved examples before each question "
                       "(MMLU, from its dev split).")


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise UserError("usage: python -m llm.evaluate --workdir=DIR [--data.path=FILE]")
  run = loading.load(FLAGS.workdir, use_ema=FLAGS.use_ema)
  if FLAGS.benchmark:
    splits.score_benchmarks(run, FLAGS.benchmark, FLAGS.benchmark_dir, FLAGS.limit,
                            FLAGS.num_fewshot, FLAGS.batch_size)
    return
  options = tasks.EvalOptions(FLAGS["data.path"].value or "", FLAGS["data.text_field"].value,
                              FLAGS.max_length, FLAGS.batch_size, FLAGS.output or "",
                              FLAGS.max_new_tokens, FLAGS.judge)
  run.task.evaluate(run, startup.run_context(run), options)


if __name__ == "__main__":
  cli.run(main, define_flags)
