"""Evaluates a run directory (trained here or converted) on text.

    python -m llm.evaluate --workdir=runs/gpt2 --data.path=the-verdict.txt

prints the loss and perplexity of every token of the file, read in back-to-back windows of
`--max_length` tokens (default: the model's context).
"""

import ml_collections
import jax
import numpy as np
from absl import app, flags, logging

from llm import data, objectives, rundir, sharding
from llm.errors import UserError, exits_cleanly


def evaluate_lm(run: rundir.Run, path: str, text_field: str = "text", max_length: int = 0,
                batch_size: int = 8, cache_dir: str = "") -> dict:
  """Loss and perplexity of `run`'s model over the text at `path`."""
  max_length = max_length or run.model.cfg.max_len
  if not 1 <= max_length <= run.model.cfg.max_len:
    raise UserError(f"--max_length={max_length}: use 1 to the model's context "
                    f"{run.model.cfg.max_len}")
  docs = data.load_documents(ml_collections.ConfigDict(
      {"hf_name": "", "path": path, "text_field": text_field}))
  tokens = data.token_stream(docs, run.tokenizer, text_field, cache_dir)
  batches = data.eval_batches(tokens, max_length, batch_size, num_batches=len(tokens))
  objective = objectives.causal_lm(run.model)
  step = jax.jit(lambda params, batch: objective.loss(params, batch, None, False))
  with sharding.activate(run.mesh, run.mesh_cfg):
    sums = [jax.device_get(step(run.params, b)) for b in batches]
  totals = {k: float(sum(np.asarray(s[k]) for s in sums)) for k in sums[0]}
  return {**objective.summarize(totals), "tokens": int(totals["weight"])}


FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "Run directory to evaluate.")
  flags.DEFINE_string("data.path", None, "Text to evaluate on: a file, glob or folder.")
  flags.DEFINE_string("data.text_field", "text", "Column holding the text (JSON/CSV data).")
  flags.DEFINE_integer("max_length", 0, "Tokens per window (0: the model's context).")
  flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")


@exits_cleanly
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if not FLAGS.workdir or not FLAGS["data.path"].value:
    raise UserError("usage: python -m llm.evaluate --workdir=DIR --data.path=FILE")
  result = evaluate_lm(rundir.load(FLAGS.workdir), FLAGS["data.path"].value,
                       FLAGS["data.text_field"].value, FLAGS.max_length, FLAGS.batch_size)
  print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
        f"({result['tokens']:,} tokens)")


if __name__ == "__main__":
  define_flags()
  app.run(main)
