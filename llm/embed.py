"""Sentence embeddings from a BERT run directory (pre-trained here or converted).

    python -m llm.convert --from_hf=path/to/all-MiniLM-L6-v2 --workdir=runs/minilm
    python -m llm.embed --workdir=runs/minilm --text="A man is eating food." --text="Someone eats."

Each text becomes [CLS] text [SEP]; its vector is the mean of the last block's states over the
real tokens, scaled to length 1, as sentence-transformers computes it. Prints one JSON line per
text, then the cosine similarities when there are several.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from llm import cli
from llm.errors import UserError
from llm.model.bert import BERT
from llm.runs import loading
from llm.text import prompts
from llm.training import sharding


class Embedder:

  def __init__(self, workdir: str, devices=None):
    self.run = loading.load(workdir, devices)
    if not isinstance(self.run.model, BERT):
      raise UserError(f"{workdir} holds a {type(self.run.model).__name__}; sentence embeddings "
                      "come from a BERT run (model.kind=bert)")
    model = self.run.model

    def embed(params, tokens_BxL, valid_BxL):
      x_BxLxD = model.apply({"params": params}, tokens_BxL, None, valid_BxL, method=BERT.hidden)
      mask_BxLx1 = valid_BxL[..., None].astype(x_BxLxD.dtype)
      mean_BxD = jnp.sum(x_BxLxD * mask_BxLx1, 1) / jnp.maximum(jnp.sum(mask_BxLx1, 1), 1.0)
      return mean_BxD / jnp.maximum(jnp.linalg.norm(mean_BxD, axis=-1, keepdims=True), 1e-12)

    self._embed = jax.jit(embed)

  def embed(self, texts: list[str]) -> np.ndarray:
    """[len(texts), d_model], unit length."""
    run = self.run
    tokens, valid = prompts.encode_texts(texts, run.tokenizer, run.cfg.data.max_length)
    with sharding.activate(run.mesh, run.mesh_cfg):
      return np.asarray(self._embed(run.params, tokens, valid))


FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "A BERT run directory.")
  flags.DEFINE_multi_string("text", [], "Text to embed (repeat for several).")


def main(argv):
  del argv
  if not FLAGS.workdir or not FLAGS.text:
    raise UserError('usage: python -m llm.embed --workdir=DIR --text="..." [--text="..."]')
  vectors = Embedder(FLAGS.workdir).embed(FLAGS.text)
  for text, vector in zip(FLAGS.text, vectors):
    print(json.dumps({"text": text, "embedding": [round(float(v), 6) for v in vector]}))
  if len(FLAGS.text) > 1:
    print("cosine similarities:")
    for row in vectors @ vectors.T:
      print("  " + "  ".join(f"{v:6.3f}" for v in row))


if __name__ == "__main__":
  cli.run(main, define_flags)
