"""The real train step compiled ahead of time for a TPU topology from this CPU machine (libtpu):
splash attention inside it, memory and FLOPs consistent with the model, the roofline's
arithmetic."""

import pytest

from conftest import tiny_config
from llm.bench import generate
from llm.runs import ahead_of_time
from llm.training import metrics

pytestmark = [pytest.mark.xdist_group("tpu"), pytest.mark.slow]


def _config(tmp_path, data, fsdp, tensor):
  return tiny_config(tmp_path, **{
      "model.max_len": 128, "model.num_heads": 4, "model.d_model": 64, "model.d_ff": 128,
      "model.attention_impl": "splash", "data.max_length": 128, "data.stride": 128,
      "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})


def test_the_train_step_with_splash_attention_compiles_for_a_v5e_slice(tmp_path):
  step = ahead_of_time.compile_for(_config(tmp_path, 2, 2, 1), "v5e:2x2")
  assert "tpu_custom_call" in step.compiled.as_text()  # the splash kernel, compiled by Mosaic
  assert step.splash_kernel
  report = ahead_of_time.aot_report(step)
  assert report["device"] == "4 x TPU v5 lite" and report["fits"]
  assert report["params_gb"] > 0 and report["opt_state_gb"] > 0 and report["temp_gb"] > 0
  # XLA's FLOPs per token: the model's 6N + attention, within 10%.
  assert report["model_flops_over_xla"] == pytest.approx(1.0, abs=0.1)
  # The roofline by hand: the longer of compute at peak and bytes at bandwidth.
  peak, bandwidth = metrics.peak_flops("TPU v5 lite", 0), metrics.hbm_bandwidth("TPU v5 lite")
  seconds = max(report["xla_flops"] / peak, report["xla_gb_accessed"] * 1e9 / bandwidth)
  assert report["step_ms"] == pytest.approx(1e3 * seconds)
  throughput = step.trainer.throughput()
  assert report["mfu"] == pytest.approx(throughput.flops_per_step / (4 * peak * seconds))
  assert report["tokens_per_sec"] == pytest.approx(throughput.tokens_per_step / seconds)

  # FSDP x tensor parallelism: each chip holds a quarter of the parameters, not a half.
  step = ahead_of_time.compile_for(_config(tmp_path, 1, 2, 2), "v5e:2x2")
  split = ahead_of_time.aot_report(step)
  assert split["params_gb"] < 0.6 * report["params_gb"] and step.splash_kernel


def test_the_kv_cache_decoding_compiles_for_the_same_slice(tmp_path):
  report = generate.bench_generate_for(_config(tmp_path, 1, 1, 4), "v5e:2x2", batch=4,
                                       prompt_len=16, new_tokens=32)
  assert report["device"] == "4 x TPU v5 lite" and report["fits"]
  assert report["kv_cache_gb_all_devices"] > 0 and report["params_gb"] > 0
  per_token_s = ((report["params_gb"] + report["kv_cache_gb_all_devices"] / 4) * 1e9
                 / metrics.hbm_bandwidth("TPU v5 lite"))
  assert report["decode_tokens_per_sec_bound"] == pytest.approx(4 / per_token_s)
