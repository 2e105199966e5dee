"""Online reinforcement learning from rewards (task.kind=grpo or rloo): RLHF's last step.

Every step the policy samples task.num_generations completions to each prompt of its batch, with
the project's own KV-cache sampler, jitted on the training mesh with the training parameters (one
copy of the weights, no separate inference engine); rewards score them (a reward model run, a
Python function, or a weighted sum of several); the completions' advantages are their rewards
against the other completions of the same prompt; and the policy takes task.updates_per_rollout
optimizer steps on PPO's clipped surrogate with a KL penalty to the reference
(policy_gradient), each a pass over the whole rollout.

- grpo: A = (r - mean of the group) / (std of the group + 1e-4), the std with Bessel's
  correction as TRL takes it, without the division when task.scale_rewards is False (Dr. GRPO).
- rloo: A = r - mean of the group's other completions (REINFORCE leave-one-out).

Prompts are records of any format prompts.py reads (a conversation up to its last assistant
turn, a prompt, an Alpaca instruction), formatted as in instruction tuning, and a completion ends
at end-of-text or the chat template's end of turn; at each evaluation the held-out ones are answered greedily, and
task.num_generations times by sampling (the best of those: best-of-n), scored by the same
rewards. The reference is the starting model: with LoRA the base with its adapters
off (no second copy), otherwise a frozen copy of the init_from weights.
"""

import importlib
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from llm.errors import UserError
from llm.evals import splits
from llm.inference import sampling, scoring
from llm.tasks.base import Context, RecordTask, register, TaskData
from llm.text import prompts as prompts_lib, tokenizer as tokenizer_lib
from llm.training import objectives, sharding, params as params_lib


# -- rewards -----------------------------------------------------------------------------------
# A reward function: (prompts, completions, records) -> one float per completion.


def exact_match(prompts, completions, records, field: str = "output"):
  """1 when the completion is the record's answer (spaces around it aside), else 0."""
  return [float(c.strip() == prompts_lib.answer_text(r, field).strip())
          for c, r in zip(completions, records)]


def contains_answer(prompts, completions, records, field: str = "output"):
  """1 when the record's answer appears in the completion, else 0."""
  return [float(prompts_lib.answer_text(r, field).strip() in c)
          for c, r in zip(completions, records)]


exact_match.needs_answer = contains_answer.needs_answer = True  # see Rewards.check


def brevity(prompts, completions, records):
  """Minus the completion's length in characters over 100: a small push to stop."""
  return [-len(c) / 100.0 for c in completions]


BUILT_IN = {"exact_match": exact_match, "contains_answer": contains_answer, "brevity": brevity}


def reward_functions(spec: str) -> list[tuple[str, float, object]]:
  """"name[*weight],module:function[*weight],..." -> (name, weight, function)."""
  functions = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, _, weight = item.partition("*")
    try:
      weight = float(weight) if weight else 1.0
    except ValueError:
      raise UserError(f"task.rewards: {item!r}: the weight after * is not a number") from None
    if ":" in name:
      module, _, attribute = name.partition(":")
      if not all(part.isidentifier() for part in module.split(".")) or not attribute:
        raise UserError(f"task.rewards: {name!r} is not module:function (e.g. "
                        "my_rewards:correctness, with my_rewards.py importable)")
      try:
        function = getattr(importlib.import_module(module), attribute)
      except SyntaxError as e:
        raise UserError(f"task.rewards: {name!r}: {e.filename}, line {e.lineno}: {e.msg}") \
            from None
      except (Exception, SystemExit) as e:  # the user's module, run as it is imported
        raise UserError(f"task.rewards: cannot load {name!r} ({type(e).__name__}: {e})") \
            from None
      if not callable(function):
        raise UserError(f"task.rewards: {name!r} is not a function")
    elif name in BUILT_IN:
      function = BUILT_IN[name]
    else:
      raise UserError(f"task.rewards: no reward {name!r}; built in: {', '.join(BUILT_IN)}, or "
                      "module:function")
    functions.append((name, weight, function))
  return functions


class Rewards:
  """The weighted sum of task.rewards' functions and the task.reward_model's score."""

  def __init__(self, cfg, open_run):
    """`open_run`: run directory -> opened run (Context.open_run), for task.reward_model."""
    self.functions = reward_functions(cfg.task.rewards)
    if cfg.task.reward_model:
      scorer = scoring.Scorer(open_run(cfg.task.reward_model))
      self.functions.append(("model", cfg.task.reward_model_weight,
                             lambda p, c, r: scorer.score(p, c)))
    if not self.functions:
      raise UserError(f"task.kind={cfg.task.kind} needs rewards: set task.rewards (e.g. "
                      "exact_match) or task.reward_model=DIR")

  def check(self, records: list[dict], path: str) -> None:
    """Before anything is sampled: a reward that compares with the record's answer needs one in
    every record (an empty answer would match an empty completion, and be in every one)."""
    for name, _, function in self.functions:
      if getattr(function, "needs_answer", False):
        for number, record in enumerate(records, 1):
          if not prompts_lib.answer_text(record).strip():
            raise UserError(f"task.rewards={name} compares completions with each record's "
                            f"answer, but record {number} of {path} has none (an output, a "
                            "completion or an assistant turn)")

  def __call__(self, prompt_texts, completions, records) -> tuple[np.ndarray, dict]:
    """(the total reward of each completion, each function's mean)."""
    total, means = np.zeros(len(completions)), {}
    for name, weight, function in self.functions:
      try:
        values = np.asarray(function(prompt_texts, completions, records), np.float64)
      except UserError:
        raise
      except (Exception, SystemExit) as e:  # the user's code: said in one line, naming it
        raise UserError(f"reward {name!r} raised {type(e).__name__}: {e}") from None
      if values.shape != (len(completions),) or not np.all(np.isfinite(values)):
        raise UserError(f"reward {name!r} must return one finite number per completion "
                        f"({len(completions)}); it returned {values.shape[0] if values.ndim else 1}"
                        f" values{'' if np.all(np.isfinite(values)) else ', not all finite'}")
      total += weight * values
      means[f"reward_{name.split(':')[-1]}"] = float(values.mean())
    return total, means


def advantages(rewards_M: np.ndarray, group: int, algorithm: str, scale: bool) -> np.ndarray:
  """Each completion's advantage against the others of its prompt (rows in groups of `group`)."""
  r = rewards_M.reshape(-1, group)
  if algorithm == "rloo":  # the mean of the other group - 1 completions
    return (r - (r.sum(1, keepdims=True) - r) / (group - 1)).reshape(-1)
  centred = r - r.mean(1, keepdims=True)
  if scale:
    centred = centred / (r.std(1, ddof=1, keepdims=True) + 1e-4)  # TRL's (n - 1) std
  return centred.reshape(-1)


# -- the task ----------------------------------------------------------------------------------


@register
class PolicyOptimization(RecordTask):
  kind = algorithm = "grpo"  # how advantages are made: see `advantages`
  produces = "text"
  families = ("gpt",)
  online = True
  keys = {
      "rewards": ("", 'reward functions, "name[*weight],...": built in exact_match, '
                  "contains_answer (against the record's output), brevity; or module:function"),
      "reward_model": ("", "a reward model run directory (a task.kind=reward run), added to "
                       "the rewards"),
      "reward_model_weight": (1.0, "its weight in the sum"),
      "num_generations": (4, "completions sampled per prompt: the group compared"),
      "max_new_tokens": (32, "the longest completion"),
      "temperature": (1.0, "sampling temperature of the completions"),
      "top_p": (1.0, "nucleus sampling of the completions"),
      "updates_per_rollout": (1, "optimizer passes over each step's rollout (PPO epochs; "
                              "GRPO's μ)"),
      "clip_eps": (0.2, "PPO's clip of the probability ratio: [1 - clip_eps, 1 + "
                   "clip_eps_high]"),
      "clip_eps_high": (0.0, "the upper clip (DAPO's clip-higher); 0: clip_eps"),
      "kl_coef": (0.04, "the KL penalty to the reference (k3 estimator); 0: none"),
      "kl_ratio": (True, "weigh the KL penalty by the ratio ρ (DeepSeek-V3.2; TRL's "
                   "use_bias_correction_kl): its gradient becomes reverse KL's, unbiased"),
      "scale_rewards": (True, "divide the advantages by the group's std (grpo; False: Dr. GRPO; "
                        "rloo's leave-one-out baseline is never scaled)"),
      "loss_norm": ("token", '"token" (DAPO), "sequence" (GRPO) or "constant" (Dr. GRPO): '
                    "see NORMALIZATIONS"),
  }

  def fields(self):
    return lambda columns: prompts_lib.record_fields(columns)[:1]  # the prompt's

  def check(self):
    super().check()
    t = self.cfg.task
    if not self.cfg.init_from:
      raise UserError(f"task.kind={self.kind} improves a model: set init_from (typically an "
                      "instruction-tuned run)")
    if t.updates_per_rollout < 1:
      raise UserError(f"task.updates_per_rollout={t.updates_per_rollout}: use 1 or more")
    if t.num_generations < 2:
      raise UserError(f"task.num_generations={t.num_generations}: a group needs at least 2 "
                      "completions to compare")
    if t.loss_norm not in NORMALIZATIONS:
      raise UserError(f"task.loss_norm={t.loss_norm!r}: use one of "
                      f"{', '.join(NORMALIZATIONS)}")
    if t.max_new_tokens < 1 or t.temperature <= 0 or not 0 < t.top_p <= 1:
      raise UserError("task: use max_new_tokens >= 1, temperature > 0 and 0 < top_p <= 1")

  def prompt(self, record: dict, tokenizer) -> str:
    return prompts_lib.prompt_text(record, tokenizer)

  def tokenizer_texts(self, docs):
    return []  # the init_from model's tokenizer (check: init_from is set)

  def objective(self, model):
    t = self.cfg.task
    return policy_gradient(model, t.clip_eps, t.clip_eps_high or t.clip_eps, t.kl_coef,
                           t.loss_norm, t.max_new_tokens, t.temperature, t.top_p, t.kl_ratio)

  def examples(self, docs, model, context: Context):
    """Left-padded prompts (the instruction template), room left for max_new_tokens."""
    tokenizer, t = context.tokenizer, self.cfg.task
    room = model.cfg.max_len - t.max_new_tokens
    ids = prompts_lib.encode_prompts(tokenizer, [prompts_lib.prompt_text(dict(r), tokenizer)
                                                 for r in docs])
    kept = [i for i, p in enumerate(ids) if 0 < len(p) <= room]
    if not kept:
      raise UserError(f"no prompt fits the model's context of {model.cfg.max_len} tokens with "
                      f"task.max_new_tokens={t.max_new_tokens}")
    prompt, valid = tokenizer_lib.pad([ids[i] for i in kept], max(len(ids[i]) for i in kept),
                                      tokenizer.eot_id, left=True)
    return ({"prompt": prompt, "prompt_valid": valid, "record": np.asarray(kept, np.int32),
             "weights": np.ones(len(kept), np.float32)}, np.asarray(kept),
            f"prompts, {len(docs) - len(kept)} longer than the context leaves")

  def sequence_length(self, examples):
    return examples["prompt"].shape[-1] + self.cfg.task.max_new_tokens

  def evaluate(self, run, context: Context, options) -> dict:
    """What llm.evaluate prints for an RL run: its greedy answers to the held-out prompts (of
    its own records, or options.data_path's split the same way), scored by its rewards."""
    data, _ = self.data_for(run.model, context, options.data_path)
    result = data.rollout.score_answers(run.params)
    splits.print_metrics("eval", result)
    return {"eval": result}

  @property
  def sequences(self) -> int:  # completions per prompt: what a step's tokens count
    return self.cfg.task.num_generations

  def data(self, docs, model, context: Context) -> TaskData:
    """Batches of prompts, completed by `rollout` on the mesh as each step starts; the held-out
    prompts are answered by `evaluate`."""
    data = super().data(docs, model, context)
    rollouts = Rollouts(self.cfg, self.algorithm, model, context, [dict(r) for r in docs],
                        held_out=data.splits.get("eval", np.zeros(0, int)))
    data.evals = {}  # evaluated by sampling, not by the objective on fixed batches
    data.rollout, data.evaluate = rollouts, rollouts.evaluate
    data.updates_per_batch = self.cfg.task.updates_per_rollout
    data.summary += (f"; {self.sequences} completions of up to {self.cfg.task.max_new_tokens} "
                     "tokens per prompt each step")
    return data


@register
class ReinforceLeaveOneOut(PolicyOptimization):
  kind = algorithm = "rloo"


class Rollouts:
  """Turns a batch of prompts into a batch the train step reads: completions sampled by the
  current policy, their rewards and advantages, and the sampling policy's and the reference's
  log-probabilities of every completion token."""

  def __init__(self, cfg, algorithm: str, model, context: Context, records: list[dict],
               held_out):
    t = cfg.task
    self.cfg, self.algorithm, self.model, self.records = cfg, algorithm, model, records
    self.tokenizer = context.tokenizer
    self.stop_ids = prompts_lib.stop_ids(self.tokenizer)
    self.mesh = context.start.mesh
    self.rewards = Rewards(cfg, context.open_run)
    self.rewards.check(records, cfg.data.path or cfg.data.hf_name)
    self.group, self.n = t.num_generations, t.max_new_tokens
    self.assemble = lambda trainable, frozen: params_lib.assemble(cfg, trainable, frozen)
    # The init_from weights (without LoRA: its reference is the base, adapters off), read
    # before the loop: on several hosts, moving them onto the mesh once the preemption service
    # is watching the loop hangs in the collective (jax 0.10.2, gloo).
    self.reference = None if cfg.lora.rank else context.start.params(model)
    self.held_out = held_out  # record rows
    self._sample, self._assemble = jax.jit(self._sample_fn), jax.jit(self.assemble)
    self._greedy = jax.jit(lambda params, prompt, valid: self._complete(
        params, prompt, valid, jax.random.PRNGKey(0), 0.0))
    self._sampled = jax.jit(lambda params, prompt, valid: self._complete(  # best-of-n's
        params, prompt, valid, jax.random.PRNGKey(cfg.seed), float(t.temperature)))

  def _reference(self, trainable, frozen, reference):
    if reference is not None:
      return reference
    off = jax.tree.map(jnp.zeros_like, trainable)  # LoRA's adapters off: the base model
    return self.assemble(off, frozen)

  def _complete(self, params, prompt_RxP, valid_RxP, rng, temperature: float):
    """(new tokens [R, N], the completion mask of the whole sequences [R, P + N])."""
    new_RxN = sampling.generate_tokens(
        self.model, params, prompt_RxP, valid_RxP, rng, self.stop_ids,
        max_new_tokens=self.n, temperature=temperature, top_k=0,
        top_p=float(self.cfg.task.top_p), use_cache=True, num_tokens=self.tokenizer.vocab_size)
    return new_RxN, jnp.concatenate([jnp.zeros(prompt_RxP.shape, jnp.float32),
                                     completion_mask(new_RxN, self.stop_ids)], axis=1)

  def _sample_fn(self, trainable, frozen, reference, prompt_RxP, valid_RxP, rng):
    params = self.assemble(trainable, frozen)
    new_RxN, mask_RxT = self._complete(params, prompt_RxP, valid_RxP, rng,
                                       float(self.cfg.task.temperature))
    tokens_RxT = jnp.concatenate([prompt_RxP, new_RxN], axis=1)
    valid_RxT = jnp.concatenate([valid_RxP, jnp.ones(new_RxN.shape, bool)], axis=1)
    positions_RxT = jnp.maximum(jnp.cumsum(valid_RxT, axis=1) - 1, 0)
    logps = lambda p: token_logps(self.model, p, tokens_RxT, positions_RxT, valid_RxT,
                                  float(self.cfg.task.temperature), float(self.cfg.task.top_p))
    return (new_RxN, tokens_RxT, positions_RxT, valid_RxT, mask_RxT, logps(params),
            logps(self._reference(trainable, frozen, reference)))

  def _texts(self, new_RxN, mask_RxT) -> list[str]:
    """The completions' text (host arrays: _gather's)."""
    lengths = mask_RxT[:, -self.n:].sum(1).astype(int)
    return [self.tokenizer.decode([i for i in row[:k] if i not in self.stop_ids])
            for row, k in zip(new_RxN, lengths)]

  def __call__(self, trainable, frozen, batch: dict, step: int) -> tuple[dict, dict]:
    """(the train step's batch, [grad_accum, micro × group, ...] on the mesh; the rewards'
    means) for a placed batch of prompts [grad_accum, micro, ...]."""
    started = time.perf_counter()
    A, m = batch["prompt"].shape[:2]
    flat = lambda x: jnp.repeat(x.reshape(A * m, *x.shape[2:]), self.group, axis=0)
    rng = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), step)
    with sharding.activate(self.mesh, self.cfg.mesh):
      new, tokens, positions, valid, mask, old, ref = self._sample(
          trainable, frozen, self.reference, flat(batch["prompt"]), flat(batch["prompt_valid"]),
          rng)
    rows = np.repeat(np.asarray(_gather(batch["record"])).reshape(-1), self.group)
    records = [self.records[i] for i in rows]
    new_host, mask_host = np.asarray(_gather(new)), np.asarray(_gather(mask))  # once a step
    completions = self._texts(new_host, mask_host)
    rewards, means = self.rewards([prompts_lib.prompt_text(r, self.tokenizer) for r in records],
                                  completions, records)
    adv = advantages(rewards, self.group, self.algorithm, self.cfg.task.scale_rewards)
    no_signal = np.repeat(np.ptp(rewards.reshape(-1, self.group), axis=1) == 0, self.group)
    host = {"advantages": adv, "rewards": rewards, "no_signal": no_signal,
            "weights": np.ones_like(rewards)}
    shape = lambda x: x.reshape(A, m * self.group, *x.shape[1:])
    out = {k: shape(v) for k, v in dict(tokens=tokens, positions=positions, valid=valid,
                                        mask=mask, old_logps=old, ref_logps=ref).items()}
    mine = _process_share(m * self.group)
    out.update(sharding.global_batch({k: shape(v.astype(np.float32))[:, mine]
                                      for k, v in host.items()}, self.mesh, batch_dim=1))
    seconds = time.perf_counter() - started  # sampling and scoring: the host waited for both
    return out, {**means, "sampling_seconds": seconds,
                 "sampled_tokens_per_sec": float(mask_host.sum()) / seconds}

  def evaluate(self, trainable, frozen) -> dict:
    """Greedy completions to the held-out prompts, scored by the rewards."""
    return self.score_answers(self._assemble(trainable, frozen))

  def score_answers(self, params) -> dict:
    """The model's (`params`: assembled) answers to the held-out prompts, scored: greedy ones
    (`reward`, and each function's), and the best of task.num_generations samples
    (`best_of_n_reward`, what picking by the rewards at inference would reach)."""
    if not len(self.held_out):
      return {}
    records = [self.records[i] for i in self.held_out]
    texts = [prompts_lib.prompt_text(r, self.tokenizer) for r in records]
    ids = prompts_lib.encode_prompts(self.tokenizer, texts)
    prompt, valid = tokenizer_lib.pad(ids, max(map(len, ids)), self.tokenizer.eot_id, left=True)
    with sharding.activate(self.mesh, self.cfg.mesh):
      greedy = self._greedy(params, prompt, valid)
      sampled = self._sampled(params, np.repeat(prompt, self.group, axis=0),
                              np.repeat(valid, self.group, axis=0))
    new, mask = (np.asarray(_gather(x)) for x in greedy)
    rewards, means = self.rewards(texts, self._texts(new, mask), records)
    repeated = lambda items: [x for x in items for _ in range(self.group)]
    samples = self._texts(*(np.asarray(_gather(x)) for x in sampled))
    best, _ = self.rewards(repeated(texts), samples, repeated(records))
    return {"reward": float(rewards.mean()), **means,
            "best_of_n_reward": float(best.reshape(-1, self.group).max(1).mean()),
            "completion_length": float(mask.sum() / len(records))}


def completion_mask(new_RxN, stop_ids):
  """1 on a completion's tokens up to and with its first stop token (end-of-text, end of
  turn: an id or a list), 0 after it."""
  eot_RxN = jnp.isin(new_RxN, jnp.atleast_1d(jnp.asarray(stop_ids))).astype(jnp.int32)
  return (jnp.cumsum(eot_RxN, axis=1) - eot_RxN == 0).astype(jnp.float32)


def _gather(x):
  """A global array's values on every process."""
  return multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x


def _process_share(rows: int) -> slice:
  """This process's rows of a global batch's row axis (processes hold contiguous shares)."""
  share = rows // jax.process_count()
  return slice(jax.process_index() * share, (jax.process_index() + 1) * share)


# ---------------------------------------------------------------------------------------------
# The objective


# The normalisations of the policy-gradient loss (the per-token loss l summed over completion
# tokens t of sequences i; |o_i| a completion's length, G·B sequences, N = task.max_new_tokens):
NORMALIZATIONS = {
    "token": "Σ l / Σ|o_i|: every completion token weighs the same (DAPO)",
    "sequence": "mean over sequences of Σ_t l / |o_i| (GRPO as published)",
    "constant": "Σ l / (G·B·N): no length bias either way (Dr. GRPO)",
}


def token_logps(model, params, tokens_MxT, positions_MxT, valid_MxT, temperature: float = 1.0,
                top_p: float = 1.0, with_logits=False):
  """log π(token t + 1 | the tokens up to t), [M, T - 1], under the distribution that sampled
  it: the logits over `temperature`, renormalised over the top-`top_p` nucleus (and those
  logits). A token outside the nucleus (after updates moved it) gets the same formula, finite,
  so that ratios and the KL stay defined; the nucleus is a constant of the gradient."""
  logits_MxLxV = model.apply({"params": params}, tokens_MxT[:, :-1], positions_MxT[:, :-1],
                             valid_MxT[:, :-1]) / temperature
  logps_MxL = -optax.softmax_cross_entropy_with_integer_labels(logits_MxLxV, tokens_MxT[:, 1:])
  if top_p < 1.0:
    kept_MxLxV = jax.lax.stop_gradient(sampling.nucleus(logits_MxLxV, top_p))
    log_z_MxL = jax.nn.logsumexp(jnp.where(kept_MxLxV, logits_MxLxV, -jnp.inf), axis=-1)
    logps_MxL += jax.nn.logsumexp(logits_MxLxV, axis=-1) - log_z_MxL  # over the nucleus only
  return (logps_MxL, logits_MxLxV) if with_logits else logps_MxL


def policy_gradient(model, clip_low: float, clip_high: float, kl_coef: float,
                    normalize: str, max_new_tokens: int, temperature: float = 1.0,
                    top_p: float = 1.0, kl_ratio: bool = True) -> objectives.Objective:
  """PPO's clipped surrogate on sampled completions, with a KL penalty to a reference: per
  completion token, l = -min(ρ A, clip(ρ, 1 - clip_low, 1 + clip_high) A) + kl_coef · ρ · k3,
  where ρ = π(token) / π_old(token), π_old the policy that sampled (log-probabilities in the
  batch, `old_logps`), A the completion's advantage, and k3 = π_ref/π - log(π_ref/π) - 1
  (Schulman's unbiased, positive KL estimator; the reference's log-probabilities `ref_logps`).
  The ρ on k3 (`kl_ratio`; TRL's default since its use_bias_correction_kl) changes the penalty's
  gradient, not its value at ρ = 1: k3's own gradient, (1 - π_ref/π) ∇log π, is not reverse
  KL's, and ρ · k3's is, (log π - log π_ref) ∇log π; without it the penalty holds the policy
  back less (tests/test_trl.py measures both against TRL). With one update per rollout ρ = 1
  and the surrogate's gradient is REINFORCE's with the advantage's baseline.
  Every π is the sampling distribution (`temperature`, `top_p`: see token_logps), as in TRL, so
  that π_old is the policy that sampled. `normalize`: see NORMALIZATIONS."""

  def loss(params, batch, dropout_rng, train):
    logps_MxL, logits_MxLxV = token_logps(model, params, batch["tokens"], batch["positions"],
                                          batch["valid"], temperature, top_p, with_logits=True)
    mask_MxL = batch["mask"][:, 1:]  # the token at t + 1 is predicted at t
    ratio_MxL = jnp.exp(logps_MxL - batch["old_logps"])
    advantage_Mx1 = batch["advantages"][:, None]
    clipped_MxL = jnp.clip(ratio_MxL, 1.0 - clip_low, 1.0 + clip_high)
    surrogate_MxL = jnp.minimum(ratio_MxL * advantage_Mx1, clipped_MxL * advantage_Mx1)
    log_ref_ratio_MxL = batch["ref_logps"] - logps_MxL
    kl_MxL = jnp.exp(log_ref_ratio_MxL) - log_ref_ratio_MxL - 1.0
    penalty_MxL = kl_MxL * ratio_MxL if kl_ratio else kl_MxL
    per_token_MxL = (-surrogate_MxL + kl_coef * penalty_MxL) * mask_MxL
    lengths_M = jnp.sum(mask_MxL, axis=-1)
    if normalize == "sequence":
      loss_sum = jnp.sum(jnp.sum(per_token_MxL, -1) / jnp.maximum(lengths_M, 1.0))
    elif normalize == "constant":
      loss_sum = jnp.sum(per_token_MxL) / max_new_tokens
    else:
      loss_sum = jnp.sum(per_token_MxL)
    probs_MxLxV = jax.nn.softmax(logits_MxLxV)
    entropy_MxL = -jnp.sum(probs_MxLxV * jax.nn.log_softmax(logits_MxLxV), axis=-1)
    w_M = batch["weights"]
    was_clipped = (ratio_MxL * advantage_Mx1 != surrogate_MxL)
    return {"loss": loss_sum, "tokens": jnp.sum(mask_MxL), "sequences": jnp.sum(w_M),
            "kl": jnp.sum(kl_MxL * mask_MxL), "clipped": jnp.sum(was_clipped * mask_MxL),
            "entropy": jnp.sum(entropy_MxL * mask_MxL),
            "reward": jnp.sum(batch["rewards"] * w_M),
            "reward_sq": jnp.sum(batch["rewards"] ** 2 * w_M),
            "no_signal": jnp.sum(batch["no_signal"] * w_M)}

  def summarize(sums):
    per = lambda key, by: float(sums[key]) / max(float(sums[by]), 1.0)
    mean = per("reward", "sequences")
    return {"loss": per("loss", "tokens" if normalize == "token" else "sequences"),
            "reward": mean, "reward_std": math.sqrt(max(per("reward_sq", "sequences") - mean ** 2,
                                                        0.0)),
            "kl": per("kl", "tokens"), "clip_fraction": per("clipped", "tokens"),
            "entropy": per("entropy", "tokens"),
            "completion_length": per("tokens", "sequences"),
            "no_signal_groups": per("no_signal", "sequences")}

  weights = "mask" if normalize == "token" else "weights"
  return objectives.Objective(loss, summarize, terms=(("loss", weights, 1.0),))
