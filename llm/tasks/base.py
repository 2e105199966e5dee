"""The interface every task implements, and the registry that maps `task.kind` to its class.

A task is what a run trains: which records it reads and what text a tokenizer learns from them,
its model and objective, its batches (and their schema), its evaluation, and how its prompts
are formatted. The train loop, llm.evaluate, llm.prepare and the inference tools ask the task;
nothing outside llm/tasks/ compares `task.kind`. A new task is one class in one module of this
package (found without a list to edit), with its own config keys and objective:

    @register
    class Copy(Task):
      kind = "copy"
      keys = {"copies": (1, "how many times the prompt is copied")}  # -> task.copies
      def objective(self, model): ...
      def data(self, docs, model, context): ...
"""

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import ml_collections
import numpy as np

from llm import model as model_lib
from llm.data import batches, sources
from llm.errors import closest, UserError
from llm.evals import splits
from llm.training import objectives

_REGISTRY: dict[str, type["Task"]] = {}


def register(cls: type["Task"]) -> type["Task"]:
  """Class decorator: `task.kind=cls.kind` now trains this task."""
  if not cls.kind:
    raise ValueError(f"{cls.__name__} has no kind")
  _REGISTRY[cls.kind] = cls
  return cls


def kinds() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(kind: str) -> type["Task"]:
  """The class of `task.kind`; an unknown kind stops with the closest known one."""
  if kind not in _REGISTRY:
    close = closest(kind, _REGISTRY)
    hint = f"did you mean {close!r}? " if close else ""
    raise UserError(f"config: task.kind={kind!r} is not allowed; {hint}use one of {kinds()}")
  return _REGISTRY[kind]


def kinds_where(test) -> tuple[str, ...]:
  """The kinds whose class passes `test` (for messages that name them)."""
  return tuple(kind for kind, cls in _REGISTRY.items() if test(cls))


def config_keys() -> dict[str, tuple[Any, str]]:
  """Every task's own config keys, merged under `task.`: name -> (default, meaning), the
  meaning led by the kinds that read it ("mlm: ..."). Two tasks may share a key only with one
  default."""
  merged, readers = {}, {}
  for kind, cls in _REGISTRY.items():
    for name, (default, meaning) in cls.keys.items():
      if name in merged and merged[name][0] != default:
        raise ValueError(f"task.{name}: {kind} and {readers[name][0]} declare different defaults")
      merged.setdefault(name, (default, meaning))
      readers.setdefault(name, []).append(kind)
  return {name: (default, f"{', '.join(readers[name])}: {meaning}")
          for name, (default, meaning) in merged.items()}


def pretraining(model_kind: str) -> str:
  """The task.kind that pre-trains a model.kind from scratch (a converted model's)."""
  return next(kind for kind, cls in _REGISTRY.items() if cls.pretrains == model_kind)


def build(cfg) -> "Task":
  """The task of a resolved config, its settings checked."""
  task = get(cfg.task.kind)(cfg)
  task.check()
  return task


@dataclasses.dataclass(frozen=True)
class Schema:
  """What one example of a task's batches holds: name -> (dtype, shape) without the batch axes,
  the length of its sequences (the model's sequence axis: what FLOPs and MFU count) and how many
  sequences an example holds (a preference pair: 2). Batches are [grad_accum, micro_batch,
  *shape] (training) or [batch, *shape] (evaluation)."""
  arrays: dict[str, tuple[np.dtype, tuple[int, ...]]]
  length: int
  sequences: int = 1

  @classmethod
  def of(cls, example: dict, length: int, sequences: int = 1) -> "Schema":
    """The schema of `example`, a dict of arrays whose first axis counts examples."""
    return cls({k: (np.dtype(v.dtype), tuple(v.shape[1:])) for k, v in example.items()},
               length, sequences)

  @property
  def tokens(self) -> int:
    """Tokens of one example (what a step's tokens/s counts)."""
    return self.length * self.sequences

  def check(self, batch: dict, batch_axes: int) -> None:
    """Raises ValueError when `batch` is not made of this schema's arrays."""
    got = {k: (np.dtype(v.dtype), tuple(v.shape[batch_axes:])) for k, v in batch.items()}
    if got != self.arrays:
      raise ValueError(f"a batch does not match the task's schema: {got} != {self.arrays}")


@dataclasses.dataclass
class TaskData:
  """A task's data, ready to train on."""
  batches: Any  # training batches: an iterator with state() / restore(), resumable
  evals: dict  # split -> fixed batches; "eval" runs every train.eval_every, "test" at the end
  schema: Schema
  summary: str  # one line about the data, printed at start
  splits: dict = dataclasses.field(default_factory=dict)  # records: split -> rows of the data
  # An online task (RL) completes each batch with the current policy as its step starts:
  # (trainable params, frozen params, placed batch, step) -> (the step's batch, metrics to log).
  rollout: Any = None
  # ... and is evaluated by sampling: (trainable, frozen) -> the "eval" split's metrics.
  evaluate: Any = None
  updates_per_batch: int = 1  # optimizer passes over each batch (an RL rollout is reused)
  real_share: float = 1.0  # of the training rows' tokens, the share that is not padding


@dataclasses.dataclass
class Context:
  """What a task is given besides its config."""
  tokenizer: Any
  process_index: int = 0
  process_count: int = 1
  task_data: str = ""  # a file where a task keeps what it computed once (DPO's reference)
  start: Any = None  # the model the run starts from: `start.params(model)` (runs.Start)
  open_run: Any = None  # run directory -> the opened run (runs.load): another model a task uses


@dataclasses.dataclass
class EvalOptions:
  """What llm.evaluate's flags ask of a task's evaluation."""
  data_path: str = ""  # other data than the run's own
  text_field: str = "text"
  max_length: int = 0
  batch_size: int = 8
  output: str = ""  # where generated answers go
  max_new_tokens: int = 256
  judge: str = ""  # a reward model run that scores generated answers


class Task:
  """A kind of training. Subclasses set `kind` and implement `objective` and `data`; the rest
  has defaults for records read whole from the run's data."""
  kind: ClassVar[str] = ""
  # What the trained model gives, for the tools that use it: "text" (llm.generate), "classes"
  # (llm.classify), "reward" (llm.score), "vectors" (llm.embed).
  produces: ClassVar[str] = "text"
  families: ClassVar[tuple[str, ...]] = ("gpt",)  # the model.kind values it trains
  pretrains: ClassVar[str] = ""  # the model.kind it pre-trains from scratch, if any
  # Its own config keys, under task.: name -> (default, meaning); `--print_config` lists them.
  keys: ClassVar[dict[str, tuple[Any, str]]] = {}
  reads_token_stream: ClassVar[bool] = False  # may read data.prepared, a stream, document masks
  online: ClassVar[bool] = False  # samples its own batches as it trains (TaskData.rollout)
  packs: ClassVar[bool] = False  # implements `pack` (data.packing)

  def __init__(self, cfg):
    self.cfg = cfg

  @staticmethod
  def kinds_producing(produces: str) -> str:
    """The task kinds whose models give `produces` ("lm, instruct, ..."), for messages."""
    return ", ".join(kinds_where(lambda cls: cls.produces == produces))

  # -- the config ---------------------------------------------------------------------------

  def check(self) -> None:
    """Raises UserError naming the first config key this task cannot work with."""
    c = self.cfg
    if c.model.kind not in self.families:
      source = f" (the model of init_from={c.init_from!r})" if c.init_from else ""
      raise UserError(f"config: task.kind={self.kind!r} is not allowed; it trains model.kind="
                      f"{' or '.join(self.families)}, not {c.model.kind!r}{source}")
    if c.data.packing and not (self.packs and model_lib.family(c.model.kind).causal):
      packers = ", ".join(kinds_where(lambda cls: cls.packs))
      raise UserError(f"config: data.packing=True is not allowed with task.kind={self.kind} and "
                      f"model.kind={c.model.kind}; {packers} on a decoder pack their records")
    for key in ("prepared", "streaming", "document_masks"):
      if c.data[key] and not self.reads_token_stream:
        readers = ", ".join(kinds_where(lambda cls: cls.reads_token_stream))
        raise UserError(f"config: data.{key}={c.data[key]!r} is not allowed; only "
                        f"task.kind={readers} reads a token stream")

  def on_data(self, data_cfg) -> "Task":
    """The same task reading other data (llm.evaluate --data.path)."""
    cfg = ml_collections.ConfigDict(self.cfg.to_dict())
    cfg.data.update(dict(data_cfg))
    return type(self)(ml_collections.FrozenConfigDict(cfg))

  # -- records and tokenizer ----------------------------------------------------------------

  def fields(self) -> tuple[str, ...]:
    """The columns the task reads from each record."""
    return (self.cfg.data.text_field,)

  def load(self):
    """The task's documents or records (a `datasets.Dataset`; a stream, or None, for tasks that
    read a token stream)."""
    return sources.open_documents(self.cfg.data, self.fields(), complete=True)

  def found_in_data(self, docs) -> dict:
    """Config values that only the data can give ({"task.labels": ...}), settled once."""
    return {}

  def tokenizer_texts(self, docs):
    """The text a tokenizer is trained on, when the run trains one (read here, where a file
    that does not parse is said in one line)."""
    try:
      return list(sources.first_chars((r[self.cfg.data.text_field] for r in docs),
                                      self.cfg.tokenizer.train_chars))
    except UserError:
      raise
    except Exception as e:  # datasets, pyarrow and the network raise many types
      raise sources.read_error(self.cfg.data, e) from None

  # -- model, objective, data ---------------------------------------------------------------

  def build_model(self, vocab_size: int) -> nn.Module:
    return model_lib.build(self.cfg.model, vocab_size)

  def objective(self, model) -> objectives.Objective:
    raise NotImplementedError

  def data(self, docs, model, context: Context) -> TaskData:
    raise NotImplementedError

  def data_for(self, model, context: Context, data_path: str = ""):
    """(task data, records) of the run's own data, or of the records at `data_path` read and
    split the same way (what the task keeps for its own data, DPO's reference, is computed
    again)."""
    if not data_path:
      docs = self.load()
      return self.data(docs, model, context), docs
    task = self.on_data({"path": data_path, "hf_name": ""})
    docs = task.load()
    return task.data(docs, model, dataclasses.replace(context, task_data="")), docs

  def micro_batch(self) -> int:
    return self.cfg.train.batch_size // self.cfg.train.grad_accum

  # -- evaluation ---------------------------------------------------------------------------

  def evaluate(self, run, context: Context, options: EvalOptions) -> dict:
    """What llm.evaluate prints (and writes) for a run of this task: by default the objective's
    metrics on the validation and test splits of its data."""
    return self.evaluate_splits(run, context, options)[0]

  def evaluate_splits(self, run, context: Context, options: EvalOptions):
    """(each split's metrics, printed; the task's data; its records), on the run's own data or
    options.data_path's, split the same way."""
    data, docs = self.data_for(run.model, context, options.data_path)
    results = splits.evaluate_splits(run, data)
    for split, result in results.items():
      splits.print_metrics(split, result)
    return results, data, docs

  # -- prompts ------------------------------------------------------------------------------

  def prompt(self, record: dict, tokenizer) -> str:
    """A record's prompt, as sampling and scoring format it for this task's models."""
    return record[self.cfg.data.text_field]


class RecordTask(Task):
  """A task on records held in memory (fine-tuning): `examples` makes their arrays, padded to
  one length; they are split into train / validation / test by data.val_fraction,
  data.test_fraction and the seed."""
  sequences: ClassVar[int] = 1  # sequences per example

  def examples(self, docs, model, context: Context) -> tuple[dict, np.ndarray, str]:
    """(arrays with one row per example and a "weights" array, the record behind each row,
    what the examples are: a few words for the summary)."""
    raise NotImplementedError

  def pack(self, examples: dict, pad_id: int, length: int) -> dict:
    """Examples (with their `lengths`) packed into rows of `length` tokens, or of the longest
    example if it is longer (data.packing; llm/data/packing.py)."""
    raise NotImplementedError

  def data(self, docs, model, context: Context) -> TaskData:
    cfg, d, tr = self.cfg, self.cfg.data, self.cfg.train
    examples, rows, what = self.examples(docs, model, context)
    parts = batches.split_indices(len(examples["weights"]), d.val_fraction, d.test_fraction,
                                  cfg.seed, what="records")
    lengths = examples.pop("lengths", None)
    subset = {name: {k: v[idx] for k, v in examples.items()} for name, idx in parts.items()}
    layout = f"padded to {self.sequence_length(examples)} tokens"
    padded = len(examples["weights"]) * self.sequence_length(examples) * self.sequences
    real_share = 1.0 if lengths is None else lengths.sum() / padded
    if d.packing:  # each split packed on its own: a record stays in its split
      subset = {name: self.pack({**s, "lengths": lengths[parts[name]]}, context.tokenizer.pad_id,
                                d.max_length) for name, s in subset.items() if len(parts[name])}
      num_rows = sum(len(s["weights"]) for s in subset.values())
      packed = self.sequence_length(subset["train"])
      layout = (f"packed into {num_rows:,} rows of {packed} tokens (padding "
                f"{1 - real_share:.0%} padded, ")
      real_share = lengths.sum() / (num_rows * packed)
      layout += f"{1 - real_share:.0%} packed)"
    where = dict(process_index=context.process_index, process_count=context.process_count)
    count = lambda name: len(subset[name]["weights"])
    train = batches.Batches(count("train"), batches.take_rows(subset["train"]),
                            tr.batch_size, tr.grad_accum, cfg.seed, **where)
    evals = {name: batches.fixed_batches(count(name), batches.take_rows(subset[name]),
                                         self.micro_batch(), count(name), **where)
             for name, idx in parts.items() if name != "train" and len(idx)}
    schema = Schema.of(train.example(), self.sequence_length(subset["train"]),
                       1 if d.packing else self.sequences)  # a packed row is one sequence
    return TaskData(train, evals, schema,
                    f"{len(examples['weights']):,} records ({what}), {layout}: "
                    + ", ".join(f"{len(idx)} {name}" for name, idx in parts.items()),
                    splits={name: rows[idx] for name, idx in parts.items()},
                    real_share=float(real_share))

  def sequence_length(self, examples: dict) -> int:
    """The length of the examples' sequences (their last axis)."""
    return examples["tokens"].shape[-1]
