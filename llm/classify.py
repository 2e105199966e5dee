"""Labels text with a fine-tuned classifier.

    python -m llm.classify --workdir=runs/spam --text="You won a prize! Call now" --text="See you"

prints, per text, the most likely label and its probability.
"""

import jax
import numpy as np
from absl import flags

from llm import cli
from llm.errors import UserError
from llm.runs import loading
from llm.text import prompts
from llm.training import sharding


class TextClassifier:

  def __init__(self, workdir: str, devices=None):
    self.run = loading.load(workdir, devices)
    if self.run.task.produces != "classes":
      raise UserError(f"{workdir} is a task.kind={self.run.cfg.task.kind!r} run, not a "
                      "classifier; use python -m llm.generate")
    self.labels = self.run.task.labels
    model = self.run.model
    self._probs = jax.jit(lambda params, tokens, valid: jax.nn.softmax(
        model.apply({"params": params}, tokens, valid)))

  def probabilities(self, texts: list[str]) -> np.ndarray:
    """[len(texts), num_classes], each row summing to 1."""
    run = self.run
    tokens, valid = prompts.encode_texts(texts, run.tokenizer, run.cfg.data.max_length)
    with sharding.activate(run.mesh, run.mesh_cfg):
      return np.asarray(self._probs(run.params, tokens, valid))

  def classify(self, texts: list[str]) -> list[tuple[str, float]]:
    probs = self.probabilities(texts)
    return [(self.labels[i], float(p[i])) for p, i in zip(probs, probs.argmax(1))]


FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "A classification run directory.")
  flags.DEFINE_multi_string("text", [], "Text to classify (repeat for several).")


def main(argv):
  del argv
  if not FLAGS.workdir or not FLAGS.text:
    raise UserError('usage: python -m llm.classify --workdir=DIR --text="..." [--text="..."]')
  for text, (label, prob) in zip(FLAGS.text, TextClassifier(FLAGS.workdir).classify(FLAGS.text)):
    print(f"{label}\t{prob:.4f}\t{text}")


if __name__ == "__main__":
  cli.run(main, define_flags)
