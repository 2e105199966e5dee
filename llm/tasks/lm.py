"""Next-token prediction on windows of a token stream: GPT pre-training (task.kind=lm).

The corpus is read as a stream and tokenized once into shards (data.shards, the cache folder),
or read from shards already prepared (data.prepared), or streamed and tokenized on the fly
(data.streaming). The last data.val_fraction of the token stream is held out (a stream holds out
its first windows instead).
"""

from llm.data import shards, sources, stream, windows
from llm.errors import UserError
from llm.evals import splits
from llm.tasks.base import Context, EvalOptions, register, Schema, Task, TaskData
from llm.training import objectives


@register
class LanguageModeling(Task):
  kind = "lm"
  pretrains = "gpt"
  reads_token_stream = True

  def load(self):
    """The corpus as a stream (nothing downloaded or copied first), checked on its first
    record; None when the run reads prepared shards."""
    if self.cfg.data.prepared:
      return None
    return sources.open_documents(self.cfg.data, stream=True)

  def token_stream(self, docs, tokenizer) -> shards.Tokens:
    """The whole token stream: data.prepared's shards, or `docs` tokenized once into the
    cache."""
    if self.cfg.data.prepared:
      return shards.open_shards(self.cfg.data.prepared, tokenizer).tokens
    return shards.prepare_tokens(self.cfg.data, docs, tokenizer).tokens

  def objective(self, model):
    return objectives.causal_lm(model, self.cfg.model.logits_chunk,
                                self.cfg.train.z_loss)

  def data(self, docs, model, context: Context) -> TaskData:
    cfg, d, tr = self.cfg, self.cfg.data, self.cfg.train
    tokenizer, micro = context.tokenizer, self.micro_batch()
    eot_id = tokenizer.eot_id if d.document_masks else None
    where = dict(process_index=context.process_index, process_count=context.process_count)
    if d.streaming:
      # A stream opened afresh (load's, checked, has moved on).
      batches, evals = stream.stream_batches(
          sources.open_documents(d, stream=True, check=False), tokenizer, d.text_field,
          d.max_length, d.stride, tr.batch_size, tr.grad_accum, tr.eval_batches,
          d.shuffle_buffer, cfg.seed, eot_id=eot_id, **where)
      summary = (f"a stream of {d.hf_name or d.path} tokenized on the fly; "
                 f"{len(evals) * micro} windows held out for validation")
    else:
      train_tokens, val_tokens = windows.split(self.token_stream(docs, tokenizer),
                                               d.val_fraction)
      batches = windows.train_windows(train_tokens, d.max_length, d.stride, tr.batch_size,
                                      tr.grad_accum, cfg.seed, eot_id=eot_id, **where)
      evals = windows.eval_windows(val_tokens, d.max_length, micro, tr.eval_batches,
                                   eot_id=eot_id, **where)
      summary = f"{len(train_tokens):,} training tokens in {len(batches):,} windows"
    return TaskData(batches, {"eval": evals}, Schema.of(batches.example(), d.max_length),
                    summary)

  def perplexity(self, run, path: str = "", text_field: str = "text", max_length: int = 0,
                 batch_size: int = 8, cache_dir: str = "") -> dict:
    """Loss and perplexity of `run`'s model over every token of the text at `path`, or by
    default of the run's own validation split (its data, tokenized and split as in training),
    in back-to-back windows of `max_length` tokens (default: the model's context, or the run's
    training window for its own split)."""
    cfg = self.cfg
    if path:
      task = self.on_data({"path": path, "hf_name": "", "text_field": text_field, "format": "",
                           "columns": "", "prepared": "",
                           "cache_dir": cache_dir or cfg.data.cache_dir})
      tokens = task.token_stream(task.load(), run.tokenizer)
    else:
      if cfg.data.streaming:
        raise UserError("a streamed run holds out the first windows of its stream; evaluate it "
                        "on a file with --data.path=PATH")
      task = self.on_data({"cache_dir": cache_dir}) if cache_dir else self
      tokens = windows.split(task.token_stream(task.load(), run.tokenizer),
                             cfg.data.val_fraction)[1]
    max_length = max_length or (not path and cfg.data.max_length) or cfg.model.max_len
    if not 1 <= max_length <= cfg.model.max_len:
      raise UserError(f"--max_length={max_length}: use 1 to the model's context "
                      f"{cfg.model.max_len}")
    batches = windows.eval_windows(tokens, max_length, batch_size, num_batches=len(tokens))
    return splits.evaluate_batches(run, self.objective(run.model), batches)

  def evaluate(self, run, context: Context, options: EvalOptions) -> dict:
    result = self.perplexity(run, options.data_path, options.text_field, options.max_length,
                             options.batch_size)
    what = options.data_path or "the validation split"
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
          f"({result['tokens']:,} tokens of {what})")
    return {"eval": result}
