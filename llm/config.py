"""The config every run starts from, and the checks a resolved config must pass.

Experiment files in configs/ call `base_config()` and change what they need. `validate` runs when
an entry point starts, so a wrong value stops the run at once with a line naming the key.
"""

import json
import re

import ml_collections

from llm import tasks
from llm import model as model_lib
from llm.errors import UserError
from llm.model import attention
from llm.model.layers import ACTIVATIONS, MLPS, NORMS, POSITIONS, REMAT_POLICIES
from llm.model.moe import ROUTERS, MoEConfig
from llm.text import tokenizer as tokenizer_lib
from llm.training import metrics, optim

# Logical axis name -> mesh axes. A mesh axis is used at most once per array; rules are tried in
# order, so activations ('batch', 'length', 'embed') take `fsdp` for the batch and leave 'embed'
# whole, while parameters ('vocab', 'embed', ...) take `fsdp` for 'embed' (FSDP).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),  # expert devices hold different tokens outside MoE
    ("expert", "expert"),  # the experts of a mixture of experts
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
    ("layers", None),  # the stacked axis of scanned blocks (model.scan_layers)
)

DATA_FORMATS = ("", "text", "json", "csv", "tsv", "parquet")
DTYPES = ("float32", "bfloat16", "float16")


def base_config() -> ml_collections.ConfigDict:
  """Every key with its default. The comment beside a key is its documentation: `describe`
  shows it (python -m llm.train --config=FILE --print_config)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # the one seed of the run: parameters, dropout and data order
  c.init_from = ""  # a run directory or Hugging Face folder to start from (fine-tuning)

  c.task = ta = ml_collections.ConfigDict()
  ta.kind = "lm"  # what the run trains, a task of llm/tasks/ (its own keys follow, led by the
  #                 kinds that read them)
  for name, (default, _) in tasks.config_keys().items():
    ta[name] = default

  c.model = m = ml_collections.ConfigDict()
  m.kind = "gpt"  # the family, llm/model/: "gpt" (causal decoder; with the switches below, the
  #                 Llama family too) or "bert" (bidirectional encoder)
  m.num_layers = 4  # transformer blocks
  m.num_heads = 4  # attention heads per block; d_model must divide by it (unless head_dim)
  m.head_dim = 0  # each head's width; 0: d_model / num_heads (Qwen3 and Gemma set their own)
  m.d_model = 256  # width of the residual stream
  m.d_ff = 1024  # width of the MLP's hidden layer
  m.max_len = 256  # context: the most positions the model reads
  m.vocab_size = 0  # 0: the tokenizer's size; larger pads the embedding (e.g. 50304)
  m.dropout = 0.0  # on embeddings, attention and MLP outputs during training
  m.dtype = "float32"  # compute dtype ("bfloat16" on GPU/TPU); logits and loss stay float32
  m.param_dtype = "float32"  # the parameters' dtype: float32, or bfloat16 (half the memory; the
  #                            optimizer state keeps train.opt_state_dtype)
  m.tie_embeddings = True  # the LM head is the token embedding transposed
  m.use_bias = True  # biases in the attention and MLP projections
  m.ln_eps = 1e-5  # LayerNorm epsilon
  m.activation = "gelu_tanh"  # "gelu" (exact), "relu" or "silu"
  m.pre_ln = True  # False: LayerNorm after each residual (BERT)
  m.norm = "layernorm"  # or "rmsnorm" (Llama): every norm of the model
  m.mlp = "plain"  # activation(x W_in) W_out; "gated": (activation(x W_gate) * x W_in) W_out,
  #                  SwiGLU with activation="silu" (Llama), GeGLU with "gelu"
  m.num_kv_heads = 0  # key/value heads, grouped-query attention (1: multi-query); 0: num_heads
  m.qkv_bias = False  # biases in the query, key and value projections even without use_bias
  #                     (Qwen2)
  m.positions = "learned"  # "learned" (GPT-2, BERT), "sinusoidal" (added to the embeddings),
  #                          "rope" (rotary, Llama) or "none" (NoPE)
  m.rope_theta = 10000.0  # rope: the base of the rotation frequencies
  m.rope_scaling = ()  # rope: Llama 3's (factor, low_freq_factor, high_freq_factor, original
  #                      context) for a longer context; empty: none
  m.attention_impl = "auto"  # "auto": splash on TPU, cuDNN on GPU in half precision, else XLA
  #                 (the CPU's); or "xla", "cudnn", "splash" (off TPU: interpreted, for tests)
  m.remat = "none"  # per block, recompute in the backward pass: "full" (all), "dots" (all but
  #                   the matmul outputs); saves activation memory for compute
  m.scan_layers = False  # one nn.scan over the blocks: compile time and program size independent
  #                        of depth; checkpoints load either way
  m.logits_chunk = 0  # lm, instruct: positions whose logits exist at once in the loss; 0: all
  m.qk_norm = False  # RMSNorm over each head's queries and keys before rotation (Qwen3)
  m.moe = mo = ml_collections.ConfigDict()
  mo.num_experts = 0  # > 0: a mixture of experts in place of the MLP of the blocks chosen by
  #                     every and first_dense (llm/model/moe.py); 0: dense
  mo.experts_per_token = 2  # k: the experts each token is routed to
  mo.expert_d_ff = 0  # each expert's hidden width; 0: model.d_ff
  mo.num_shared_experts = 0  # always-on experts beside the routed ones (DeepSeek, Qwen-MoE),
  #                            one MLP of num_shared_experts x expert_d_ff
  mo.every = 1  # block i is MoE when (i + 1) % every == 0 (Qwen's decoder_sparse_step) ...
  mo.first_dense = 0  # ... and i >= first_dense (DeepSeek's first_k_dense_replace)
  mo.router = "softmax"  # "softmax" over all experts then the top k (Mixtral, Qwen), or
  #                        "sigmoid" scores (DeepSeek-V3)
  mo.renormalize = True  # the top k weights divided by their sum (Mixtral; Qwen's
  #                        norm_topk_prob)
  mo.routed_scale = 1.0  # the routed experts' weights times this (DeepSeek's
  #                        routed_scaling_factor)
  mo.bias_update_rate = 0.0  # > 0: auxiliary-loss-free balancing: a router bias, used to
  #                            choose experts only, moved by this each step towards equal load
  #                            (DeepSeek-V3: 0.001); a parameter no optimizer touches
  mo.balance_loss = 0.01  # weight of the load-balancing loss E x sum_e f_e P_e (1: balanced)
  mo.z_loss = 0.001  # weight of the router z-loss, mean logsumexp(router logits)^2
  mo.capacity_factor = 0.0  # 0: dropless; > 0: at most ceil(factor x tokens x k / experts)
  #                           copies per expert, the rest dropped (counted in metrics)

  c.tokenizer = t = ml_collections.ConfigDict()
  t.kind = "sentencepiece"  # "sentencepiece" (BPE trained on the run's text), "gpt2", "wordpiece",
  #                           "hf" (tokenizer.path's tokenizer.json, e.g. Llama 3's or SmolLM's)
  t.path = ""  # existing tokenizer files; empty: train one on the run's text
  t.vocab_size = 4096  # size of a trained tokenizer
  t.train_chars = 20_000_000  # text read to train a tokenizer
  t.lowercase = True  # wordpiece: lower-case and strip accents (an "uncased" vocabulary)
  t.chat_template = ""  # how conversations are rendered: "" the tokenizer's own (its folder's
  #                       chat_template), "chatml", or the path of a Jinja template file

  c.data = d = ml_collections.ConfigDict()
  d.path = ""  # local file, glob or folder; empty (and no hf_name): the embedded corpus
  d.hf_name = ""  # a hub data set
  d.hf_config = ""  # the hub data set's configuration
  d.split = "train"  # the hub data set's split
  d.format = ""  # empty: from the file extension; or text, json, csv, tsv, parquet
  d.columns = ""  # column names of a CSV/TSV file without a header row, comma-separated
  d.text_field = "text"  # the column holding the text
  d.label_field = "label"  # classify: the column holding the label
  d.chosen_field = "chosen"  # reward, dpo: the preferred answer of an Alpaca-style record
  d.rejected_field = "rejected"  # reward, dpo: the other answer
  d.balance = False  # classify: undersample every class to the smallest one's size
  d.skip_bad_rows = False  # classify, instruct, reward, dpo: leave out records that lack a
  #                           field or cannot be used (else stop, naming the first)
  d.packing = False  # instruct, reward, dpo: records packed into rows (best-fit decreasing),
  #                    kept apart by document masks, instead of one padded record per row
  d.max_length = 256  # tokens per training window (inputs) or longest record; 0: the context
  d.stride = 256  # tokens between the starts of consecutive windows
  d.val_fraction = 0.1  # held out for validation (the end of the token stream, or records)
  d.test_fraction = 0.0  # classify, instruct: held out for the final test evaluation
  d.cache_dir = ""  # tokenized data; empty: ~/.cache/llm
  d.prepared = ""  # lm: a folder (local or gs://) of shards from python -m llm.prepare, read
  #                  instead of data.path / hf_name, with the tokenizer saved there
  d.streaming = False  # lm: read the hub data set (or data.path) as a stream, tokenized on the
  #                      fly: no download or preparation first; see data.shuffle_buffer
  d.shuffle_buffer = 10_000  # streaming: windows shuffled together (0: the stream's order)
  d.document_masks = False  # lm: attention stays within a document (never across an
  #                           end-of-text) and positions restart at each document

  c.train = tr = ml_collections.ConfigDict()
  tr.steps = 1000  # optimizer steps
  tr.batch_size = 32  # global, in sequences, per optimizer step
  tr.grad_accum = 1  # micro-batches per step; batch_size must divide by it
  tr.optimizer = "adamw"  # adamw, muon, lion, adafactor, sgd or schedule_free
  #                         (llm/training/optim.py)
  tr.lr = 3e-4  # peak learning rate (Muon's hidden matrices: train.muon_lr)
  tr.schedule = "cosine"  # after the warmup: cosine, linear (to min_lr), wsd, constant
  tr.min_lr = 3e-5  # where the schedule's decay ends
  tr.warmup_steps = 100  # linear warmup from 0 to train.lr
  tr.decay_fraction = 0.2  # wsd: the last share of the steps, decayed to min_lr
  tr.decay_shape = "linear"  # wsd: the decay's shape, "linear" or "1-sqrt"
  tr.weight_decay = 0.1  # decoupled (times the learning rate), on matrices only
  tr.b1 = 0.9  # first-moment decay (AdamW, schedule-free's interpolation, Lion's update)
  tr.b2 = 0.95  # second-moment decay (AdamW, schedule-free; Lion's momentum)
  tr.eps = 1e-8  # AdamW's and schedule-free's denominator term
  tr.muon_lr = 0.02  # muon: the hidden matrices' peak learning rate (the rest: train.lr)
  tr.muon_beta = 0.95  # muon: momentum (Nesterov)
  tr.momentum = 0.9  # sgd: momentum (0: plain SGD)
  tr.nesterov = False  # sgd: Nesterov momentum
  tr.opt_state_dtype = "float32"  # the optimizer state: float32 or bfloat16 (ν stays float32)
  tr.grad_clip = 1.0  # global gradient norm clipped to this; 0: off
  tr.z_loss = 0.0  # lm, instruct: z_loss x log(Z)^2 added per target (PaLM: 1e-4); 0: off
  tr.ema = 0.0  # > 0: keep this decay's moving average of the parameters (evaluate, sample and
  #               export it with --use_ema); e.g. 0.999
  tr.log_every = 10  # steps between train lines in metrics.jsonl
  tr.eval_every = 200  # steps between evaluations on the validation split
  tr.eval_at_start = False  # evaluate before the first step too (step 0: the starting model)
  tr.evals = ""  # benchmarks scored at every evaluation too (llm/evals/benchmarks.py), e.g.
  #                "hellaswag,arc_easy" or "lambada:path/to/file.jsonl"; logged as split NAME
  tr.eval_examples = 500  # the first N examples of each benchmark in train.evals (0: all)
  tr.benchmark_dir = "data"  # where `llm.data_sets fetch NAME DIR` put the benchmarks
  tr.eval_batches = 20  # validation batches per evaluation (lm, mlm)
  tr.checkpoint_every = 500  # steps between checkpoints (and always at the end)
  tr.keep_checkpoints = 3  # newest checkpoints kept
  tr.trainable = "all"  # "all", "head" (the output head) or "last:K" (K blocks, the final norm
  #                       or pooler, and the head)
  tr.peak_flops = 0.0  # per device, for MFU; 0: look the device up in a table
  tr.wandb_project = ""  # also log to this Weights & Biases project (pip install wandb;
  #                        WANDB_MODE=offline needs no account); "": TensorBoard and
  #                        metrics.jsonl only
  tr.profile_steps = ""  # "START:STOP": a jax.profiler trace of steps START..STOP (from 1)
  #                        in DIR/profile/, for TensorBoard's profile tab or Perfetto
  tr.on_nonfinite = "stop"  # a step with a non-finite loss or gradient is never applied; "stop":
  #                           the run stops there (nothing after it saved); "skip": go on
  tr.max_nonfinite = 10  # on_nonfinite=skip: stop after this many such steps in a row

  c.lora = lo = ml_collections.ConfigDict()
  lo.rank = 0  # 0: off; otherwise base weights freeze and rank-r adapters train
  lo.alpha = 16.0  # the adapters' update is scaled by alpha / rank
  lo.targets = r"(attn/(query|key|value|out)|mlp/(wi|wo))/kernel"  # regex over parameter paths

  c.mesh = me = ml_collections.ConfigDict()
  me.data = -1  # replicas; -1: the devices the other axes leave
  me.fsdp = 1  # parameter and optimizer-state shards (the batch is split too)
  me.tensor = 1  # heads, MLP width and vocabulary split
  me.expert = 1  # experts split (expert parallelism; the batch is split too)
  me.rules = DEFAULT_RULES  # logical axis name -> mesh axes
  return c


def describe_keys() -> dict[str, str]:
  """'train.steps' -> its comment in `base_config`, for every key, in order (the tasks' own
  keys, declared by each task, after task.kind)."""
  import inspect
  sections, described, last = {"c": ""}, {}, None
  for line in inspect.getsource(base_config).splitlines():
    if match := re.match(r"\s*(\w+)\.(\w+) = (\w+) = ml_collections", line):
      sections[match.group(3)] = sections[match.group(1)] + match.group(2) + "."
    elif match := re.match(r"\s*(\w+)\.(\w+) = [^#]*?(?:#\s*(.*))?$", line):
      last = sections[match.group(1)] + match.group(2)
      described[last] = match.group(3) or ""
    elif match := re.match(r"\s*#\s*(.*)$", line):
      if last:  # a comment continued on the next line
        described[last] += " " + match.group(1)
  task_keys = {f"task.{name}": meaning for name, (_, meaning) in tasks.config_keys().items()}
  ordered = {}
  for key, meaning in described.items():
    if key == "task.kind":
      ordered[key] = f"{meaning}: one of {', '.join(tasks.kinds())}"
      ordered.update(task_keys)
    else:
      ordered[key] = meaning
  return ordered


def describe(cfg: ml_collections.ConfigDict) -> str:
  """Every key of `cfg` with its value and meaning, one per line."""
  lines = []
  for key, meaning in describe_keys().items():
    value = cfg
    for part in key.split("."):
      value = value[part]
    setting = f"{key} = {value!r}"
    lines.append(f"{setting:<40} # {meaning}" if meaning else setting)
  return "\n".join(lines)


def resolve(cfg, source_values: dict | None = None) -> ml_collections.FrozenConfigDict:
  """The config a run trains with, settled before any data is read, validated and frozen:
  what DIR/config.json holds (with the values only the data can give, such as a classifier's
  labels, filled in once by startup.setup).

  - `source_values`: the `init_from` model's sections (`model`, `tokenizer`): the architecture
    and tokenizer are the source's; dropout stays the run's.
  - data.max_length=0 becomes the model's context.
  """
  cfg = ml_collections.ConfigDict(cfg.to_dict()) if isinstance(
      cfg, ml_collections.FrozenConfigDict) else cfg.copy_and_resolve_references()
  for section, values in (source_values or {}).items():
    cfg[section].update({k: v for k, v in values.items() if k != "dropout"})
  if cfg.data.max_length == 0:
    cfg.data.max_length = cfg.model.max_len
  validate(cfg)
  return ml_collections.FrozenConfigDict(cfg)


def replace(cfg, changes: dict) -> ml_collections.FrozenConfigDict:
  """A frozen copy of `cfg` with {"section.key": value} changed (a derived config, e.g. the
  same run read on other data)."""
  new = ml_collections.ConfigDict(cfg.to_dict())
  for key, value in changes.items():
    section, _, name = key.rpartition(".")
    (new[section] if section else new)[name] = value
  return ml_collections.FrozenConfigDict(new)


# What a resumed run may change: how long and how it trains, logs and saves, the devices it runs
# on and how the model is computed there (its numbers, not its parameters). What the run is (its
# model, tokenizer, task, data and seed) stays: the checkpoint and the data order were made
# with it.
RESUMABLE = ("train.", "mesh.", "data.cache_dir", "data.shuffle_buffer", "init_from",
             "model.dtype", "model.attention_impl", "model.remat", "model.scan_layers",
             "model.logits_chunk")
# The checkpoint holds the trainable parameters only, and the state of this optimizer (and
# moving average) in these dtypes.
NOT_RESUMABLE = ("train.trainable", "train.optimizer", "train.opt_state_dtype", "train.ema")
RESUME_NOTES = {
    "train.batch_size": "the data goes on with the next example the run has not seen",
    "train.grad_accum": "the same sequences per step, in other micro-batches",
    "train.steps": "the learning-rate schedule is stretched to the new length",
    "init_from": "a resumed run restores its checkpoint; init_from only started it",
}


def resume_changes(saved: dict, cfg) -> list[str]:
  """What resuming a run whose DIR/config.json holds `saved` with `cfg` changes, one
  "key: old -> new (meaning)" per key. A key that cannot change (a model's shape, its data)
  raises UserError naming it. Keys `saved` lacks (added to the code since) are not compared."""
  new, old = _flatten(json.loads(cfg.to_json_best_effort())), _flatten(saved)
  changes = []
  for key in new:
    if key not in old or old[key] == new[key]:
      continue
    if key in NOT_RESUMABLE or not key.startswith(RESUMABLE):
      raise UserError(f"config: {key}={new[key]!r}, but the run being resumed has {old[key]!r} "
                      "(its config.json); what a run is cannot change on resume: use its value, "
                      "or a new --workdir")
    note = RESUME_NOTES.get(key)
    changes.append(f"{key}: {old[key]!r} -> {new[key]!r}" + (f" ({note})" if note else ""))
  return changes


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _check(ok: bool, key: str, allowed: str, value) -> None:
  if not ok:
    raise UserError(f"config: {key}={value!r} is not allowed; {allowed}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the first key whose value cannot work (the task's own settings
  are its task's to check: tasks.build)."""
  m, t, d, tr, me = c.model, c.tokenizer, c.data, c.train, c.mesh
  _check(m.kind in model_lib.FAMILIES, "model.kind", f"use one of {tuple(model_lib.FAMILIES)}",
         m.kind)
  for key in ("num_layers", "num_heads", "d_model", "d_ff", "max_len"):
    _check(m[key] >= 1, f"model.{key}", "use a positive integer", m[key])
  _check(m.head_dim >= 0, "model.head_dim", "use 0 (d_model / num_heads) or a width", m.head_dim)
  _check(m.head_dim or m.d_model % m.num_heads == 0, "model.d_model",
         f"must be divisible by model.num_heads={m.num_heads} (or set model.head_dim)", m.d_model)
  head_dim = m.head_dim or m.d_model // m.num_heads
  _check(m.vocab_size >= 0, "model.vocab_size", "use 0 (the tokenizer's) or a size", m.vocab_size)
  _check(0.0 <= m.dropout < 1.0, "model.dropout", "use a value in [0, 1)", m.dropout)
  _check(m.dtype in DTYPES, "model.dtype", f"use one of {DTYPES}", m.dtype)
  _check(m.param_dtype in optim.STATE_DTYPES, "model.param_dtype",
         f"use one of {optim.STATE_DTYPES}", m.param_dtype)
  _check(m.activation in ACTIVATIONS, "model.activation", f"use one of {tuple(ACTIVATIONS)}",
         m.activation)
  _check(m.attention_impl in attention.IMPLS, "model.attention_impl",
         f"use one of {attention.IMPLS}", m.attention_impl)
  _check(m.norm in NORMS, "model.norm", f"use one of {NORMS}", m.norm)
  _check(m.mlp in MLPS, "model.mlp", f"use one of {MLPS}", m.mlp)
  _check(m.positions in POSITIONS, "model.positions", f"use one of {tuple(POSITIONS)}",
         m.positions)
  _check(m.num_kv_heads >= 0 and (m.num_kv_heads == 0 or m.num_heads % m.num_kv_heads == 0),
         "model.num_kv_heads", f"use 0 or a divisor of model.num_heads={m.num_heads}",
         m.num_kv_heads)
  _check(m.positions != "rope" or head_dim % 2 == 0, "model.positions",
         "rotary positions need an even head dimension (model.head_dim)", m.positions)
  _check(m.positions != "sinusoidal" or m.d_model % 2 == 0, "model.positions",
         "sinusoidal positions need an even d_model", m.positions)
  _check(len(m.rope_scaling) in (0, 4), "model.rope_scaling",
         "use () or (factor, low_freq_factor, high_freq_factor, original context)",
         m.rope_scaling)
  _check(m.remat in REMAT_POLICIES, "model.remat", f"use one of {tuple(REMAT_POLICIES)}", m.remat)
  _check(m.logits_chunk >= 0, "model.logits_chunk", "use 0 (off) or a number of positions",
         m.logits_chunk)
  mo = m.moe
  _check(mo.num_experts >= 0, "model.moe.num_experts", "use 0 (dense) or a number of experts",
         mo.num_experts)
  if mo.num_experts:
    _check(1 <= mo.experts_per_token <= mo.num_experts, "model.moe.experts_per_token",
           f"use 1 to model.moe.num_experts={mo.num_experts}", mo.experts_per_token)
    for key in ("expert_d_ff", "num_shared_experts", "first_dense"):
      _check(mo[key] >= 0, f"model.moe.{key}", "use 0 or more", mo[key])
    _check(mo.every >= 1, "model.moe.every", "use a positive integer", mo.every)
    _check(mo.router in ROUTERS, "model.moe.router", f"use one of {tuple(ROUTERS)}", mo.router)
    for key in ("balance_loss", "z_loss", "capacity_factor", "bias_update_rate"):
      _check(mo[key] >= 0, f"model.moe.{key}", "use 0 (off) or a positive value", mo[key])
    _check(mo.routed_scale > 0, "model.moe.routed_scale", "use a positive factor",
           mo.routed_scale)
    moe_layers = MoEConfig(num_experts=mo.num_experts, every=mo.every,
                           first_dense=mo.first_dense).num_moe_layers(m.num_layers)
    _check(moe_layers > 0, "model.moe.every",
           f"no block of model.num_layers={m.num_layers} is MoE with model.moe.first_dense="
           f"{mo.first_dense}", mo.every)
    _check(not m.scan_layers or moe_layers == m.num_layers, "model.scan_layers",
           "scanned blocks must be alike: with MoE use model.moe.every=1 and first_dense=0, or "
           "model.scan_layers=False", m.scan_layers)
  _check(t.kind in tokenizer_lib.kinds(), "tokenizer.kind",
         f"use one of {tokenizer_lib.kinds()}", t.kind)
  _check(t.vocab_size >= 260, "tokenizer.vocab_size",
         "use at least 260 (256 byte pieces + specials)", t.vocab_size)
  _check(not (d.path and d.hf_name), "data.hf_name", "set data.path or data.hf_name, not both",
         d.hf_name)
  _check(d.max_length >= 0, "data.max_length", "use 0 (the model's context) or a length",
         d.max_length)
  _check(d.max_length <= m.max_len, "data.max_length",
         f"must be at most model.max_len={m.max_len}", d.max_length)
  _check(d.stride >= 1, "data.stride", "use a positive number of tokens", d.stride)
  _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", "use a value in (0, 1)",
         d.val_fraction)
  _check(d.format in DATA_FORMATS, "data.format", f"use one of {DATA_FORMATS}", d.format)
  _check(0.0 <= d.test_fraction < 1.0 and d.val_fraction + d.test_fraction < 1.0,
         "data.test_fraction", f"use a value in [0, 1 - data.val_fraction={d.val_fraction})",
         d.test_fraction)
  _check(not (d.prepared and d.streaming), "data.streaming",
         "read prepared shards (data.prepared) or a stream, not both", d.streaming)
  _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", "use 0 (no shuffle) or a number of "
         "windows", d.shuffle_buffer)
  _check(not model_lib.family(m.kind).needs_bert_specials
         or tokenizer_lib.get(t.kind).bert_specials, "tokenizer.kind",
         f"model.kind={m.kind} needs [CLS], [SEP] and [MASK]: use tokenizer.kind="
         f"{' or '.join(k for k in tokenizer_lib.kinds() if tokenizer_lib.get(k).bert_specials)}",
         t.kind)
  _check(tr.trainable in ("all", "head") or (
      tr.trainable.startswith("last:") and tr.trainable[5:].isdigit()), "train.trainable",
         'use "all", "head" or "last:K" (K blocks, the final norm and the head)', tr.trainable)
  _check(c.lora.rank >= 0, "lora.rank", "use 0 (off) or a positive rank", c.lora.rank)
  try:
    re.compile(c.lora.targets)
  except re.error as e:
    _check(False, "lora.targets", f"use a valid regular expression ({e})", c.lora.targets)
  _check(not (m.scan_layers and tr.trainable.startswith("last:")), "train.trainable",
         "last:K needs model.scan_layers=False (scanned blocks are one stacked array each)",
         tr.trainable)
  _check(c.lora.rank == 0 or tr.trainable == "all", "train.trainable",
         "with lora.rank > 0 the adapters (and a task head) train; leave train.trainable=all",
         tr.trainable)
  _check(tr.steps >= 1, "train.steps", "use a positive integer", tr.steps)
  _check(tr.grad_accum >= 1, "train.grad_accum", "use a positive integer", tr.grad_accum)
  _check(tr.batch_size >= 1 and tr.batch_size % tr.grad_accum == 0, "train.batch_size",
         f"must be a positive multiple of train.grad_accum={tr.grad_accum}", tr.batch_size)
  _check(tr.lr > 0, "train.lr", "use a positive learning rate", tr.lr)
  _check(0 <= tr.min_lr <= tr.lr, "train.min_lr", f"use a value in [0, train.lr={tr.lr}]",
         tr.min_lr)
  _check(0 <= tr.warmup_steps, "train.warmup_steps", "use 0 or more", tr.warmup_steps)
  for key, allowed in (("optimizer", optim.OPTIMIZERS), ("schedule", optim.SCHEDULES),
                       ("decay_shape", optim.DECAY_SHAPES),
                       ("opt_state_dtype", optim.STATE_DTYPES)):
    _check(tr[key] in allowed, f"train.{key}", f"use one of {allowed}", tr[key])
  _check(0 < tr.decay_fraction <= 1, "train.decay_fraction", "use a share in (0, 1]",
         tr.decay_fraction)
  _check(tr.optimizer != "schedule_free" or tr.schedule == "constant", "train.schedule",
         "schedule_free averages instead of decaying: use train.schedule=constant", tr.schedule)
  try:
    profiled = metrics.profile_range(tr.profile_steps)
  except ValueError:
    _check(False, "train.profile_steps", 'use "START:STOP" with 1 <= START <= STOP, or "" '
           "(off)", tr.profile_steps)
  _check(not profiled or profiled[1] <= tr.steps, "train.profile_steps",
         f"the run ends at train.steps={tr.steps}: profile steps up to it", tr.profile_steps)
  _check(tr.z_loss >= 0, "train.z_loss", "use 0 (off) or a positive coefficient", tr.z_loss)
  _check(0 <= tr.ema < 1, "train.ema", "use 0 (off) or a decay in (0, 1)", tr.ema)
  _check(tr.muon_lr > 0, "train.muon_lr", "use a positive learning rate", tr.muon_lr)
  for key in ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
    _check(tr[key] >= 1, f"train.{key}", "use a positive integer", tr[key])
  _check(tr.eval_examples >= 0, "train.eval_examples", "use 0 (all) or more", tr.eval_examples)
  _check(tr.on_nonfinite in ("stop", "skip"), "train.on_nonfinite", 'use "stop" or "skip"',
         tr.on_nonfinite)
  _check(tr.max_nonfinite >= 1, "train.max_nonfinite", "use a positive integer",
         tr.max_nonfinite)
  for key in ("data", "fsdp", "expert", "tensor"):
    _check(me[key] == -1 or me[key] >= 1, f"mesh.{key}", "use a positive size or -1", me[key])
  sizes = (me.data, me.fsdp, me.expert, me.tensor)
  _check(sizes.count(-1) <= 1, "mesh",
         "at most one of mesh.data, mesh.fsdp, mesh.expert, mesh.tensor may be -1", sizes)
  _check(not mo.num_experts or me.expert == -1 or mo.num_experts % me.expert == 0, "mesh.expert",
         f"the experts are split over it: use a divisor of model.moe.num_experts="
         f"{mo.num_experts}", me.expert)
