"""Tokenizes a run's corpus once, into shards that training reads memory-mapped.

    python -m llm.prepare --config=configs/gpt_small.py --out=gs://BUCKET/owt-gpt2
    python -m llm.train --config=configs/gpt_small.py --config.data.prepared=gs://BUCKET/owt-gpt2

Without --out the shards go where `llm.train` looks for the same data and tokenizer (the cache
folder, data.cache_dir), so a later run starts at once. Every core tokenizes (the tokenizer's
own batch API), the corpus is read as a stream (no copy of it first: a hub data set is not
downloaded whole), memory stays at a few batches of documents whatever the corpus size, and a
killed preparation, started again, completes the shards it had not written. The format:
llm/data/shards.py.
"""

import time

from absl import flags
from ml_collections import config_flags

from llm import cli, tasks
from llm.data import shards
from llm.errors import UserError
from llm.runs import startup

FLAGS = flags.FLAGS


def define_flags():
  config_flags.DEFINE_config_file("config", None, "The run's config file.", lock_config=True)
  flags.DEFINE_string("out", "", "Folder (local or gs://) for the shards; empty: the cache "
                      "folder llm.train reads for this data and tokenizer.")
  flags.DEFINE_integer("documents_per_shard", shards.DOCUMENTS_PER_SHARD,
                       "Documents in each shard.")


def prepare(cfg, out: str = "", documents_per_shard: int = shards.DOCUMENTS_PER_SHARD,
            progress: bool = True) -> shards.Shards:
  """The shards of `cfg`'s corpus and tokenizer, in `out` or the cache folder."""
  if (not tasks.get(cfg.task.kind).reads_token_stream or cfg.data.prepared
      or cfg.data.streaming):
    readers = " or ".join(tasks.kinds_where(lambda c: c.reads_token_stream))
    raise UserError(f"llm.prepare tokenizes the corpus of a next-token run (task.kind={readers}) "
                    "that reads neither data.prepared nor a stream")
  if documents_per_shard < 1:
    raise UserError(f"--documents_per_shard={documents_per_shard}: use a positive number")
  s = startup.setup(cfg)  # the corpus as a stream: no copy of it first, whatever its size
  return shards.prepare_tokens(s.cfg.data, s.docs, s.tokenizer, out, documents_per_shard,
                               progress)


def main(argv):
  del argv
  if FLAGS.config is None:
    raise UserError("usage: python -m llm.prepare --config=FILE [--out=FOLDER]")
  started = time.perf_counter()
  prepared = prepare(FLAGS.config, FLAGS.out, FLAGS.documents_per_shard)
  seconds = time.perf_counter() - started
  index = prepared.index
  print(f"{index['documents']:,} documents, {index['tokens']:,} tokens in "
        f"{len(index['shards'])} shards at {prepared.path} ({seconds:.1f} s)")
  if FLAGS.out:
    print(f"train on them with --config.data.prepared={FLAGS.out}")


if __name__ == "__main__":
  cli.run(main, define_flags)
