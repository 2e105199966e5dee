"""Optimizers, schedules, parameter averaging and precision (llm/training/optim.py): each optimizer's
updates against optax's reference transformation, Muon's routing by axis names, schedule values,
EMA by hand, bfloat16 parameters, z-loss; profiles and Weights & Biases files."""

import math
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from optax import contrib

from conftest import ROOT, read_metrics, tiny_config
from llm import config as config_lib
from llm import model as model_lib
from llm.runs import rundir
from llm.training import optim, params as params_lib


def train_cfg(**changes):
  """train.* with a constant learning rate, no warmup, decay or clipping: the bare update."""
  values = {"lr": 0.01, "min_lr": 0.01, "warmup_steps": 0, "schedule": "constant",
            "weight_decay": 0.0, "grad_clip": 0.0, **changes}
  return config_lib.replace(config_lib.base_config(),
                            {f"train.{k}": v for k, v in values.items()}).train


def boxed_tree():
  """A small named tree: a block's matrices (one over 128 wide, which Adafactor factors), a
  bias, a norm and an embedding."""
  rng = np.random.default_rng(0)
  box = lambda shape, names: nn.LogicallyPartitioned(
      jnp.asarray(rng.normal(size=shape), jnp.float32), names)
  return {"block_0": {"mlp": {"wi": {"kernel": box((16, 130), ("embed", "mlp")),
                                     "bias": box((130,), ("mlp",))},
                              "wo": {"kernel": box((130, 16), ("mlp", "embed"))}},
                      "attn": {"query": {"kernel": box((16, 2, 8), ("embed", "heads", "kv"))}},
                      "ln": {"scale": box((16,), ("embed",))}},
          "wte": {"embedding": box((50, 16), ("vocab", "embed"))}}


def updates_of(tx, params, steps=3):
  """The updates of `steps` steps on fixed pseudo-gradients."""
  state, out = tx.init(params), []
  for i in range(steps):
    grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1)), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out, state, params


def muon_reference(tr, params):
  dims = {"block_0": {"mlp": {"wi": {"kernel": contrib.MuonDimensionNumbers(0, 1), "bias": None},
                              "wo": {"kernel": contrib.MuonDimensionNumbers(0, 1)}},
                      "attn": {"query": {"kernel": contrib.MuonDimensionNumbers((0,), (1, 2))}},
                      "ln": {"scale": None}},
          "wte": {"embedding": None}}
  return contrib.muon(tr.muon_lr, beta=tr.muon_beta, eps=tr.eps, adam_b1=tr.b1, adam_b2=tr.b2,
                      adam_learning_rate=tr.lr, muon_weight_dimension_numbers=dims)


REFERENCES = {
    "adamw": lambda tr, p: optax.adamw(tr.lr, b1=tr.b1, b2=tr.b2, eps=tr.eps,
                                       weight_decay=tr.weight_decay, mask=optim.decay_mask),
    "lion": lambda tr, p: optax.lion(tr.lr, b1=tr.b1, b2=tr.b2, weight_decay=tr.weight_decay,
                                     mask=optim.decay_mask),
    "adafactor": lambda tr, p: optax.adafactor(tr.lr, multiply_by_parameter_scale=False),
    "sgd": lambda tr, p: optax.sgd(tr.lr, momentum=tr.momentum, nesterov=tr.nesterov),
    "schedule_free": lambda tr, p: contrib.schedule_free_adamw(tr.lr, b1=tr.b1, b2=tr.b2,
                                                               eps=tr.eps),
    "muon": muon_reference,
}
DECAYS = {"adamw": 0.1, "lion": 0.1}  # the references that take a decay mask


@pytest.mark.parametrize("name", list(REFERENCES))
def test_each_optimizer_equals_its_optax_reference(name):
  tr = train_cfg(optimizer=name, weight_decay=DECAYS.get(name, 0.0), nesterov=True)
  boxed = boxed_tree()
  params = params_lib.values(boxed)
  ours, state, ours_params = updates_of(optim.build(tr, boxed), params)
  theirs, their_state, _ = updates_of(REFERENCES[name](tr, params), params)
  if name == "muon":  # optax's muon takes NAdam for the rest: those are checked against AdamW
    adamw, _, _ = updates_of(REFERENCES["adamw"](tr, params), params)
    is_muon = lambda path: path.startswith("block_0") and path.endswith("kernel")
    theirs = [traverse_util.unflatten_dict({
        p: (m if is_muon(p) else a) for (p, m), a in zip(
            traverse_util.flatten_dict(mu, sep="/").items(),
            traverse_util.flatten_dict(ad, sep="/").values())}, sep="/")
        for mu, ad in zip(theirs, adamw)]
  for a, b in zip(ours, theirs):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(ours[-1]))
  if name == "schedule_free":  # evaluated at its averaged point, not where gradients are taken
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6),
                 optim.evaluation_params(tr, ours_params, state),
                 contrib.schedule_free_eval_params(their_state, ours_params))


def test_adamw_is_optax_adamw_bit_for_bit_and_a_skipped_step_moves_nothing():
  # The train step's AdamW (clipping, the schedule, decay on matrices, the skip wrapper) equals
  # optax's chain exactly, jitted, in its state too (so old checkpoints restore). With
  # apply=False nothing moves.
  tr = train_cfg(weight_decay=0.1, grad_clip=1.0, schedule="cosine", warmup_steps=2, min_lr=0.0)
  boxed = boxed_tree()
  params = params_lib.values(boxed)
  reference = optax.chain(optax.clip_by_global_norm(tr.grad_clip), optax.adamw(
      optim.lr_schedule(tr), b1=tr.b1, b2=tr.b2, eps=tr.eps, weight_decay=tr.weight_decay,
      mask=optim.decay_mask))

  def run(tx, steps=4, apply_at=lambda i: True):
    state, p, update = tx.init(params), params, jax.jit(tx.update)
    for i in range(steps):
      grads = jax.tree.map(lambda x: jnp.sin(x * (i + 1)) * 3, p)  # norms over 1: clipped
      kwargs = {} if tx is reference else {"apply": apply_at(i)}
      updates, state = update(grads, state, p, **kwargs)
      p = optax.apply_updates(p, updates)
    return p, state, updates

  ours, theirs = run(optim.build(tr, boxed)), run(reference)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(a, b)
  assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(ours[2]))
  *skipped, skipped_updates = run(optim.build(tr, boxed), apply_at=lambda i: i < 3)
  *three_steps, _ = run(optim.build(tr, boxed), steps=3)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(skipped_updates))
  for a, b in zip(jax.tree.leaves(skipped), jax.tree.leaves(three_steps)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_optimizers_equal_optax_under_the_default_xla_flags():
  # The suite compiles without XLA's LLVM optimisations (conftest.py); users run with the
  # defaults. The same comparisons, in a process that keeps XLA's defaults.
  env = {**os.environ, "LLM_TESTS_DEFAULT_XLA": "1", "XLA_FLAGS": "",
         "JAX_COMPILATION_CACHE_DIR": ""}
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
       "-o", "addopts=", os.path.abspath(__file__), "-k",
       "equals_its_optax_reference or optax_adamw_bit_for_bit"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
  assert "7 passed" in result.stdout, result.stdout[-2000:]


def test_optimizer_state_in_bfloat16_stays_close_to_float32():
  boxed = boxed_tree()
  params = params_lib.values(boxed)
  full, _, _ = updates_of(optim.build(train_cfg(), boxed), params)
  half, state, _ = updates_of(optim.build(train_cfg(opt_state_dtype="bfloat16"), boxed), params)
  adam = next(s for s in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(s))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(adam.mu))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(adam.nu))  # see optim.in_dtype
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0.05, atol=1e-4), half[-1],
               full[-1])


is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)


def test_bfloat16_state_keeps_the_second_moment_of_b2_0_999_moving():
  """1,000 steps of one gradient then zeros: ν decays as 0.999^t in float32 state; bfloat16
  would round 0.999·ν back to ν and leave it at its first value."""
  params = {"w": jnp.ones((4, 4))}
  cfg = lambda dtype: train_cfg(opt_state_dtype=dtype, b2=0.999, grad_clip=0.0,
                                weight_decay=0.0)
  nus = {}
  for dtype in ("float32", "bfloat16"):
    tx = optim.build(cfg(dtype))
    state, update = tx.init(params), jax.jit(tx.update)
    for step in range(1000):
      _, state = update({"w": jnp.full((4, 4), 1.0 if step == 0 else 0.0)}, state, params)
    nus[dtype] = next(s for s in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(s)).nu["w"]
  expected = (1 - 0.999) * 0.999 ** 999  # by hand
  np.testing.assert_allclose(nus["float32"], expected, rtol=1e-4)
  np.testing.assert_allclose(nus["bfloat16"], nus["float32"], rtol=1e-6)


def muon_paths(overrides, scan: bool, lora_rank: int = 0, num_classes: int = 0):
  cfg = tiny_config(pathlib.Path("unused"), **{"model.scan_layers": scan, "lora.rank": lora_rank,
                                               **overrides})
  model = model_lib.build(cfg.model, 64, num_classes)
  boxed = jax.eval_shape(lambda: params_lib.boxed(cfg, model, jax.random.PRNGKey(0)))
  trainable = params_lib.split(boxed, params_lib.is_trainable(cfg, cfg.model.num_layers))[0]
  routed = jax.tree.map(lambda box: optim.muon_dimensions(box.names), trainable,
                        is_leaf=lambda x: hasattr(x, "names"))
  flat = traverse_util.flatten_dict(routed, sep="/", is_leaf=lambda p, x: x is None or isinstance(
      x, contrib.MuonDimensionNumbers))
  return {p for p, d in flat.items() if d is not None}, set(flat)


LLAMA = {"model.positions": "rope", "model.norm": "rmsnorm", "model.mlp": "gated",
         "model.activation": "silu", "model.num_kv_heads": 1, "model.use_bias": False,
         "model.qkv_bias": True, "model.tie_embeddings": False}


@pytest.mark.parametrize("scan", [False, True])
def test_muon_takes_exactly_the_hidden_matrices(scan):
  blocks = ["blocks"] if scan else ["block_0", "block_1"]
  hidden = lambda names: {f"{b}/{n}/kernel" for b in blocks for n in names}
  attn = ["attn/query", "attn/key", "attn/value", "attn/out"]
  for overrides, mlp in (({}, ["mlp/wi", "mlp/wo"]), (LLAMA, ["mlp/wi", "mlp/wg", "mlp/wo"]),
                         ({"model.kind": "bert"}, ["mlp/wi", "mlp/wo"])):
    muon, everything = muon_paths(overrides, scan)
    expected = {p for p in everything if any(p.endswith(f"{n}/kernel") for n in attn + mlp)}
    assert muon == expected and len(muon) == len(hidden(attn + mlp)), overrides
    assert any("embedding" in p for p in everything - muon)  # embeddings, head, norms: AdamW
  # A task head and LoRA adapters (an unnamed axis each) are AdamW's.
  muon, everything = muon_paths({}, scan, num_classes=3)
  assert "head/kernel" in {p.removeprefix("backbone/") for p in everything - muon}
  muon, everything = muon_paths({}, scan, lora_rank=4)
  assert not muon and any(p.endswith("lora_a") for p in everything)


def test_schedules_at_warmup_end_mid_run_and_last_step():
  common = dict(lr=1.0, min_lr=0.1, warmup_steps=10, steps=110)
  value = lambda s, **kw: float(optim.lr_schedule(train_cfg(**{**common, **kw}))(s))
  for schedule in optim.SCHEDULES:
    assert value(5, schedule=schedule) == pytest.approx(0.5)
    assert value(10, schedule=schedule) == pytest.approx(1.0)
  assert value(60, schedule="cosine") == pytest.approx(0.1 + 0.9 * 0.5)
  assert value(110, schedule="cosine") == pytest.approx(0.1)
  assert value(60, schedule="linear") == pytest.approx(0.55)
  assert value(110, schedule="linear") == pytest.approx(0.1)
  assert value(60, schedule="constant") == value(110, schedule="constant") == 1.0
  # WSD: stable until the last 20% (22 steps), then down to min_lr.
  wsd = dict(schedule="wsd", decay_fraction=0.2)
  assert value(88, **wsd) == 1.0 and value(110, **wsd) == pytest.approx(0.1)
  assert value(99, **wsd) == pytest.approx(1.0 - 0.9 * 0.5)
  assert value(99, **wsd, decay_shape="1-sqrt") == pytest.approx(1.0 - 0.9 * math.sqrt(0.5))
  # Extended to 220 steps, step 99 is still stable: the run goes on from the stable phase.
  extended = dict(wsd, steps=220)
  assert value(99, **extended) == 1.0 and value(176, **extended) == 1.0
  assert value(220, **extended) == pytest.approx(0.1)


@pytest.mark.slow
def test_ema_precision_and_z_loss_through_a_run(tmp_path):
  """EMA by hand over the steps and after a resume; --use_ema evaluates the average; bfloat16
  parameters train with a float32 loss; z-loss adds log(Z)^2 to what is minimised."""
  from llm.runs import loading
  from llm.runs.trainer import train, Trainer
  cfg = tiny_config(tmp_path, **{"train.ema": 0.5, "model.param_dtype": "bfloat16",
                                 "train.z_loss": 1e-2, "train.steps": 2,
                                 "train.checkpoint_every": 1, "train.keep_checkpoints": 5})
  workdir = str(tmp_path / "run")
  train(cfg, workdir)
  train(config_lib.replace(cfg, {"train.steps": 4}), workdir)  # resumed
  import orbax.checkpoint as ocp
  state0 = Trainer(config_lib.replace(cfg, {"train.steps": 4}), workdir).init_state()[0]
  shapes = jax.eval_shape(lambda: state0)
  ckpt = rundir.checkpointer(workdir)
  saved = [state0] + [ckpt.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(shapes))).state for step in range(1, 5)]
  ckpt.close()
  expected = jax.tree.map(lambda p: p.astype(jnp.float32), saved[0]["params"])
  for state in saved[1:]:
    expected = jax.tree.map(lambda e, p: e * 0.5 + p.astype(jnp.float32) * 0.5, expected,
                            state["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state["ema"], expected)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(saved[-1]["params"]))
  assert saved[-1]["ema"]["wte"]["embedding"].dtype == jnp.float32

  lines = read_metrics(workdir)
  train_lines = [m for m in lines if m["split"] == "train"]
  assert train_lines[-1]["loss"] < train_lines[0]["loss"]  # bfloat16 parameters learn
  evals = [m for m in lines if m["split"] == "eval"]
  assert evals[-1]["z_loss"] == pytest.approx(
      train_lines[-1]["z_loss"], rel=0.1) and evals[-1]["z_loss"] > 0
  # The train loss is what is minimised: cross-entropy plus the z term.
  assert train_lines[-1]["loss"] > evals[-1]["loss"] - 0.5

  from llm.errors import UserError
  with pytest.raises(UserError, match="train.optimizer='lion', but the run being resumed"):
    rundir.resume_changes(workdir, config_lib.replace(cfg, {"train.optimizer": "lion"}))

  plain, averaged = loading.load(workdir), loading.load(workdir, use_ema=True)
  assert plain.params["wte"]["embedding"].dtype == jnp.bfloat16
  np.testing.assert_allclose(averaged.params["wte"]["embedding"],
                             expected["wte"]["embedding"].astype(jnp.bfloat16), rtol=1e-2)
  tokens = np.arange(16)[None] % 64
  logits = lambda run: np.asarray(run.model.apply({"params": run.params}, tokens))
  assert np.isfinite(logits(plain)).all() and logits(plain).dtype == np.float32
  assert np.abs(logits(plain) - logits(averaged)).max() > 1e-3


@pytest.mark.slow
def test_profile_and_offline_wandb_write_their_files(tmp_path):
  """In a process of its own: the profiler crashes in one where libtpu was loaded for an
  ahead-of-time TPU compile (test_tpu_compile.py may run in this worker)."""
  import subprocess
  import sys
  from conftest import ROOT
  workdir = tmp_path / "run"
  # Two steps, then resumed for a third with train.profile_steps=2:3: as a run preempted inside
  # its profiled range, it traces the steps it has left.
  script = ("import pathlib, sys; sys.path.insert(0, 'tests'); from conftest import tiny_config; "
            "from llm.runs.trainer import train; run = lambda steps, profile: train(tiny_config("
            "pathlib.Path(sys.argv[1]), **{'train.steps': steps, 'train.profile_steps': profile, "
            "'train.wandb_project': 'llm-tests', 'train.eval_every': 3, "
            "'train.checkpoint_every': 1}), sys.argv[2]); run(2, ''); run(3, '2:3')")
  result = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(workdir)], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="offline"),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "wrote a profile of steps 3-3" in result.stdout
  traces = [os.path.join(d, f) for d, _, fs in os.walk(workdir / "profile") for f in fs]
  assert any(t.endswith(".xplane.pb") and os.path.getsize(t) > 1000 for t in traces)
  runs_written = [d for d in os.listdir(workdir / "wandb") if d.startswith("offline-run-")]
  assert len(runs_written) == 2  # one per start
  assert any(f.endswith(".wandb") and os.path.getsize(workdir / "wandb" / runs_written[0] / f)
             for f in os.listdir(workdir / "wandb" / runs_written[0]))
  assert [m["step"] for m in read_metrics(str(workdir)) if m["split"] == "train"] == [1, 2, 3]


@pytest.mark.slow
def test_every_optimizer_resumes_bit_exactly_on_a_mesh(tmp_path):
  """Saved after two steps and restored, every optimizer's next two steps (state, EMA and all)
  equal the uninterrupted ones bit for bit on a 2x2x2 mesh whose fsdp axis shards the optimizer
  state like the parameters; AdamW's on one device too (the mesh's restore is the harder one:
  each optimizer once more on one device cost the suite 35 s)."""
  import json
  import subprocess
  import sys
  from conftest import ROOT
  out = tmp_path / "out.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "resume_runs.py"),
                           str(out), str(tmp_path), "adamw:1x1x1",
                           *(f"{name}:2x2x2" for name in optim.OPTIMIZERS)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(out.read_text())
  assert list(results["adamw"]) == ["1x1x1", "2x2x2"]
  for name in optim.OPTIMIZERS:
    for mesh, found in results[name].items():
      assert found["bit_exact"], (name, mesh)
      assert found["sharded_like_params"] and found["state_like_wte"] >= 1, (name, mesh, found)
    assert results[name]["2x2x2"]["wte_spec"] == "P('tensor', 'fsdp')"
