"""Prints the rewards a reward model (task.kind=reward) gives answers.

    python -m llm.score --workdir=runs/reward --instruction="Fix the spelling" --input="freind" \\
        --response="The correct spelling is friend." --response="Learn to spell."

`--instruction` / `--input` go into the instruction template the reward model was trained on;
`--prompt` is used as it is instead.
"""

from absl import flags

from llm import cli
from llm.errors import UserError
from llm.inference.scoring import Scorer
from llm.runs import loading
from llm.text.prompts import alpaca_prompt

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "The reward model's run directory.")
  flags.DEFINE_string("instruction", None, "The instruction, put in the template.")
  flags.DEFINE_string("input", "", "The instruction's input (optional).")
  flags.DEFINE_string("prompt", None, "A prompt used as it is (instead of --instruction).")
  flags.DEFINE_multi_string("response", [], "An answer to score (repeat for several).")


def main(argv):
  del argv
  if not FLAGS.workdir or not FLAGS.response or (FLAGS.instruction is None) == (
      FLAGS.prompt is None):
    raise UserError("usage: python -m llm.score --workdir=DIR --instruction=TEXT [--input=TEXT] "
                    "(or --prompt=TEXT) --response=TEXT [--response=TEXT ...]")
  prompt = (alpaca_prompt(FLAGS.instruction, FLAGS.input) if FLAGS.instruction is not None
            else FLAGS.prompt)
  scorer = Scorer(loading.load(FLAGS.workdir))
  rewards = scorer.score([prompt] * len(FLAGS.response), FLAGS.response)
  for reward, response in zip(rewards, FLAGS.response):
    print(f"{reward:+.4f}  {response}")


if __name__ == "__main__":
  cli.run(main, define_flags)
