"""Packing (llm/data/packing.py): packed records give the losses and gradients they give alone,
for SFT, reward models and DPO, and no record attends to its neighbour."""

import jax
import numpy as np
import pytest

from llm import config as config_lib
from llm import model as model_lib
from llm.data import packing
from llm.tasks import instruct, preference
from llm.training import objectives
from test_finetune import CharTokenizer


def test_best_fit_decreasing_fills_the_fullest_bin_that_fits():
  lengths = [5, 4, 3, 3, 1, 8, 2]
  bins = packing.best_fit_decreasing(lengths, 8)
  assert sorted(i for b in bins for i in b) == list(range(7))
  assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
  assert bins == [[5], [0, 2], [1, 3, 4], [6]]  # 8 | 5+3 | 4+3+1 | 2
  with pytest.raises(ValueError):
    packing.best_fit_decreasing([9], 8)


def tiny_model(num_classes=None):
  cfg = config_lib.base_config().model
  cfg.update(num_layers=2, num_heads=2, d_model=32, d_ff=64, max_len=512)
  return model_lib.build(cfg, 256, num_classes=num_classes)


RECORDS = [{"instruction": "a" * n, "input": "", "output": "xyz"[:1 + n % 3],
            "chosen": "yes" * (1 + n % 2), "rejected": "no"}
           for n in (3, 40, 9, 17, 1, 25)]


def _grads_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=2e-4)


def test_packed_sft_equals_padded_record_by_record():
  examples, _ = instruct.instruction_examples(RECORDS, CharTokenizer(), 1000)
  lengths = examples.pop("lengths")
  packed = packing.pack_lm({**examples}, lengths, 255, length=400)
  assert len(packed["inputs"]) < len(RECORDS)
  assert packed["weights"].sum() == examples["weights"].sum()
  model = tiny_model()
  params = model.init(jax.random.PRNGKey(0), examples["inputs"][:1])["params"]
  loss = objectives.causal_lm(model).loss
  loss_and_grad = jax.jit(jax.value_and_grad(lambda p, b: loss(p, b, None, False)["loss"]))
  padded_sums, padded_grads = loss_and_grad(params, examples)
  packed_sums, packed_grads = loss_and_grad(params, packed)
  np.testing.assert_allclose(float(packed_sums), float(padded_sums), rtol=1e-5)
  _grads_close(packed_grads, padded_grads)

  # Record by record: the per-token losses of each record, where packing put it.
  kwargs = dict(documents_BxL=packed["documents"], positions_BxL=packed["positions"])
  ce = lambda logits, targets: -np.take_along_axis(
      np.asarray(jax.nn.log_softmax(logits)), targets[..., None], -1)[..., 0]
  alone = ce(model.apply({"params": params}, examples["inputs"]), examples["targets"])
  together = ce(model.apply({"params": params}, packed["inputs"], **kwargs), packed["targets"])
  bins = packing.best_fit_decreasing([int(n) for n in lengths], 400)
  for r, b in enumerate(bins):
    at = 0
    for i in b:
      n = int(lengths[i])
      np.testing.assert_allclose(together[r, at:at + n], alone[i, :n], atol=1e-5)
      at += n

  # A record's logits do not change when its neighbour does.
  changed = packed["inputs"].copy()
  first = packed["documents"] == 0
  changed[first] = (changed[first] + 7) % 250
  before = np.asarray(model.apply({"params": params}, packed["inputs"], **kwargs))
  after = np.asarray(model.apply({"params": params}, changed, **kwargs))
  later = packed["documents"] > 0
  np.testing.assert_allclose(after[later], before[later], atol=1e-6)
  assert not np.allclose(after[first], before[first])


@pytest.mark.parametrize("kind", ["reward", "dpo"])
def test_packed_pairs_equal_padded_pairs(kind):
  examples, _ = preference.preference_examples(RECORDS, CharTokenizer(), 1000)
  lengths = examples.pop("lengths")
  model = tiny_model(num_classes=1 if kind == "reward" else None)
  params = model.init(jax.random.PRNGKey(1), examples["tokens"][:1, 0])["params"]
  if kind == "dpo":
    examples["reference"] = np.random.default_rng(0).normal(-40, 5, (len(RECORDS), 2))
    objective = preference.dpo(model, beta=0.1, average=False)
  else:
    objective = preference.reward(model)
  packed = packing.pack_pairs(examples, lengths, length=800)
  assert len(packed["tokens"]) < len(RECORDS) and packed["weights"].sum() == len(RECORDS)
  results = {}
  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda p, b: objective.loss(p, b, None, False)["loss"]))
  for name, batch in (("padded", examples), ("packed", packed)):
    results[name] = loss_and_grad(params, batch)
    sums = jax.jit(lambda p, b: objective.loss(p, b, None, False))(params, batch)
    results[name + "_sums"] = {k: float(v) for k, v in sums.items()}
  for key in ("loss", "correct", "margin", "chosen", "rejected", "weight"):
    assert results["packed_sums"][key] == pytest.approx(results["padded_sums"][key], rel=1e-5,
                                                        abs=1e-5), key
  _grads_close(results["packed"][1], results["padded"][1])
  if kind == "dpo":  # each pair's log-probabilities, also averaged
    for average in (False, True):
      logps = jax.jit(lambda p, b: preference.sequence_logps(model, p, b, average))
      alone, together = (np.asarray(logps(params, b)) for b in (examples, packed))
      bins = packing.best_fit_decreasing([int(a + b) for a, b in lengths],
                                         packed["tokens"].shape[-1])
      for r, b in enumerate(bins):
        np.testing.assert_allclose(together[r, :len(b)], alone[b], rtol=1e-5)
