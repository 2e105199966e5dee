"""The CPU's fused attention: flash_attention_cpu.cc, built on first use, called through XLA's FFI.

    out_BxLxNxH = attend(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, valid_BxL, is_causal, documents_BxL)

XLA has no fused attention on the CPU: it runs attention as batched products of the scores,
with the heads-first copies they need. The kernel reads q, k and v where they lie and keeps a
block of scores in cache (see the .cc file). float32, self-attention (L = S).

The library is compiled with the system's C++ compiler for this machine (-march=native) into
$XDG_CACHE_HOME/llm (~/.cache/llm), named by a hash of the source, the flags and the CPU, so
each machine and each edit builds its own once.
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

SOURCE = pathlib.Path(__file__).with_name("flash_attention_cpu.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def _cpu_id() -> str:
  """The CPU's model and feature flags: a library built for one machine may not run on another."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor()
  return "".join(sorted({l for l in lines if l.startswith(("model name", "flags"))}))


def _build() -> pathlib.Path:
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if compiler is None:
    raise RuntimeError("no C++ compiler (c++, g++ or $CXX) to build the CPU attention kernel")
  key = hashlib.sha256(b"\0".join(
      [SOURCE.read_bytes(), " ".join(FLAGS).encode(), _cpu_id().encode(),
       jax.__version__.encode()])).hexdigest()[:16]
  cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
  library = cache / "llm" / f"flash_attention_cpu-{key}.so"
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=library.parent) as tmp:  # concurrent builds: last wins
    built = pathlib.Path(tmp) / library.name
    result = subprocess.run([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o",
                             str(built)], capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f"building {SOURCE.name} failed: {result.stderr.strip()[-2000:]}")
    os.replace(built, library)
  return library


@functools.cache
def _register() -> None:
  library = ctypes.cdll.LoadLibrary(str(_build()))
  for name in ("FlashAttentionForward", "FlashAttentionBackward"):
    jax.ffi.register_ffi_target(f"llm_{name}", jax.ffi.pycapsule(getattr(library, name)),
                                platform="cpu")


@functools.cache
def available() -> bool:
  """Whether the kernel builds and loads here (the CPU's 'auto' attention falls back if not)."""
  try:
    _register()
  except (RuntimeError, OSError):
    return False
  return True


def attend(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, valid_BxL, is_causal: bool, documents_BxL):
  """softmax(q k^T / sqrt(H)) v over the keys that are valid, of the query's document and, if
  causal, not after it; zeros for a query with none."""
  L = q_BxLxNxH.shape[1]
  if k_BxLxKxH.shape[1] != L:
    raise ValueError(f"the CPU's fused attention is self-attention: {L} queries, "
                     f"{k_BxLxKxH.shape[1]} keys")
  if q_BxLxNxH.dtype != jnp.float32:
    raise ValueError(f"the CPU's fused attention runs float32, not {q_BxLxNxH.dtype}; "
                     "use model.attention_impl=blocked")
  _register()
  return _flash(is_causal, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, valid_BxL.astype(bool),
                documents_BxL.astype(jnp.int32))


def _forward(is_causal, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, valid_BxL, documents_BxL):
  B, L, N, _ = q_BxLxNxH.shape
  call = jax.ffi.ffi_call(
      "llm_FlashAttentionForward",
      (jax.ShapeDtypeStruct(q_BxLxNxH.shape, jnp.float32),
       jax.ShapeDtypeStruct((B, N, L), jnp.float32)), vmap_method="sequential")
  return call(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, valid_BxL, documents_BxL, causal=is_causal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(is_causal, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, valid_BxL, documents_BxL):
  return _forward(is_causal, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, valid_BxL, documents_BxL)[0]


def _flash_fwd(is_causal, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, valid_BxL, documents_BxL):
  out_BxLxNxH, lse_BxNxL = _forward(is_causal, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, valid_BxL,
                                    documents_BxL)
  return out_BxLxNxH, (q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, valid_BxL, documents_BxL, out_BxLxNxH,
                       lse_BxNxL)


def _flash_bwd(is_causal, residuals, dout_BxLxNxH):
  q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, valid_BxL, documents_BxL = residuals[:5]
  call = jax.ffi.ffi_call(
      "llm_FlashAttentionBackward",
      tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32)
            for x in (q_BxLxNxH, k_BxLxKxH, v_BxLxKxH)), vmap_method="sequential")
  dq, dk, dv = call(*residuals, dout_BxLxNxH.astype(jnp.float32), causal=is_causal)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
