"""Trains a model from a config file (the loop and what it is made of: llm/runs/trainer.py).

    python -m llm.train --config=configs/gpt_tiny.py --workdir=runs/gpt_tiny \\
        [--config.train.steps=200]

Running the same command again resumes from the latest checkpoint in --workdir.
"""

from absl import flags
from ml_collections import config_flags

from llm import cli
from llm import config as config_lib
from llm.errors import UserError
from llm.runs.trainer import train
from llm.training import sharding

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when this module is the entry point."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
  flags.DEFINE_bool("print_config", False, "Print every config key with its value and meaning, "
                    "then exit.")
  sharding.define_distributed_flags()


def main(argv):
  del argv
  if FLAGS.config is not None and FLAGS.print_config:
    print(config_lib.describe(FLAGS.config))
    return
  if FLAGS.config is None or not FLAGS.workdir:
    raise UserError("usage: python -m llm.train --config=configs/FILE.py --workdir=DIR")
  sharding.initialize_distributed()
  train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main, define_flags)
