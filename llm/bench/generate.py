"""`llm.bench generate`: prefill and decoding of a randomly initialised model of the config's
shape, with and without the KV cache (and transformers' GPT-2 beside it); with --topology, the
decode loop compiled ahead of time for a TPU slice and its bandwidth bound."""

import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm import config as config_lib
from llm import model as model_lib
from llm.bench import timing, torch_reference
from llm.errors import UserError
from llm.inference.sampling import generate_tokens
from llm.model import attention
from llm.runs import ahead_of_time
from llm.training import metrics, sharding
from llm.training import params as params_lib


def bench_generate(cfg, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                   compare_hf: bool = False) -> dict:
  config_lib.validate(cfg)
  model = model_lib.build(cfg.model, cfg.tokenizer.vocab_size)
  if prompt_len + new_tokens > model.cfg.max_len:
    raise UserError(f"prompt_len + new_tokens = {prompt_len + new_tokens} is more than "
                    f"model.max_len={model.cfg.max_len}; raise --config.model.max_len")
  params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 1), jnp.int32)))["params"])()
  prompt = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (batch, prompt_len),
                                             dtype=np.int32)
  valid = np.ones_like(prompt, bool)

  def run(n, use_cache):  # eot_id -1: never stops early
    return lambda: generate_tokens(model, params, prompt, valid, jax.random.PRNGKey(0), -1,
                             max_new_tokens=n, temperature=0.0, top_k=0, top_p=1.0,
                             use_cache=use_cache)

  cache = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(
      (batch, prompt_len + new_tokens), jnp.int32), decode=True)["cache"])
  result = {"kv_cache_mb": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) / 1e6}
  for use_cache in (True, False):
    name = "cached" if use_cache else "uncached"
    prefill = timing.best_time(run(1, use_cache), repeats)
    total = timing.best_time(run(new_tokens, use_cache), repeats)
    result[f"{name}_prefill_tokens_per_sec"] = batch * prompt_len / prefill
    result[f"{name}_decode_tokens_per_sec"] = batch * (new_tokens - 1) / max(total - prefill, 1e-9)
  result["cached_over_uncached"] = (result["cached_decode_tokens_per_sec"] /
                                    result["uncached_decode_tokens_per_sec"])
  if compare_hf:
    hf = torch_reference.hf_gpt2_decode(model.cfg, prompt, new_tokens, repeats)
    result.update(hf)
    result["cached_over_transformers"] = (result["cached_decode_tokens_per_sec"] /
                                          hf["transformers_decode_tokens_per_sec"])
  return result


def bench_generate_for(cfg, topology: str, batch: int, prompt_len: int,
                       new_tokens: int) -> dict:
  """Greedy KV-cache decoding of the config's model compiled ahead of time for a TPU topology
  (parameters split by the config's mesh rules; nothing is made): per device, the parameters',
  the KV cache's and XLA's temporary bytes against the chip's memory, and the decode rate that
  reading the parameters and the cache once per token at the memory's bandwidth allows."""
  config_lib.validate(cfg)
  devices = ahead_of_time.topology_devices(topology)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  model = model_lib.build(cfg.model, cfg.tokenizer.vocab_size)
  shapes, shardings = params_lib.abstract(cfg, model, mesh, cfg.mesh)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        params_lib.values(shapes), shardings)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  prompt = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=replicated)
  valid = jax.ShapeDtypeStruct((batch, prompt_len), jnp.bool_, sharding=replicated)
  decode = jax.jit(lambda params, prompt, valid: generate_tokens(
      model, params, prompt, valid, jax.random.PRNGKey(0), -1, max_new_tokens=new_tokens,
      temperature=0.0, top_k=0, top_p=1.0, use_cache=True))
  with attention.compiling_for("tpu"), sharding.activate(mesh, cfg.mesh):
    started = time.perf_counter()
    compiled = decode.lower(params, prompt, valid).compile()
    compile_s = time.perf_counter() - started
  cache = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(
      (batch, prompt_len + new_tokens), jnp.int32), decode=True)["cache"])
  kind = devices[0].device_kind
  params_gb = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                  for x in jax.tree.leaves(params)) / 1e9
  cache_gb = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) / 1e9  # whole
  memory = compiled.memory_analysis()
  total_gb = (memory.argument_size_in_bytes + memory.output_size_in_bytes
              - memory.alias_size_in_bytes + memory.temp_size_in_bytes) / 1e9
  hbm, bandwidth = metrics.hbm_bytes(kind), metrics.hbm_bandwidth(kind)
  out = {"compile_s": compile_s, "device": f"{len(devices)} x {kind}", "params_gb": params_gb,
         "kv_cache_gb_all_devices": cache_gb, "temp_gb": memory.temp_size_in_bytes / 1e9,
         "total_gb": total_gb, "hbm_gb": hbm / 1e9 if hbm else None,
         "fits": (total_gb * 1e9 <= hbm) if hbm else None}
  if bandwidth:  # each new token reads every parameter and the cache once
    per_token_s = (params_gb + cache_gb / len(devices)) * 1e9 / bandwidth
    out["decode_tokens_per_sec_bound"] = batch / per_token_s
  return out
