"""Samples text from a trained run (the sampling itself is llm/sampling.py).

    python -m llm.generate --workdir=runs/gpt_tiny --prompt="The for statement" \\
        --max_new_tokens=100 --temperature=0.8 --top_k=50 --top_p=0.95 --num_samples=2
"""

import json
import os
import sys

from absl import flags

from llm import cli
from llm.data import alpaca_prompt
from llm.errors import UserError
from llm.sampling import Generator

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "Run directory to sample from.")
  flags.DEFINE_string("prompt", "", "Text to continue.")
  flags.DEFINE_string("prompt_file", None, "One prompt per line; JSON lines out, one per sample.")
  flags.DEFINE_string("instruction", None, "An instruction, put in the Alpaca template; prints "
                      "only the response.")
  flags.DEFINE_string("input", "", "The instruction's input (optional).")
  flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate at most.")
  flags.DEFINE_float("temperature", 1.0, "0: greedy.")
  flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
  flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set reaching this mass.")
  flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_string("stop", None, "Cut each sample at this string.")
  flags.DEFINE_bool("kv_cache", True, "Decode with the KV cache.")


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise UserError("usage: python -m llm.generate --workdir=DIR --prompt=TEXT")
  gen = Generator(FLAGS.workdir)
  if FLAGS.instruction is not None:
    [[response]] = gen.generate([alpaca_prompt(FLAGS.instruction, FLAGS.input)],
                                FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p,
                                seed=FLAGS.seed, stop=FLAGS.stop, use_cache=FLAGS.kv_cache,
                                stream=lambda t: print(t, end="", flush=True))
    print()
    return
  if FLAGS.prompt_file:
    if not os.path.isfile(FLAGS.prompt_file):
      raise UserError(f"--prompt_file: no such file {FLAGS.prompt_file}")
    with open(FLAGS.prompt_file) as f:
      prompts = [line.rstrip("\n") for line in f if line.strip()]
  else:
    prompts = [FLAGS.prompt]
  streaming = not FLAGS.prompt_file and FLAGS.num_samples == 1
  if streaming:
    print(prompts[0], end="", flush=True)
  outputs = gen.generate(prompts, FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p,
                         FLAGS.num_samples, FLAGS.seed, FLAGS.stop, FLAGS.kv_cache,
                         stream=(lambda t: print(t, end="", flush=True)) if streaming else None)
  if streaming:
    print()
    return
  for prompt, samples in zip(prompts, outputs):
    for i, text in enumerate(samples):
      if FLAGS.prompt_file:
        print(json.dumps({"prompt": prompt, "sample": i, "text": text}))
      else:
        print(("" if i == 0 else "\n" + "-" * 40 + "\n") + prompt + text)
  sys.stdout.flush()


if __name__ == "__main__":
  cli.run(main, define_flags)
