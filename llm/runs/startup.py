"""The one setup path of every entry point that trains, prepares or benchmarks a config, in one
order: the resolved config (once), the task, its documents, the tokenizer (chosen in one
place), and the context the task's data is made in.

    s = startup.setup(cfg, workdir)
    data = s.task.data(s.docs, model, startup.context(s, mesh, workdir))
"""

import dataclasses
import tempfile
from typing import Any

import jax

from llm import tasks
from llm import config as config_lib
from llm.data import shards
from llm.errors import UserError
from llm.runs import loading, rundir
from llm.text import chat, tokenizer as tokenizer_lib
from llm.training import metrics, sharding


@dataclasses.dataclass
class Setup:
  cfg: Any  # the resolved config: what DIR/config.json holds
  task: tasks.Task
  docs: Any  # the task's documents or records (a stream for lm; None for prepared shards)
  tokenizer: tokenizer_lib.Tokenizer
  source: loading.Source | None  # the init_from model


def setup(cfg, workdir: str = "", num_devices: int = 0) -> Setup:
  """A config settled: its values checked before any data is read, then the data read once,
  and the values only the data can give (a classifier's labels) filled in. With the `workdir`
  of a run to train: the batch's fit on the devices and the run directory checked too (a
  resumed run keeps what it is), before anything is written. `num_devices`: the mesh's, where
  it is not all of this process's (a TPU topology compiled for ahead of time)."""
  source = loading.Source(cfg.init_from) if cfg.init_from else None
  cfg = config_lib.resolve(cfg, source.values if source else None)
  task = tasks.build(cfg)
  gives = tasks.get(source.kind).produces if source and source.kind else "text"
  if task.produces == "text" and gives != "text":
    # its head gives classes or a score: a model that writes text would lose it and start from
    # a network trained for something else
    raise UserError(f"init_from={cfg.init_from} is a task.kind={source.kind} run (its model "
                    f"gives {gives}); task.kind={cfg.task.kind} trains "
                    f"a model that writes text: start from a {tasks.Task.kinds_producing('text')}"
                    " run or a Hugging Face model")
  if workdir:
    sharding.check_batch(cfg.mesh, cfg.train.batch_size, cfg.train.grad_accum, num_devices)
    rundir.check(workdir)
    metrics.check_wandb(cfg.train.wandb_project)
  docs = task.load()
  found = task.found_in_data(docs)
  if found:
    cfg = config_lib.replace(cfg, found)
    task = tasks.build(cfg)
  if workdir:
    changes = rundir.resume_changes(workdir, cfg)
    if changes and jax.process_index() == 0:
      print(f"note: resuming {workdir} with changed settings: " + "; ".join(changes))
  return Setup(cfg, task, docs, choose_tokenizer(task, docs, workdir, source), source)


def choose_tokenizer(task: tasks.Task, docs, workdir: str = "",
                     source: loading.Source | None = None) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer, from the first of: the run directory's own (a resumed run keeps it),
  the init_from model's, the prepared shards', or the config's (trained on the task's text when
  it names no files); with tokenizer.chat_template's template."""
  cfg = task.cfg
  if workdir and rundir.resumes(workdir):
    tokenizer = rundir.read_tokenizer(workdir)
  elif source is not None:
    tokenizer = source.tokenizer
  elif cfg.data.prepared:
    tokenizer = shards.saved_tokenizer(cfg.data.prepared)
  else:
    trains = not cfg.tokenizer.path and tokenizer_lib.get(cfg.tokenizer.kind).learns_from_text
    with tempfile.TemporaryDirectory() as tmp:
      tokenizer = tokenizer_lib.build(cfg, task.tokenizer_texts(docs) if trains else None, tmp)
  if cfg.tokenizer.chat_template:  # the config's template over the one the files ship
    tokenizer.chat_template = chat.choose(cfg.tokenizer.chat_template, tokenizer.chat_template)
  if cfg.model.vocab_size and cfg.model.vocab_size < tokenizer.vocab_size:
    raise UserError(f"config: model.vocab_size={cfg.model.vocab_size} is smaller than the "
                    f"tokenizer's {tokenizer.vocab_size}; use 0 or a larger size")
  return tokenizer


def context(s: Setup, mesh, workdir: str = "") -> tasks.Context:
  """What the task's data is made with, for this process of a run in `workdir` on `mesh`."""
  return tasks.Context(s.tokenizer, jax.process_index(), jax.process_count(),
                       task_data=rundir.path(workdir, rundir.TASK_DATA) if workdir else "",
                       start=loading.Start(s.cfg, mesh, s.cfg.mesh, s.source),
                       open_run=loading.load)


def run_context(run: loading.Run) -> tasks.Context:
  """The context of an opened run's task data: its tokenizer, its kept task data, the model it
  started from."""
  return tasks.Context(run.tokenizer, task_data=rundir.path(run.workdir, rundir.TASK_DATA),
                       start=loading.Start(run.cfg, run.mesh, run.mesh_cfg),
                       open_run=loading.load)
