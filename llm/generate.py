"""Samples text from a trained run (the sampling itself is llm/inference/sampling.py).

    python -m llm.generate --workdir=runs/gpt_tiny --prompt="The for statement" \\
        --max_new_tokens=100 --temperature=0.8 --top_k=50 --top_p=0.95 --num_samples=2
    python -m llm.generate --workdir=runs/dpo --instruction="..." --reward_model=runs/reward \\
        --best_of=8 --temperature=0.8 [--verbose: every sample's reward]
    python -m llm.generate --workdir=runs/chat --chat [--system="You are terse."]
    python -m llm.generate --workdir=runs/chat --messages=conversation.json

--chat talks with the model in the terminal, the conversation kept and rendered by the run's chat
template; --messages answers a JSON conversation (or JSON lines of them) with JSON lines.
"""

import json
import os
import sys

from absl import flags

from llm import cli
from llm.errors import BadRecord, UserError
from llm.inference.sampling import Generator
from llm.runs import loading
from llm.text import chat
from llm.text.prompts import alpaca_prompt

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "Run directory to sample from.")
  flags.DEFINE_bool("use_ema", False, loading.USE_EMA_HELP)
  flags.DEFINE_string("prompt", "", "Text to continue.")
  flags.DEFINE_string("prompt_file", None, "One prompt per line; JSON lines out, one per sample.")
  flags.DEFINE_string("instruction", None, "An instruction, put in the Alpaca template; prints "
                      "only the response.")
  flags.DEFINE_string("input", "", "The instruction's input (optional).")
  flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate at most.", lower_bound=1)
  flags.DEFINE_float("temperature", 1.0, "0: greedy.", lower_bound=0.0)
  flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).",
                       lower_bound=0)
  flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set reaching this mass.")
  flags.DEFINE_integer("num_samples", 1, "Samples per prompt.", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_string("stop", None, "Cut each sample at this string.")
  flags.DEFINE_bool("kv_cache", True, "Decode with the KV cache.")
  flags.DEFINE_string("reward_model", None, "A reward run: of --best_of samples per prompt, the "
                      "one it scores highest is returned.")
  flags.DEFINE_integer("best_of", 1, "Samples per prompt for --reward_model to choose from.",
                       lower_bound=1)
  flags.DEFINE_bool("chat", False, "Talk with the model: each line you type is a user message.")
  flags.DEFINE_string("system", "", "--chat: a system message to start the conversation with.")
  flags.DEFINE_string("messages", None, "A JSON file: a conversation ([{\"role\", \"content\"}, "
                      "...]) or JSON lines of them; each gets the assistant's next message.")


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise UserError("usage: python -m llm.generate --workdir=DIR --prompt=TEXT")
  if not 0 < FLAGS.top_p <= 1:
    raise UserError(f"--top_p={FLAGS.top_p:g}: use a probability mass in (0, 1]")
  if FLAGS.prompt_file and not os.path.isfile(FLAGS.prompt_file):
    raise UserError(f"--prompt_file: no such file {FLAGS.prompt_file}")
  if FLAGS.chat or FLAGS.messages:
    _refuse_with_conversations()
  gen = Generator(loading.load(FLAGS.workdir, use_ema=FLAGS.use_ema))
  if FLAGS.chat or FLAGS.messages:
    _conversations(gen)
    return
  if FLAGS.reward_model:
    _best_of(gen)
    return
  if FLAGS.instruction is not None:
    [[response]] = gen.generate([alpaca_prompt(FLAGS.instruction, FLAGS.input)],
                                FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p,
                                seed=FLAGS.seed, stop=FLAGS.stop, use_cache=FLAGS.kv_cache,
                                stream=lambda t: print(t, end="", flush=True))
    print()
    return
  if FLAGS.prompt_file:
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


def _read_conversations(path: str) -> list[list[dict]]:
  """--messages: one JSON value (a conversation, {"messages": conversation}, or a list of
  either) or JSON lines of them; each checked, or one line naming the conversation."""
  if not os.path.isfile(path):
    raise UserError(f"--messages: no such file {path}")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    whole = _conversations_in(json.loads(text))
    found = [(f"conversation {n}", c) for n, c in enumerate(whole, 1)]
  except json.JSONDecodeError:
    found = []
    for n, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          found += [(f"line {n}", c) for c in _conversations_in(json.loads(line))]
        except json.JSONDecodeError as e:
          raise UserError(f"--messages: line {n} of {path} is not JSON ({e.msg})") from None
  if not found:
    raise UserError(f"--messages: {path} holds no conversation")
  for where, conversation in found:
    try:
      chat.check(conversation)
    except BadRecord as e:
      raise UserError(f"--messages: {where} of {path}: {e}") from None
  return [conversation for _, conversation in found]


def _conversations_in(value) -> list:
  """A conversation is a list of messages, or {"messages": [...]}; a list of them is many."""
  unwrap = lambda c: c["messages"] if isinstance(c, dict) and "messages" in c else c
  if isinstance(value, list) and value and all(
      isinstance(unwrap(c), list) for c in value):
    return [unwrap(c) for c in value]
  return [] if value == [] else [unwrap(value)]


def _refuse_with_conversations() -> None:
  """--chat and --messages answer each conversation once, from the conversation alone."""
  mode = "--chat" if FLAGS.chat else "--messages"
  if FLAGS.chat and FLAGS.messages:
    raise UserError("--chat and --messages: choose one (the terminal, or a file)")
  unused = [f"--{name}" for name in ("prompt", "prompt_file", "instruction", "input",
                                     "reward_model") if FLAGS[name].present]
  unused += [f"--{name}" for name in ("num_samples", "best_of") if FLAGS[name].value != 1]
  if unused:
    raise UserError(f"{mode} answers each conversation once, from its messages: "
                    f"{', '.join(unused)} would be ignored; leave out {', '.join(unused)}")


def _conversations(gen) -> None:
  """--messages: the assistant's next message to each conversation, as JSON lines; --chat: a
  conversation in the terminal, kept turn after turn."""
  if not gen.tokenizer.chat_template:
    raise UserError(f"{FLAGS.workdir} has no chat template: --chat and --messages need a run "
                    "fine-tuned with one (--config.tokenizer.chat_template=chatml; "
                    "docs/finetuning.md)")
  template = chat.Template.of(gen.tokenizer)
  stop = template.end_of_turn or None  # also where it is several tokens (text after it is cut)
  answer = lambda conversations: [samples[0].strip() for samples in gen.generate(
      [template.render(c, add_generation_prompt=True) for c in conversations],
      FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, seed=FLAGS.seed,
      stop=stop, use_cache=FLAGS.kv_cache)]
  if FLAGS.messages:
    conversations = _read_conversations(FLAGS.messages)
    for conversation, text in zip(conversations, answer(conversations)):
      print(json.dumps({"messages": conversation + [{"role": "assistant", "content": text}]}))
    return
  messages = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
  print("(an empty line or Ctrl-D ends the conversation)", file=sys.stderr)
  while True:
    try:
      line = input("you> ")
    except EOFError:
      break
    if not line.strip():
      break
    messages.append({"role": "user", "content": line})
    [text] = answer([messages])
    messages.append({"role": "assistant", "content": text})
    print(f"assistant> {text}", flush=True)


def _best_of(gen) -> None:
  """--reward_model: the best of --best_of samples per prompt (all rewards with --verbose, and
  always in the JSON lines of --prompt_file)."""
  from llm.inference.scoring import best_of, Scorer
  if FLAGS.instruction is not None:
    prompts = [alpaca_prompt(FLAGS.instruction, FLAGS.input)]
  elif FLAGS.prompt_file:
    with open(FLAGS.prompt_file) as f:
      prompts = [line.rstrip("\n") for line in f if line.strip()]
  else:
    prompts = [FLAGS.prompt]
  results = best_of(gen, Scorer(loading.load(FLAGS.reward_model)), prompts, FLAGS.best_of,
                    max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                    top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed, stop=FLAGS.stop,
                    use_cache=FLAGS.kv_cache)
  for prompt, best in zip(prompts, results):
    if FLAGS.prompt_file:
      print(json.dumps({"prompt": prompt, "text": best.text, "reward": best.reward,
                        "rewards": best.rewards}))
      continue
    if FLAGS.verbose:
      for reward, sample in zip(best.rewards, best.samples):
        print(f"[reward {reward:+.4f}] {sample!r}", file=sys.stderr)
    print(best.text if FLAGS.instruction is not None else prompt + best.text)


if __name__ == "__main__":
  cli.run(main, define_flags)
