"""Compares runs: what differs in their configs, their size, losses and speed, and their curves.

    python -m llm.compare runs/gpt runs/llama [--out=compare.png]

Prints a table (the config keys in which the runs differ, parameters, the last train and
validation loss, median tokens/s, the last score of each benchmark of train.evals) and draws
the training (solid) and validation (dashed) loss of every run against steps and against tokens
seen.
"""

import os

import jax
import numpy as np
from absl import flags
from flax import traverse_util

from llm import cli, tasks
from llm.errors import UserError
from llm.evals import benchmarks
from llm.runs import rundir
from llm.training import metrics

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("out", "compare.png", "The figure's path.")


class RunSummary:
  """What a comparison reads of a run directory: its config, size and logged metrics."""

  def __init__(self, workdir: str):
    self.workdir, self.name = workdir, os.path.basename(os.path.normpath(workdir))
    self.cfg = rundir.read_config(workdir)
    if not os.path.isfile(rundir.path(workdir, rundir.METRICS)):
      raise UserError(f"{workdir} has no {rundir.METRICS}: it has not trained yet")
    records = metrics.read(rundir.path(workdir, rundir.METRICS))
    self.train = [r for r in records if r["split"] == "train" and r.get("loss") is not None]
    self.eval = [r for r in records if r["split"] == "eval" and r.get("loss") is not None]
    self.benchmarks = {r["split"]: r for r in records  # the last evaluation of each
                       if r["split"] in benchmarks.BENCHMARKS}
    self.tokens_per_step = self.cfg.train.batch_size * self.cfg.data.max_length
    model = tasks.build(self.cfg).build_model(rundir.read_tokenizer(workdir).vocab_size)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               np.zeros((1, 1), np.int32))["params"])
    self.num_params = sum(x.size for x in jax.tree.leaves(shapes))

  def tokens_per_sec(self) -> float | None:
    speeds = [r["tokens_per_sec"] for r in self.train if r.get("tokens_per_sec")]
    return float(np.median(speeds)) if speeds else None


def differing_keys(runs: list[RunSummary]) -> list[str]:
  """'section.key' of every config value that is not the same in all runs."""
  flat = [_flatten(run.cfg) for run in runs]
  keys = sorted(set().union(*flat))
  return [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]


def _flatten(cfg) -> dict:
  return traverse_util.flatten_dict(cfg.to_dict(), sep=".")


def table(runs: list[RunSummary]) -> str:
  keys = [k for k in differing_keys(runs) if k != "data.cache_dir"]
  flat = [_flatten(run.cfg) for run in runs]
  fmt = lambda x, spec: "-" if x is None else format(x, spec)
  scored = sorted(set().union(*(run.benchmarks for run in runs)))
  header = ["run", *keys, "parameters", "train loss", "val loss", "tokens/s",
            *(f"{name} {benchmarks.headline(name)}" for name in scored)]
  rows = [[run.name, *(str(f.get(k)) for k in keys), f"{run.num_params:,}",
           fmt(run.train[-1]["loss"] if run.train else None, ".4f"),
           fmt(run.eval[-1]["loss"] if run.eval else None, ".4f"),
           fmt(run.tokens_per_sec(), ",.0f"),
           *(fmt(run.benchmarks.get(name, {}).get(benchmarks.headline(name)), ".4f")
             for name in scored)] for run, f in zip(runs, flat)]
  widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
  line = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
  return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def plot(runs: list[RunSummary], out: str) -> None:
  import matplotlib
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt
  fig, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5))
  for i, run in enumerate(runs):
    color = f"C{i}"
    for records, style, split in ((run.train, "-", "train"), (run.eval, "--", "val")):
      if not records:
        continue
      steps = np.array([r["step"] for r in records])
      losses = [r["loss"] for r in records]
      by_step.plot(steps, losses, style, color=color, label=f"{run.name} {split}")
      by_tokens.plot(steps * run.tokens_per_step, losses, style, color=color,
                     label=f"{run.name} {split}")
  by_step.set_xlabel("step")
  by_tokens.set_xlabel("tokens (batch x length)")
  for ax in (by_step, by_tokens):
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def main(argv):
  workdirs = argv[1:]
  if len(workdirs) < 2:
    raise UserError("usage: python -m llm.compare RUN_DIR RUN_DIR [...] [--out=compare.png]")
  runs = [RunSummary(w) for w in workdirs]
  print(table(runs))
  plot(runs, FLAGS.out)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main, define_flags)
