"""Moves models between Hugging Face folders and run directories: GPT-2 and BERT.

    python -m llm.convert --from_hf=gpt2 --workdir=runs/gpt2          # HF GPT-2 -> run directory
    python -m llm.convert --workdir=runs/gpt2 --to_hf=out/gpt2        # run directory -> HF GPT-2
    python -m llm.convert --workdir=runs/lora --merge_lora --out=runs/merged   # self-contained

`--from_hf` takes a local folder (config.json, model.safetensors, the tokenizer's files: GPT-2's
vocab.json + merges.txt or tokenizer.json, BERT's vocab.txt) or a hub name, downloaded where the
network allows. The run directory it writes is what llm.generate, llm.evaluate, llm.embed and
fine-tuning (`init_from`) read; a Hugging Face folder is also accepted as `init_from` directly.
The formats themselves are llm/runs/hf.py; the run directory is llm/runs/rundir.py.
"""

import json
import os
import shutil

import jax
from absl import flags

from llm import cli, files, tasks
from llm import config as config_lib
from llm.errors import UserError
from llm.runs import hf, loading, rundir
from llm.training import params as params_lib


def from_hf(name_or_path: str, workdir: str, allow_torch_bin: bool = False) -> None:
  model_values, tokenizer, params = hf.load(name_or_path, allow_torch_bin)
  cfg = config_lib.base_config()
  cfg.model.update(model_values)
  cfg.tokenizer.update(tokenizer.config_values())
  cfg.task.kind = tasks.pretraining(cfg.model.kind)
  cfg.data.max_length = cfg.data.stride = min(cfg.data.max_length, cfg.model.max_len)
  rundir.write(workdir, cfg, tokenizer, params)
  print(f"wrote {workdir}: {cfg.model.kind.upper()} with {params_lib.count(params):,} parameters "
        f"({cfg.model.num_layers} layers, width {cfg.model.d_model}, context {cfg.model.max_len})")


EXPORT_MARK = ".llm-export"  # in a folder --to_hf wrote: it may be replaced by the next export


def to_hf(workdir: str, out: str, overwrite: bool = False, use_ema: bool = False) -> None:
  """DIR -> a folder that transformers reads: AutoModelForCausalLM for GPT-2,
  BertForPreTraining (or AutoModel) for BERT. A folder that holds anything but an earlier
  export is replaced only with `overwrite`; the new folder is written beside it first."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--to_hf={out} is a file; choose a folder")
  if (os.path.isdir(out) and os.listdir(out) and not overwrite
      and not os.path.exists(os.path.join(out, EXPORT_MARK))):
    raise UserError(f"--to_hf={out} holds other files ({', '.join(sorted(os.listdir(out))[:3])}"
                    f"{' ...' if len(os.listdir(out)) > 3 else ''}); choose an empty folder, or "
                    "add --overwrite to replace it whole")
  run = loading.load(workdir, jax.devices()[:1], use_ema)
  if run.task.produces == "classes":
    raise UserError(f"--to_hf writes language models; {workdir} is a classifier")
  with files.written(out) as tmp:
    num_tensors = hf.save(os.fspath(tmp), run.cfg.model, run.model.cfg, run.tokenizer,
                          run.params)
    (tmp / EXPORT_MARK).write_text(json.dumps({"workdir": os.path.abspath(workdir)}))
    if os.path.exists(out):
      shutil.rmtree(out)
  print(f"wrote {out}: config.json, {hf.HF_WEIGHTS} ({num_tensors} tensors) and tokenizer files")


def merge_lora(workdir: str, out: str, use_ema: bool = False) -> None:
  """A fine-tuned run (LoRA adapters, or frozen weights kept in its init_from) -> a run
  directory holding the whole merged model, needing nothing else."""
  run = loading.load(workdir, jax.devices()[:1], use_ema)
  # The new directory holds parameters alone: no optimizer state, no moving average.
  cfg = config_lib.replace(run.cfg, {"lora.rank": 0, "init_from": "", "train.trainable": "all",
                                     "train.optimizer": "adamw", "train.ema": 0.0})
  rundir.write(out, cfg, run.tokenizer, run.params)
  print(f"wrote {out}: {params_lib.count(run.params):,} parameters, adapters merged")


# ---------------------------------------------------------------------------------------------
# Command line

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("from_hf", None, "Hugging Face folder or hub name to read.")
  flags.DEFINE_string("to_hf", None, "Folder to write a Hugging Face model into.")
  flags.DEFINE_string("workdir", None, "Run directory: written by --from_hf, read by --to_hf.")
  flags.DEFINE_bool("merge_lora", False, "Write --workdir's model, adapters merged, to --out.")
  flags.DEFINE_string("out", None, "Run directory written by --merge_lora.")
  flags.DEFINE_bool("use_ema", False, "--to_hf, --merge_lora: " + loading.USE_EMA_HELP)
  flags.DEFINE_bool("overwrite", False, "Let --to_hf replace a folder that holds other files.")
  flags.DEFINE_bool("allow_torch_bin", False,
                    "Read pytorch_model.bin (a pickle) when there is no safetensors file.")


def main(argv):
  del argv
  if not FLAGS.workdir or [bool(FLAGS.from_hf), bool(FLAGS.to_hf), FLAGS.merge_lora].count(
      True) != 1 or FLAGS.merge_lora != bool(FLAGS.out):
    raise UserError("usage: python -m llm.convert --from_hf=PATH_OR_NAME --workdir=DIR, "
                    "--workdir=DIR --to_hf=OUT, or --workdir=DIR --merge_lora --out=DIR2")
  if FLAGS.merge_lora:
    merge_lora(FLAGS.workdir, FLAGS.out, FLAGS.use_ema)
  elif FLAGS.from_hf:
    from_hf(FLAGS.from_hf, FLAGS.workdir, FLAGS.allow_torch_bin)
  else:
    to_hf(FLAGS.workdir, FLAGS.to_hf, FLAGS.overwrite, FLAGS.use_ema)


if __name__ == "__main__":
  cli.run(main, define_flags)
