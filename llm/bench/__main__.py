"""Speed, measured side by side in one process (never in a timed test).

    python -m llm.bench train --config=configs/gpt_tiny.py [--steps=20] [--compare_torch]
    python -m llm.bench train --config=configs/finetune_instruct.py --compare_packing
    python -m llm.bench train --config=configs/gpt_tiny.py --optimizers=adamw,muon,lion
    python -m llm.bench train --config=configs/moe_small.py:tiny --compare_dense
    python -m llm.bench train --config=configs/gpt_tiny.py --profile=/tmp/profile
    python -m llm.bench generate --config=configs/gpt_tiny.py --config.model.max_len=512 \\
        [--batch=1 --prompt_len=16 --new_tokens=256] [--compare_hf]

    python -m llm.bench train --config=configs/gpt_small.py --topology=v5e:2x4   # needs libtpu

`train --topology` (and `generate --topology`) compiles the step ahead of time for a TPU
topology, from any machine, and reports per-chip memory and XLA's cost estimates instead of
timing. `train` compiles the train step (timed; XLA's memory accounting of it: temporaries and
arguments, per device) and times it after one warm-up step on batches already on the devices
(`step_ms`), then fed as training feeds it, by a host thread that makes the next batches
(`step_ms_with_data`).
`rl` times an online RL config's (task.kind=grpo, rloo) rollout and update apart, and the share
of a step spent sampling.
`evaluate` times multiple-choice scoring (HellaSwag's shape: 4 choices per example) in
examples/s, and with --compare_hf lm-evaluation-harness's own Hugging Face backend beside it.
`generate` times prefill and decoding of a randomly initialised model of the config's shape, with
and without the KV cache, and prints the ratio and the cache's size.
`data` measures the data path of the config's tokenizer on corpora of --corpus_mb megabytes
(JSON lines of CPython's documentation and standard library sources, made once in
--corpus_dir): the tokenizer's own batch throughput on all cores on the smallest corpus held in
memory, preparation's throughput on the same text (streamed from the file, as llm.prepare
reads it), `python -m llm.prepare`'s wall time and peak resident memory per corpus, and the
time from starting `python -m llm.train` on the largest prepared corpus (the config's `:tiny`
model shape) to its first step.

    python -m llm.bench data --config=configs/gpt_small.py --config.tokenizer.path=DIR \
        [--corpus_mb=100,1000]
"""

import os
import tempfile

import jax
from absl import flags
from ml_collections import config_flags

from llm import cli
from llm.bench import data, evaluate, generate, torch_reference, train
from llm.errors import UserError

FLAGS = flags.FLAGS


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_integer("steps", 20, "train, rl: timed steps (train 0: compile and report memory "
                       "only).")
  flags.DEFINE_integer("batch", 1, "generate: prompts per batch.")
  flags.DEFINE_integer("prompt_len", 16, "generate: prompt tokens.")
  flags.DEFINE_integer("new_tokens", 256, "generate: tokens to decode.")
  flags.DEFINE_integer("repeats", 3, "generate: timed repeats (the best counts).")
  flags.DEFINE_string("topology", None, "train, generate: compile for this TPU topology ahead "
                      "of time (e.g. v5e:2x4, v5p:2x2x1, v6e:2x2; needs libtpu) and report "
                      "XLA's memory and cost estimates per chip instead of timing.")
  flags.DEFINE_integer("examples", 64, "evaluate: multiple-choice examples (4 choices each).")
  flags.DEFINE_integer("context_len", 48, "evaluate: context tokens of each example.")
  flags.DEFINE_integer("choice_len", 24, "evaluate: tokens of each choice.")
  flags.DEFINE_integer("requests_per_batch", 16, "evaluate: requests per forward pass.")
  flags.DEFINE_bool("compare_hf", False,
                    "generate: also time transformers' GPT-2 generate (CPU torch), same shape; "
                    "evaluate: also lm-evaluation-harness's Hugging Face backend.")
  flags.DEFINE_list("corpus_mb", ["100", "1000"], "data: corpus sizes in megabytes.")
  flags.DEFINE_string("corpus_dir", os.path.join(tempfile.gettempdir(), "llm-bench-data"),
                      "data: where the corpora and their shards are made (kept for reruns).")
  flags.DEFINE_list("optimizers", [], "train: time the config with each of these "
                    "optimizers (train.optimizer) side by side, e.g. adamw,muon,lion.")
  flags.DEFINE_string("profile", "", "train: write a jax.profiler trace of the timed steps to "
                      "this folder (tensorboard --logdir=FOLDER, or ui.perfetto.dev).")
  flags.DEFINE_bool("compare_dense", False,
                    "train: time a mixture-of-experts config beside the dense model of the same "
                    "active width (ratio of step times), and the routing's share of one MoE "
                    "layer's forward and backward pass.")
  flags.DEFINE_bool("compare_packing", False,
                    "train: time a fine-tuning config's records padded and packed "
                    "(data.packing) side by side, in real (non-padding) tokens/s.")
  flags.DEFINE_bool("compare_torch", False,
                    "train: also time torch.compile'd train steps (AdamW, same shape and batch) "
                    "of transformers' GPT-2 and of a nanoGPT-style GPT (and the latter without "
                    "torch.compile), in turn with this project's for 5 rounds, and print the "
                    "ratios of the medians; then one block's forward and backward pass against "
                    "nanoGPT's, causal attention's against torch's scaled_dot_product_attention, "
                    "and the step's matrix products alone, JAX against torch.")


def main(argv):
  kinds = ("train", "generate", "data", "rl", "evaluate")
  if len(argv) != 2 or argv[1] not in kinds or FLAGS.config is None:
    raise UserError(f"usage: python -m llm.bench {'|'.join(kinds)} --config=configs/FILE.py")
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  if argv[1] == "train" and FLAGS.topology:
    result = train.bench_compile_for(FLAGS.config, FLAGS.topology)
    device = result.pop("device") + f" ({FLAGS.topology}, compiled ahead of time; estimates)"
  elif argv[1] == "train" and FLAGS.compare_packing:
    result = train.bench_packing(FLAGS.config, max(FLAGS.steps, 1))
  elif argv[1] == "train" and FLAGS.compare_dense:
    result = train.bench_moe(FLAGS.config, max(FLAGS.steps, 1))
  elif argv[1] == "train" and FLAGS.optimizers:
    result = train.bench_optimizers(FLAGS.config, max(FLAGS.steps, 1), FLAGS.optimizers)
  elif argv[1] == "train":
    against = None
    if FLAGS.compare_torch:
      steps = max(FLAGS.steps, 1)
      against = lambda ours: {**torch_reference.torch_train(FLAGS.config, steps, ours),
                              **torch_reference.bench_block(FLAGS.config),
                              **torch_reference.bench_attention(FLAGS.config),
                              **torch_reference.bench_matmuls(FLAGS.config)}
    result = train.bench_train(FLAGS.config, FLAGS.steps, FLAGS.profile, against)
  elif argv[1] == "rl":
    result = train.bench_rl(FLAGS.config, max(FLAGS.steps, 1))
  elif argv[1] == "evaluate":
    result = evaluate.bench_evaluate(FLAGS.config, FLAGS.examples, FLAGS.context_len,
                                     FLAGS.choice_len, FLAGS.requests_per_batch, FLAGS.compare_hf)
  elif argv[1] == "data":
    result = data.bench_data(FLAGS.config, [int(mb) for mb in FLAGS.corpus_mb], FLAGS.corpus_dir)
  elif FLAGS.topology:
    result = generate.bench_generate_for(FLAGS.config, FLAGS.topology, FLAGS.batch,
                                         FLAGS.prompt_len, FLAGS.new_tokens)
    device = result.pop("device") + f" ({FLAGS.topology}, compiled ahead of time; estimates)"
  else:
    result = generate.bench_generate(FLAGS.config, FLAGS.batch, FLAGS.prompt_len,
                                     FLAGS.new_tokens, FLAGS.repeats, FLAGS.compare_hf)
  print(f"{argv[1]} on {device}:")
  for key, value in result.items():
    print(f"  {key}: {'n/a' if value is None else value if isinstance(value, bool) else f'{value:,.4g}'}")


if __name__ == "__main__":
  cli.run(main, define_flags)
