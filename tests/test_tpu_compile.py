"""The real train step compiled ahead of time for a TPU topology from this CPU machine (libtpu):
splash attention inside it, memory and FLOPs consistent with the model, the roofline's
arithmetic."""

import pytest

from conftest import tiny_config
from llm import bench, metrics

pytestmark = pytest.mark.xdist_group("tpu")


def _config(tmp_path, data, fsdp, tensor):
  return tiny_config(tmp_path, **{
      "model.max_len": 128, "model.num_heads": 4, "model.d_model": 64, "model.d_ff": 128,
      "model.attention_impl": "splash", "data.max_length": 128, "data.stride": 128,
      "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})


def test_the_train_step_with_splash_attention_compiles_for_a_v5e_slice(tmp_path):
  compiled, trainer, state, _ = bench.compile_for(_config(tmp_path, 2, 2, 1), "v5e:2x2")
  assert "tpu_custom_call" in compiled.as_text()  # the splash kernel, compiled by Mosaic
  report = bench.aot_report(compiled, trainer, state)
  assert report["device"] == "4 x TPU v5 lite" and report["fits"]
  assert report["params_gb"] > 0 and report["opt_state_gb"] > 0 and report["temp_gb"] > 0
  # XLA's FLOPs per token: the model's 6N + attention, within 10%.
  assert report["model_flops_over_xla"] == pytest.approx(1.0, abs=0.1)
  # The roofline by hand: the longer of compute at peak and bytes at bandwidth.
  peak, bandwidth = metrics.peak_flops("TPU v5 lite", 0), metrics.hbm_bandwidth("TPU v5 lite")
  seconds = max(report["xla_flops"] / peak, report["xla_gb_accessed"] * 1e9 / bandwidth)
  assert report["step_ms"] == pytest.approx(1e3 * seconds)
  throughput = trainer.throughput()
  assert report["mfu"] == pytest.approx(throughput.flops_per_step / (4 * peak * seconds))
  assert report["tokens_per_sec"] == pytest.approx(throughput.tokens_per_step / seconds)

  # FSDP x tensor parallelism: each chip holds a quarter of the parameters, not a half.
  compiled, trainer, state, _ = bench.compile_for(_config(tmp_path, 1, 2, 2), "v5e:2x2")
  split = bench.aot_report(compiled, trainer, state)
  assert split["params_gb"] < 0.6 * report["params_gb"]
  assert "tpu_custom_call" in compiled.as_text()
