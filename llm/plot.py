"""Draws one run's curves from its metrics.jsonl: loss (train and validation), learning rate,
gradient norm and throughput, against steps; the reward of an online RL run, a mixture of
experts' load and balance loss, and the benchmarks of train.evals.

    python -m llm.plot --workdir=runs/gpt_tiny [--out=runs/gpt_tiny/curves.png]
"""

import os

from absl import flags

from llm import cli
from llm.errors import UserError
from llm.evals import benchmarks
from llm.runs import rundir
from llm.training import metrics

FLAGS = flags.FLAGS
PANELS = (("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"),
          ("tokens_per_sec", "tokens/s"))


def define_flags():
  flags.DEFINE_string("workdir", None, "The run directory.")
  flags.DEFINE_string("out", None, "The figure's path (default: DIR/curves.png).")


def plot(workdir: str, out: str) -> None:
  path = rundir.path(workdir, rundir.METRICS)
  if not os.path.isfile(path):
    raise UserError(f"{workdir} has no {rundir.METRICS}: it has not trained yet")
  records = metrics.read(path)
  import matplotlib
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt
  scored = sorted({r["split"] for r in records} & set(benchmarks.BENCHMARKS))
  panels = PANELS + ((("reward", "reward"),) if any("reward" in r for r in records) else ())
  if any("load_max" in r for r in records):  # a mixture of experts: how evenly it routes
    panels += (("load_max", "expert load (largest share x E)"),
               ("balance_loss", "MoE balance loss"))
  panels += (("benchmarks", "benchmarks (train.evals)"),) if scored else ()
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
  for ax, (key, title) in zip(axes, panels):
    for name in scored if key == "benchmarks" else ():
      metric = benchmarks.headline(name)
      ax.plot(*zip(*[(r["step"], r[metric]) for r in records if r["split"] == name]), "o-",
              label=f"{name} {metric}")
      ax.legend(fontsize="small")
    for split, style in (("train", "-"), ("eval", "o--")):
      points = [(r["step"], r[key]) for r in records if r["split"] == split
                and r.get(key) is not None]
      if points:
        ax.plot(*zip(*points), style, label="validation" if split == "eval" else split)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize="small")
  fig.suptitle(os.path.basename(os.path.normpath(workdir)))
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise UserError("usage: python -m llm.plot --workdir=DIR [--out=FILE.png]")
  out = FLAGS.out or rundir.path(FLAGS.workdir, "curves.png")
  plot(FLAGS.workdir, out)
  print(f"wrote {out}")


if __name__ == "__main__":
  cli.run(main, define_flags)
