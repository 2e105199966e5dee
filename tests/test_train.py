import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TEST_DATA, read_metrics, tiny_config
from llm import config as config_lib
from llm.errors import UserError
from llm.runs import loading
from llm.runs.trainer import train


def _losses(workdir, split="train"):
  return {m["step"]: m["loss"] for m in read_metrics(workdir) if m["split"] == split}


def test_loss_falls_and_the_run_directory_is_complete(tmp_path):
  workdir = str(tmp_path / "run")
  cfg = tiny_config(tmp_path, **{"train.steps": 40, "train.eval_every": 20,
                                 "train.checkpoint_every": 20})
  final = train(cfg, workdir)
  losses = _losses(workdir)
  assert abs(losses[1] - math.log(512)) < 0.3  # starts near uniform over the vocabulary
  assert losses[40] < losses[1] - 0.8
  assert final["loss"] < _losses(workdir, "eval")[20]
  assert set(os.listdir(workdir)) >= {"config.json", "metrics.jsonl", "tokenizer", "checkpoints"}
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  line = read_metrics(workdir)[-2]
  assert set(line) == {"step", "split", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"}
  assert line["tokens_per_sec"] > 0 and 0 < line["mfu"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["d_model"] == 32


def test_config_is_resolved_once_and_evaluate_scores_the_validation_split(tmp_path):
  from llm.runs import rundir
  workdir = str(tmp_path / "run")
  cfg = tiny_config(tmp_path, **{"train.steps": 2, "train.eval_batches": 10_000,
                                 "data.max_length": 0})
  final = train(cfg, workdir)
  assert cfg.data.max_length == 0  # the caller's config is not edited ...
  saved = rundir.read_config(workdir)
  assert saved.data.max_length == 32  # ... the resolved one says what ran: the model's context
  with pytest.raises(AttributeError):  # and is frozen
    saved.data.max_length = 16
  run = loading.load(workdir)
  result = run.task.perplexity(run)  # every validation window, as in training
  assert result["loss"] == pytest.approx(final["loss"], rel=1e-5)
  assert result["tokens"] == final["tokens"] > 1000


def test_a_finished_run_says_so(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  cfg = tiny_config(tmp_path, **{"train.steps": 2})
  train(cfg, workdir)
  before = open(os.path.join(workdir, "metrics.jsonl")).read()
  train(cfg, workdir)
  assert "already trained to step 2" in capsys.readouterr().out
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == before


@pytest.mark.parametrize("overrides,message", [
    ({"model.d_model": 33}, "model.d_model=33 is not allowed; must be divisible by"),
    ({"data.stride": 0}, "data.stride=0"),
    ({"tokenizer.kind": "morse"}, "tokenizer.kind='morse'"),
    ({"data.max_length": 64}, "must be at most model.max_len=32"),
    ({"mesh.data": 3}, "but there are 1"),
])
def test_bad_config_fails_before_touching_the_run(tmp_path, overrides, message):
  workdir = tmp_path / "run"
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
    train(tiny_config(tmp_path, **overrides), str(workdir))
  assert not workdir.exists()


def test_bad_input_fails_in_one_line_before_touching_the_run(tmp_path):
  files = {"empty.txt": b"", "short.txt": b"Only a few words here. " * 3,
           "binary.txt": bytes(range(256)) * 4,
           "bad.jsonl": b'{"text": "a"}\n{"text": "b"\n{"text": "c"}\n',
           "nolabel.csv": b"label,text\nham,hello\n,no label\nspam,win\nham,\n"}
  for name, content in files.items():
    (tmp_path / name).write_bytes(content)
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "config.json").write_text('{"model": {')
  gpt2 = {"tokenizer.kind": "gpt2", "tokenizer.path": os.path.join(TEST_DATA, "gpt2")}
  cases = [
      ({"data.path": str(tmp_path / "missing.txt")}, "no such file"),
      ({"data.path": str(tmp_path / "empty.txt")}, "empty.txt' is empty"),
      ({"data.path": str(tmp_path / "short.txt"), **gpt2}, "fewer than one window"),
      ({"data.path": str(tmp_path / "binary.txt")}, "binary.txt line 2 is not UTF-8 text"),
      ({"data.path": str(tmp_path / "bad.jsonl")}, "bad.jsonl line 2 is not valid JSON"),
      ({"data.path": str(tmp_path / "nolabel.csv"), "task.kind": "classify"},
       r"2 of 4 records \(number 2, 4, counting from 1\) lack a value for text or label"),
      ({"init_from": str(tmp_path / "nowhere")}, "nowhere: no such folder"),
      ({"init_from": str(hf)}, "config.json has no 'n_embd', which a gpt2 config needs"),
      ({"init_from": str(broken)}, "broken/config.json is not valid JSON"),
  ]
  for overrides, message in cases:
    workdir = tmp_path / "run"
    init_from = overrides.pop("init_from", "")
    cfg = tiny_config(tmp_path, **overrides)
    cfg.init_from = init_from
    with pytest.raises(UserError, match=message):
      train(cfg, str(workdir))
    assert not workdir.exists()


def test_unreachable_hub_data_set_fails_clearly(tmp_path, monkeypatch):
  import datasets
  import huggingface_hub
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 would
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(UserError, match="could not read data from 'nobody/no-such-dataset'"):
    train(tiny_config(tmp_path, **{"data.hf_name": "nobody/no-such-dataset"}),
          str(tmp_path / "run"))


def test_cli_prints_one_line_and_keeps_what_was_saved(tmp_path):
  workdir = tmp_path / "run"
  cfg = tiny_config(tmp_path, **{"train.steps": 2})
  train(cfg, str(workdir))
  saved = sorted(os.listdir(workdir / "checkpoints"))
  result = subprocess.run(
      [sys.executable, "-m", "llm.train", "--config=configs/gpt_tiny.py", f"--workdir={workdir}",
       "--config.model.num_heads=3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: config: model.d_model=256 is not allowed; must be divisible by model.num_heads=3 "
      "(or set model.head_dim)"]
  assert sorted(os.listdir(workdir / "checkpoints")) == saved


def test_shipped_configs_are_valid():
  import importlib.util
  for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
    if not name.endswith(".py"):
      continue
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config_lib.validate(module.get_config())
    for variant in VARIANTS.get(name, ()):
      config_lib.validate(module.get_config(variant))


VARIANTS = {"gpt_small.py": ("tiny",), "llama_small.py": ("tiny",),
            "finetune_classify.py": ("lora",), "finetune_instruct.py": ("lora",),
            "reward.py": ("lora",), "dpo.py": ("lora",)}
