"""metrics.jsonl, TensorBoard events, and the throughput numbers (tokens/s, MFU)."""

import dataclasses
import json
import os

# Peak dense bf16 FLOP/s per device, by jax's `device_kind`.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


# Memory per device (bytes): a TPU v5e or v6e chip is one device; a v5p chip is one device of
# two cores (megacore); ahead-of-time topologies of v4 list each of a chip's two cores.
HBM_BYTES = {
    "TPU v4": 16 * 2**30,
    "TPU v5 lite": 16 * 2**30,
    "TPU v5": 95 * 2**30,
    "TPU v6 lite": 32 * 2**30,
}


# Memory bandwidth per device (bytes/s), for the same devices.
HBM_BANDWIDTH = {
    "TPU v4": 1228e9 / 2,
    "TPU v5 lite": 819e9,
    "TPU v5": 2765e9,
    "TPU v6 lite": 1640e9,
}


def _lookup(table: dict, device_kind: str):
  for kind, value in table.items():  # prefix match, the longer names first
    if device_kind.startswith(kind):
      return value
  return None


def hbm_bytes(device_kind: str) -> int | None:
  return _lookup(HBM_BYTES, device_kind)


def hbm_bandwidth(device_kind: str) -> float | None:
  return _lookup(HBM_BANDWIDTH, device_kind)


def peak_flops(device_kind: str, configured: float) -> float | None:
  """A configured peak wins; else the table's (prefix match); None when unknown (e.g. CPU)."""
  return configured if configured > 0 else _lookup(PEAK_FLOPS, device_kind)


def flops_per_token(num_params: int, num_layers: int, num_heads: int, head_dim: int,
                    seq_len: int) -> float:
  """Training FLOPs per token: 6N for the matmuls, 12·L·H·Q·T for attention (PaLM, app. B)."""
  return 6 * num_params + 12 * num_layers * num_heads * head_dim * seq_len


@dataclasses.dataclass(frozen=True)
class Throughput:
  """Tokens per second and MFU from the time some steps took (train and bench share it)."""
  tokens_per_step: int
  flops_per_step: float  # training FLOPs of one optimizer step
  peak_flops: float | None  # per device; None: unknown, no MFU
  num_devices: int

  def __call__(self, steps: int, seconds: float) -> dict:
    if not steps or seconds <= 0:
      return {"tokens_per_sec": None, "mfu": None}
    mfu = (steps * self.flops_per_step / seconds / (self.peak_flops * self.num_devices)
           if self.peak_flops else None)
    return {"tokens_per_sec": steps * self.tokens_per_step / seconds, "mfu": mfu}


def read(path: str) -> list[dict]:
  """The records of a metrics.jsonl, in order; a line torn by a kill is left out."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        continue
  return records


def check_wandb(project: str) -> None:
  """train.wandb_project needs the wandb package: one line if it is missing."""
  import importlib.util
  if project and importlib.util.find_spec("wandb") is None:
    from llm.errors import UserError
    raise UserError(f"train.wandb_project={project!r} logs to Weights & Biases, which is not "
                    "installed: pip install wandb (WANDB_MODE=offline needs no account)")


class MetricsWriter:
  """Appends one JSON object per line to a metrics.jsonl file, flushed at once, plus
  TensorBoard events in the same folder, and with `wandb_project` a Weights & Biases run (its
  files in the same folder; resumed with the run; WANDB_MODE=offline works without an account)
  that gets the resolved `config` once.

  Only process 0 writes; the others get a writer that does nothing.
  """

  def __init__(self, path: str, enabled: bool = True, wandb_project: str = "",
               config: dict | None = None):
    self.enabled = enabled
    self._wandb = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter
    folder = os.path.dirname(path) or "."
    self._file = open(path, "a")
    self._tb = SummaryWriter(logdir=folder)
    if wandb_project:
      import hashlib
      import wandb
      run_id = hashlib.sha256(os.path.abspath(folder).encode()).hexdigest()[:16]
      self._wandb = wandb.init(project=wandb_project, dir=folder, id=run_id, resume="allow",
                               name=os.path.basename(os.path.abspath(folder)), config=config)

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    scalars = {f"{record['split']}/{key}": value for key, value in record.items()
               if key not in ("step", "split") and isinstance(value, (int, float))}
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, record["step"])
    self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(scalars, step=record["step"])

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()
      if self._wandb is not None:
        self._wandb.finish()


def profile_range(setting: str) -> tuple[int, int] | None:
  """train.profile_steps: "START:STOP" -> (START, STOP), "" -> None; ValueError otherwise."""
  if not setting:
    return None
  start, stop = (int(part) for part in setting.split(":"))
  if not 1 <= start <= stop:
    raise ValueError(setting)
  return start, stop


class StepProfiler:
  """A jax.profiler trace of steps START..STOP (train.profile_steps) in `directory`: TensorBoard's
  profile tab or Perfetto (ui.perfetto.dev) opens it. A run resumed inside the range traces the
  steps it has left."""

  def __init__(self, setting: str, directory: str):
    self.steps, self.directory, self.tracing = profile_range(setting), directory, False
    self.first = None

  def before(self, step: int) -> None:
    if self.steps and self.steps[0] <= step <= self.steps[1] and self.first is None:
      import jax
      jax.profiler.start_trace(self.directory)
      self.tracing, self.first = True, step

  def after(self, step: int, outputs) -> None:
    if self.tracing and step == self.steps[1]:
      self.stop(outputs)
      print(f"wrote a profile of steps {self.first}-{self.steps[1]} to {self.directory} "
            f"(tensorboard --logdir={self.directory}, or ui.perfetto.dev)")

  def stop(self, outputs=None) -> None:
    if self.tracing:
      import jax
      jax.block_until_ready(outputs)  # the traced steps' work, finished
      jax.profiler.stop_trace()
      self.tracing = False
