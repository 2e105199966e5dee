"""What a run trains, chosen by `task.kind`: the model, its objective and its data.

- lm: next-token prediction on windows of the token stream (GPT pre-training).
- mlm: masked-LM + next-sentence prediction on sentence pairs (BERT pre-training).
- classify: a head on the backbone's one vector per sequence; text + label records.
- instruct: next-token prediction on Alpaca records, the prompt masked out of the loss.
- reward: a scalar head scoring answers, trained on preference pairs (chosen over rejected).
- dpo: the policy tuned on preference pairs against its starting point (DPO).

The train loop sees a Task and nothing else of the kind it trains.
"""

import dataclasses
import os

import flax.linen as nn
import jax
import numpy as np

from llm import data, objectives, streaming, token_shards
from llm import model as model_lib
from llm.errors import UserError

INSTRUCTION_FIELDS = ("instruction", "output")  # and "input", which may be missing
RECORD_TASKS = ("classify", "instruct", "reward", "dpo")


@dataclasses.dataclass
class Task:
  model: nn.Module
  objective: objectives.Objective
  batches: data.Batches  # training batches, resumable
  evals: dict  # split -> fixed batches; "eval" runs every train.eval_every, "test" at the end
  summary: str  # one line about the data, printed at start
  # record tasks (classify, instruct): split -> the rows of the data in it
  splits: dict = dataclasses.field(default_factory=dict)


def load_data(cfg):
  """The task's records: documents for lm and mlm; for classify and instruct, records that
  must have every field `fields` names. For lm a stream of them (nothing downloaded or copied
  first), None when the run reads prepared shards."""
  if cfg.data.prepared:
    return None
  if cfg.task.kind == "lm":  # a token stream: the documents are read once, in order
    return streaming.open_documents(cfg.data)
  return data.load_documents(cfg.data, fields(cfg), complete=cfg.task.kind in RECORD_TASKS)


def token_stream(cfg, docs, tokenizer, cache_dir: str = ""):
  """The lm task's whole token stream: data.prepared's shards, or `docs` tokenized once into
  the cache."""
  if cfg.data.prepared:
    return token_shards.open_shards(cfg.data.prepared, tokenizer).tokens
  return data.prepare_tokens(cfg.data, docs, tokenizer,
                             data.token_cache(cfg.data, tokenizer, cache_dir)).tokens


def fields(cfg) -> tuple[str, ...]:
  """The columns the task reads from each record."""
  if cfg.task.kind == "classify":
    return cfg.data.text_field, cfg.data.label_field
  if cfg.task.kind == "instruct":
    return INSTRUCTION_FIELDS
  if cfg.task.kind in ("reward", "dpo"):
    return "instruction", cfg.data.chosen_field, cfg.data.rejected_field
  return (cfg.data.text_field,)


def texts(cfg, docs):
  """Text to train a tokenizer on, when the run has none (else None: nothing is read)."""
  if cfg.tokenizer.path or cfg.tokenizer.kind not in ("sentencepiece", "wordpiece"):
    return None
  answers = {"instruct": ("output",), "reward": (cfg.data.chosen_field, cfg.data.rejected_field),
             "dpo": (cfg.data.chosen_field, cfg.data.rejected_field)}.get(cfg.task.kind)
  if answers:
    docs = docs.map(lambda r: {"text": data.alpaca_prompt(r["instruction"], r.get("input") or "")
                               + "\n".join(r[a] for a in answers)},
                    remove_columns=docs.column_names)
    return data.texts(docs, "text", cfg.tokenizer.train_chars)
  try:  # read here, where a file that does not parse is said in one line
    return list(data.texts(docs, cfg.data.text_field, cfg.tokenizer.train_chars))
  except UserError:
    raise
  except Exception as e:  # datasets, pyarrow and the network raise many types
    raise data.read_error(cfg.data, e) from None


def labels(cfg) -> list[str]:
  return [name.strip() for name in cfg.task.labels.split(",") if name.strip()]


def data_labels(cfg, docs) -> list[str] | None:
  """The classes a classifier without task.labels finds in its data (see config.resolve)."""
  if cfg.task.kind != "classify" or cfg.task.labels or docs is None:
    return None
  return data.label_names(docs[cfg.data.label_field])


def build_model(cfg, vocab_size: int) -> nn.Module:
  num_classes = {"classify": len(labels(cfg)), "reward": 1}.get(cfg.task.kind, 0)
  return model_lib.build(cfg.model, vocab_size, num_classes)


def build(cfg, docs, tokenizer, cache_dir: str = "", process_index=0, process_count=1,
          starting_params=None, task_data: str = "") -> Task:
  """The task of the resolved config `cfg` on `docs`.

  What a task computes once from the model a run starts from (DPO: the reference
  log-probabilities of every pair) comes from `starting_params(model)` -> parameters, and is
  kept in the file `task_data` (the run directory's), so a resumed run reads it back.
  """
  tr, d = cfg.train, cfg.data
  micro = tr.batch_size // tr.grad_accum
  where = dict(process_index=process_index, process_count=process_count)

  if cfg.task.kind == "lm":
    eot_id = tokenizer.eot_id if d.document_masks else None
    model = build_model(cfg, tokenizer.vocab_size)
    objective = objectives.causal_lm(model, cfg.model.logits_chunk)
    if d.streaming:
      # A stream opened afresh (load_data's, checked, has moved on).
      batches, evals = streaming.lm_batches(streaming.open_documents(d, check=False), tokenizer,
                                            d.text_field, d.max_length, d.stride,
                                            tr.batch_size, tr.grad_accum, tr.eval_batches,
                                            d.shuffle_buffer, cfg.seed,
                                            eot_id=eot_id, **where)
      return Task(model, objective, batches, {"eval": evals},
                  f"a stream of {d.hf_name or d.path} tokenized on the fly; "
                  f"{len(evals) * micro} windows held out for validation")
    tokens = token_stream(cfg, docs, tokenizer, cache_dir)
    train_tokens, val_tokens = data.split(tokens, d.val_fraction)
    batches = data.lm_batches(train_tokens, d.max_length, d.stride, tr.batch_size,
                              tr.grad_accum, cfg.seed, eot_id=eot_id, **where)
    evals = {"eval": data.eval_batches(val_tokens, d.max_length, micro, tr.eval_batches,
                                       eot_id=eot_id, **where)}
    return Task(model, objective, batches, evals,
                f"{len(train_tokens):,} training tokens in {len(batches):,} windows")

  if cfg.task.kind == "mlm":
    doc_texts = [t or "" for t in docs[d.text_field]]
    cut = int(round(len(doc_texts) * (1.0 - d.val_fraction)))  # validation: the last documents
    pairs = {"train": data.SentencePairs(doc_texts[:cut], tokenizer, d.max_length, cfg.seed),
             "eval": data.SentencePairs(doc_texts[cut:], tokenizer, d.max_length, cfg.seed + 1)}

    def masked(split):  # a pair drawn for this epoch, then its tokens masked for this epoch
      return lambda idx, epochs: data.mask_tokens(pairs[split].take(idx, epochs), idx, epochs,
                                                  tokenizer, cfg.task.mask_rate, cfg.seed)

    batches = data.Batches(len(pairs["train"]), masked("train"), tr.batch_size, tr.grad_accum,
                           cfg.seed, **where)
    evals = {"eval": data.fixed_batches(len(pairs["eval"]), masked("eval"), micro,
                                        tr.eval_batches, **where)}
    model = build_model(cfg, tokenizer.vocab_size)
    objective = objectives.mlm_nsp(model, cfg.task.mlm_weight, cfg.task.nsp_weight)
    return Task(model, objective, batches, evals,
                f"{len(batches):,} training sentence pairs (a new partner and mask every "
                f"epoch), {len(pairs['eval']):,} for validation")

  if cfg.task.kind == "classify":
    values = docs[d.label_field]
    names = labels(cfg)
    if len(names) < 2:
      raise UserError(f"task.labels={cfg.task.labels!r}: a classifier needs at least 2 classes")
    label_ids = data.label_ids(values, names)
    rows = data.balance(label_ids, cfg.seed) if d.balance else np.arange(len(label_ids))
    examples = data.classification_examples([docs[int(i)][d.text_field] or "" for i in rows],
                                            label_ids[rows], tokenizer, d.max_length)
    model = build_model(cfg, tokenizer.vocab_size)
    objective = objectives.classification(model, names)
    counts = np.bincount(examples["labels"], minlength=len(names))
    what = ", ".join(f"{n} {c}" for n, c in zip(names, counts))
  elif cfg.task.kind == "instruct":
    rows = np.arange(len(docs))
    examples = data.instruction_examples([dict(r) for r in docs], tokenizer, d.max_length,
                                         cfg.task.mask_prompt)
    model = build_model(cfg, tokenizer.vocab_size)
    objective = objectives.causal_lm(model, cfg.model.logits_chunk)
    what = "instructions"
  else:  # reward, dpo: preference pairs
    examples, report = data.preference_examples([dict(r) for r in docs], tokenizer,
                                                d.max_length, d.chosen_field, d.rejected_field)
    rows = report["rows"]
    model = build_model(cfg, tokenizer.vocab_size)
    what = (f"preference pairs; {report['cut']} cut to data.max_length={d.max_length}, "
            f"{report['dropped']} dropped as their prompt alone fills it")
    if cfg.task.kind == "reward":
      objective = objectives.reward(model)
    else:
      objective = objectives.dpo(model, cfg.task.beta, cfg.task.dpo_average)
      examples["reference"] = _reference_logps(cfg, model, examples, starting_params, task_data,
                                               micro)

  parts = data.split_indices(len(examples["weights"]), d.val_fraction, d.test_fraction, cfg.seed,
                             what="records")
  subset = {name: {k: v[idx] for k, v in examples.items()} for name, idx in parts.items()}
  batches = data.Batches(len(parts["train"]), data.take_rows(subset["train"]), tr.batch_size,
                         tr.grad_accum, cfg.seed, **where)
  evals = {name: data.fixed_batches(len(idx), data.take_rows(subset[name]), micro, len(idx),
                                    **where)
           for name, idx in parts.items() if name != "train" and len(idx)}
  length = examples["tokens" if "tokens" in examples else "inputs"].shape[-1]
  return Task(model, objective, batches, evals,
              f"{len(examples['weights']):,} records ({what}), padded to {length} tokens: "
              + ", ".join(f"{len(idx)} {name}" for name, idx in parts.items()),
              splits={name: rows[idx] for name, idx in parts.items()})


def _reference_logps(cfg, model, examples, starting_params, path: str, batch_size: int):
  """log π_ref of both answers of every pair, [N, 2]: the starting model's, computed once
  (with LoRA, the base without its adapters, which start at zero) and kept at `path`."""
  n, average = len(examples["weights"]), cfg.task.dpo_average
  if path and os.path.isfile(path):
    with np.load(path) as saved:
      if saved["reference"].shape == (n, 2) and bool(saved["average"]) == average:
        return saved["reference"]
  if starting_params is None:
    raise UserError("DPO needs its reference model's log-probabilities: train with "
                    "init_from set, or keep the run directory's task data")
  params = starting_params(model)
  logps = jax.jit(lambda p, b: objectives.sequence_logps(model, p, b, average))
  reference = []
  for start in range(0, n, batch_size):  # every chunk of one shape: one compile
    rows = np.arange(start, start + batch_size) % n
    chunk = {k: examples[k][rows] for k in ("tokens", "response", "weights")}
    reference.append(np.asarray(logps(params, chunk))[:min(batch_size, n - start)])
  reference = np.concatenate(reference)
  if path and jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:  # whole or not at all
      np.savez(f, reference=reference, average=average)
    os.replace(path + ".tmp", path)
  return reference
