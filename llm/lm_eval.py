"""Runs lm-evaluation-harness tasks on a run directory (llm/evals/harness.py is the model).

    python -m llm.lm_eval --workdir=runs/gpt2 --tasks=hellaswag,arc_easy [--num_fewshot=0]
        [--limit=500] [--include_path=my_tasks/] [--output=results.json]

Every harness task (`lm_eval --tasks list` names them) runs on this project's model, on any
device and mesh; the harness downloads its data sets from the Hugging Face hub. Local tasks (a
YAML file over local data) come from --include_path.
"""

import json
import multiprocessing

from absl import flags

from llm import cli
from llm.errors import UserError
from llm.runs import loading

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "Run directory to evaluate.")
  flags.DEFINE_list("tasks", None, "Harness task names (or groups), comma-separated.")
  flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: each task's own).")
  flags.DEFINE_float("limit", None, "Examples per task (a fraction if below 1).")
  flags.DEFINE_integer("batch_size", 16, "Requests per forward pass.", lower_bound=1)
  flags.DEFINE_string("include_path", None, "A folder of more task YAML files.")
  flags.DEFINE_string("output", None, "Write the harness's results as JSON here.")


def evaluate(workdir: str, task_names: list[str], num_fewshot=None, limit=None,
             batch_size: int = 16, include_path: str | None = None, **options) -> dict:
  """The harness's results dictionary for the run's model on `task_names` (`options`: more
  arguments of lm_eval.simple_evaluate, e.g. log_samples)."""
  try:
    import lm_eval
    from lm_eval.tasks import TaskManager
  except ImportError:
    raise UserError("lm-evaluation-harness is not installed: pip install lm_eval==0.4.13") \
        from None
  from llm.evals.harness import HarnessModel
  manager = TaskManager(include_path=include_path)
  unknown = [t for t in task_names if t not in manager.all_tasks]
  if unknown:
    raise UserError(f"lm-evaluation-harness has no task {unknown[0]!r} (`lm_eval --tasks "
                    "list` names them; local YAML files: --include_path)")
  if limit is not None and limit <= 0:
    raise UserError(f"--limit={limit:g}: use a number of examples per task, or a fraction "
                    "below 1")
  model = HarnessModel(loading.load(workdir), batch_size)
  try:
    return lm_eval.simple_evaluate(model=model, tasks=task_names, num_fewshot=num_fewshot,
                                   limit=limit, task_manager=manager, **options)
  except OSError as e:  # requests' and the hub's errors: a task's data could not be read
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise UserError(f"the harness could not read the data of {', '.join(task_names)} "
                    f"({type(e).__name__}: {detail[:200]}); a hub task needs the network, or "
                    "its data in the Hugging Face cache") from None


def main(argv):
  del argv
  # The harness bootstraps standard errors in a process pool; forking a process that runs JAX's
  # threads can deadlock, so the pool's processes start fresh.
  multiprocessing.set_start_method("spawn", force=True)
  if not FLAGS.workdir or not FLAGS.tasks:
    raise UserError("usage: python -m llm.lm_eval --workdir=DIR --tasks=hellaswag[,...]")
  results = evaluate(FLAGS.workdir, FLAGS.tasks, FLAGS.num_fewshot, FLAGS.limit,
                     FLAGS.batch_size, FLAGS.include_path)
  from lm_eval.utils import make_table
  print(make_table(results))
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(results["results"], f, indent=1, default=str)


if __name__ == "__main__":
  cli.run(main, define_flags)
