"""A run directory as an lm-evaluation-harness model: every harness task runs on a model trained,
converted or fine-tuned here, on this project's sharded jitted forward pass and KV-cache sampler.

    python -m llm.lm_eval --workdir=runs/gpt2 --tasks=hellaswag,arc_easy --limit=500

`loglikelihood` and `loglikelihood_rolling` are llm/evals/loglikelihood.py (tokenized and cut as the
harness's Hugging Face model does, so both give the same numbers); `generate_until` samples with
llm/inference/sampling.py and cuts the text at the first stop string, as the harness does.
"""

from lm_eval.api.model import LM
from tqdm import tqdm

from llm.errors import UserError
from llm.evals import loglikelihood
from llm.inference.sampling import Generator


class HarnessModel(LM):
  """An opened run (runs.load) answering the harness's three kinds of request."""

  def __init__(self, run, batch_size: int = 16, max_gen_toks: int = 256):
    super().__init__()
    if run.task.produces != "text":
      raise UserError(f"{run.workdir} is a {run.cfg.task.kind} run: the harness scores "
                      f"language models (task.kind {run.task.kinds_producing('text')})")
    self.run, self.max_gen_toks = run, max_gen_toks
    self.scorer = loglikelihood.LogLikelihood(run.model, run.tokenizer, run.mesh, run.mesh_cfg,
                                              batch_size)
    self.generator = Generator(run)

  def _bar(self, total: int, what: str, disable: bool):
    return tqdm(total=total, desc=what, disable=disable, dynamic_ncols=True)

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    pairs = [self.scorer.encode(context, continuation) for context, continuation in
             (r.args for r in requests)]
    with self._bar(len(pairs), "loglikelihood", disable_tqdm) as bar:
      return self.scorer(self.run.params, pairs, bar.update)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    windows = [self.scorer.rolling_windows(r.args[0]) for r in requests]
    flat = [w for ws in windows for w in ws]
    with self._bar(len(flat), "loglikelihood_rolling", disable_tqdm) as bar:
      logps = [lp for lp, _ in self.scorer(self.run.params, flat, bar.update)]
    totals, i = [], 0
    for ws in windows:
      totals.append(sum(logps[i:i + len(ws)]))
      i += len(ws)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False):
    out = []
    for request in tqdm(requests, desc="generate_until", disable=disable_tqdm):
      context, kwargs = request.args
      kwargs = dict(kwargs or {})
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
      temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) \
          else 0.0
      max_new = min(max_new, self.scorer.max_len - 1)
      # As the harness: the context's last max_len - max_gen_toks tokens, whatever its length.
      ids = self.scorer.tok_encode(context)[-(self.scorer.max_len - max_new):]
      [[text]] = self.generator.generate_ids([ids], max_new_tokens=max_new,
                                             temperature=temperature)
      for stop in until:  # cut at the first stop string
        text = text.split(stop)[0]
      out.append(text)
    return out
