"""The GRPO objective against TRL's GRPOTrainer (trl, a test dependency like transformers): on
one fixed batch without padding, the loss, the KL to the reference and every parameter's
gradient equal TRL's, for each of the three normalisations, with and without the ratio on the
KL penalty (TRL's use_bias_correction_kl, our task.kl_ratio), at a temperature other than 1.

Without the ratio the KL penalty's gradient is (1 - π_ref/π) ∇log π rather than reverse KL's
(log π - log π_ref) ∇log π: the loss and the KL are the same numbers and, between these two
unrelated random models, the gradients differ by more than 2x on the final norm's bias."""

import numpy as np
import pytest

import jax
import torch  # test dependencies (requirements-test.txt), like trl
import transformers

from llm import convert
from llm.model import layers
from llm.runs import hf_weights, loading
from llm.tasks import rl
from test_convert import save_hf_gpt2

# Ours -> TRL's loss_type: the same normalisation of the per-token loss (see rl.NORMALIZATIONS).
LOSS_TYPES = {"token": "bnpo", "sequence": "grpo", "constant": "dr_grpo"}
SHAPE = dict(n_layer=2, n_head=2, n_embd=32, n_positions=32)
P, N, TEMPERATURE, BETA = 5, 7, 0.7, 0.04


@pytest.fixture(scope="module")
def models(tmp_path_factory, test_data):
  """(the policy's transformers folder, the same as our run, the reference's transformers
  model): small random GPT-2s with the GPT-2 tokenizer."""
  tmp = tmp_path_factory.mktemp("trl")
  save_hf_gpt2(tmp / "policy", test_data, seed=1, init=0.2, **SHAPE)
  reference = save_hf_gpt2(tmp / "reference", test_data, seed=2, init=0.2, **SHAPE)
  convert.from_hf(str(tmp / "policy"), str(tmp / "run"))
  return tmp / "policy", loading.load(str(tmp / "run")), reference


def _batch(rng):
  """Two prompts of P tokens, two completions each of up to N tokens (two stopped early)."""
  prompt = np.repeat(rng.integers(0, 50257, (2, P)), 2, axis=0)
  completion = rng.integers(0, 50257, (4, N))
  completion_mask = np.ones((4, N), np.int64)
  completion_mask[1, 4:] = 0
  completion_mask[2, 2:] = 0
  advantages = np.array([0.9, -0.9, -0.4, 0.4])
  return prompt, completion, completion_mask, advantages


def _trl_trainer(policy_dir, loss_type, kl_ratio, tmp_path):
  from datasets import Dataset
  from trl import GRPOConfig, GRPOTrainer
  args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4,
                    num_generations=2, max_completion_length=N, beta=BETA, epsilon=0.2,
                    loss_type=loss_type, temperature=TEMPERATURE, report_to=[], use_cpu=True,
                    logging_steps=1, bf16=False, gradient_checkpointing=False,
                    use_bias_correction_kl=kl_ratio)
  return GRPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(policy_dir),
                     reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                     args=args, train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}),
                     processing_class=transformers.AutoTokenizer.from_pretrained(policy_dir))


def _token_logps(model, ids, attention_mask):
  """log π(token) of the completion tokens at TEMPERATURE, by torch from the model's logits."""
  with torch.no_grad():
    logits = model(torch.tensor(ids), attention_mask=torch.tensor(attention_mask)).logits
  logps = torch.log_softmax(logits[:, :-1] / TEMPERATURE, -1)
  return torch.gather(logps, -1, torch.tensor(ids[:, 1:, None]))[..., 0][:, -N:]


@pytest.mark.parametrize("kl_ratio", [True, False])
@pytest.mark.parametrize("normalize", list(LOSS_TYPES))
def test_loss_kl_and_gradient_equal_trl_grpo_trainer(models, normalize, kl_ratio, tmp_path):
  policy_dir, run, reference = models
  prompt, completion, completion_mask, advantages = _batch(np.random.default_rng(0))
  ids = np.concatenate([prompt, completion], axis=1)
  attention = np.concatenate([np.ones_like(prompt), completion_mask], axis=1)
  ref_logps = _token_logps(reference.eval(), ids, attention)

  trainer = _trl_trainer(policy_dir, LOSS_TYPES[normalize], kl_ratio, tmp_path)
  trainer.model.eval()  # no dropout; the loss of one batch, not divided by accumulation
  inputs = {"prompt_ids": torch.tensor(prompt), "prompt_mask": torch.ones(prompt.shape),
            "completion_ids": torch.tensor(completion),
            "completion_mask": torch.tensor(completion_mask, dtype=torch.float32),
            "advantages": torch.tensor(advantages, dtype=torch.float32),
            "ref_per_token_logps": ref_logps, "old_per_token_logps": None,
            "num_items_in_batch": torch.tensor(float(completion_mask.sum()))}
  trl_loss = trainer._compute_loss(trainer.model, inputs)
  trl_loss.backward()
  trl_kl = trainer._metrics["eval"]["kl"][-1]
  trl_grads = {name: p.grad.numpy() for name, p in trainer.model.named_parameters()}

  T = P + N
  mask = np.concatenate([np.zeros(prompt.shape), completion_mask], axis=1).astype(np.float32)
  positions = np.tile(np.arange(T, dtype=np.int32), (4, 1))
  valid = np.ones((4, T), bool)
  ours = np.asarray(rl.token_logps(run.model, run.params, ids, positions, valid, TEMPERATURE))
  batch = {"tokens": ids.astype(np.int32), "positions": positions, "valid": valid, "mask": mask,
           "old_logps": ours,
           "ref_logps": np.pad(ref_logps.numpy(), ((0, 0), (P - 1, 0))).astype(np.float32),
           "advantages": advantages.astype(np.float32), "rewards": np.zeros(4, np.float32),
           "no_signal": np.zeros(4, np.float32), "weights": np.ones(4, np.float32)}
  objective = rl.policy_gradient(run.model, 0.2, 0.2, BETA, normalize, N, TEMPERATURE,
                                 kl_ratio=kl_ratio)
  total = lambda p: objective.total(objective.loss(p, batch, None, False),
                                    objective.counts(batch))
  loss, grads = jax.value_and_grad(total)(run.params)
  kl = objective.summarize(objective.loss(run.params, batch, None, False))["kl"]

  assert float(loss) == pytest.approx(trl_loss.item(), rel=1e-4, abs=1e-6)
  assert kl == pytest.approx(trl_kl, rel=1e-4)
  _, ours_as_hf = hf_weights.to_hf(run.cfg.model, run.model.cfg,
                                   layers.to_layout(grads, scanned=False), run.tokenizer)
  compared = 0
  for name, grad in trl_grads.items():
    key = name.removeprefix("transformer.") if name.removeprefix("transformer.") in ours_as_hf \
        else name
    if key in ours_as_hf:
      np.testing.assert_allclose(ours_as_hf[key], grad, atol=2e-6 + 1e-3 * np.abs(grad).max(),
                                 err_msg=name)
      compared += 1
  assert compared >= len(trl_grads) - 1  # every tensor (the tied head is the embedding)
