"""What a newcomer meets first: the README's commands, the tests in a fresh clone, config typos,
and fetching the example data sets."""

import dataclasses
import functools
import hashlib
import http.server
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import zipfile

import pytest

from conftest import ROOT, TEST_DATA


def run_cli(*args, cwd=ROOT, env=None):
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                        env=env, timeout=600)


def one_error_line(result) -> str:
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert "Traceback" not in result.stdout + result.stderr
  return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/gpt_tiny.py", "--config.train.setps=10"],
     "--config.train.setps: no such config key (did you mean train.steps?)"),
    (["--config=configs/gpt_tiny.py", "--config.trian.steps=10"],
     "--config.trian.steps: no such config key (did you mean train.steps?)"),
    (["--config=configs/gpt_tny.py"],
     "--config=configs/gpt_tny.py: no such config file (did you mean configs/gpt_tiny.py?)"),
    (["--config=configs/gpt_small.py:tinyy"], "configs/gpt_small.py: unknown variant 'tinyy'"),
    (["--config=configs/gpt_tiny.py", "--config.train.steps=many"], "--config.train.steps=many"),
])
def test_config_typos_give_one_line_with_the_closest_key(tmp_path, args, expected):
  result = run_cli("llm.train", *args, f"--workdir={tmp_path / 'run'}")
  assert expected in one_error_line(result)
  assert not (tmp_path / "run").exists()


def test_print_config_lists_every_key_with_its_meaning():
  result = run_cli("llm.train", "--config=configs/gpt_tiny.py", "--config.train.steps=7",
                   "--print_config")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  # The keys as a fresh process knows them (a test here may register a task of its own).
  described = subprocess.run(
      [sys.executable, "-c", "import json; from llm import config; "
       "print(json.dumps(config.describe_keys()))"], cwd=ROOT, capture_output=True, text=True,
      timeout=600)
  keys = json.loads(described.stdout)
  assert [line.split(" = ")[0] for line in lines] == list(keys)
  assert all(keys.values()), [k for k, v in keys.items() if not v]  # every key is explained
  assert "task.beta" in keys and keys["task.beta"].startswith("dpo: ")  # a task's own key
  assert "train.steps = 7" in result.stdout and "# optimizer steps" in result.stdout


@pytest.mark.slow
def test_no_test_or_module_reads_outside_the_repository(tmp_path):
  """The suite's data lives in tests/data: a copy of the repository with nothing beside it
  collects every test and passes the tests that read data files."""
  # The repository's own files: what a clone holds (not a virtual environment made inside it,
  # nor anything else a user keeps there untracked).
  files = subprocess.run(["git", "ls-files", "--cached"], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
  for name in files:
    if name.endswith(".py") or name == ".ci/run":
      text = open(os.path.join(ROOT, name)).read()
      assert not re.search(r"shared[/\"', ]+data|dirname\(ROOT\)", text), name
  clone = tmp_path / "alone" / "llm"
  for name in files:
    if os.path.isfile(os.path.join(ROOT, name)):
      os.makedirs(clone / os.path.dirname(name), exist_ok=True)
      shutil.copy(os.path.join(ROOT, name), clone / name)
  # (-n 0: one process is enough here; pytest.ini would start two workers)
  collected = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "--collect-only", "-q"],
                             cwd=clone, capture_output=True, text=True, timeout=600)
  assert collected.returncode == 0, collected.stdout[-2000:]
  assert re.search(r"\d+ tests collected", collected.stdout)
  result = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-q",
                           "tests/test_tokenizer.py"], cwd=clone, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stdout[-2000:]
  assert os.listdir(tmp_path / "alone") == ["llm"]


def manual_pages() -> list[str]:
  """The README, then the manual's pages in the order of mkdocs.yml's nav."""
  nav = re.findall(r":\s*(\S+\.md)\s*$", open(os.path.join(ROOT, "mkdocs.yml")).read(), re.M)
  return ["README.md"] + [os.path.join("docs", page) for page in nav]


def readme_commands() -> list[list[str]]:
  """The commands of the bash blocks of the README and the manual, in reading order, as
  argument lists."""
  text = "\n".join(open(os.path.join(ROOT, page)).read() for page in manual_pages())
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
      lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
      lexer.whitespace_split = True
      command = []
      for token in list(lexer) + [";"]:
        if token in (";", "&&", "|", "||"):
          if command:
            commands.append(command)
          command = []
        else:
          command.append(token)
  return commands


def _value(args, *names):
  for arg in args:
    for name in names:
      if arg.startswith(name + "="):
        return arg.split("=", 1)[1]
  return None


def test_readme_commands_use_only_what_earlier_commands_made():
  """Every run directory a command of the README or the manual reads was written by an earlier
  command, and every data file it names was fetched by an earlier `llm.data_sets fetch`."""
  from llm import data_sets
  made, fetched, checked = set(), set(), 0
  for args in readme_commands():
    if "-m" not in args:
      continue
    entry = args[args.index("-m") + 1]
    workdir = _value(args, "--workdir")
    if entry == "llm.data_sets" and "fetch" in args:
      name, directory = args[args.index("fetch") + 1:args.index("fetch") + 3]
      fetched |= {os.path.join(directory, f) for f in data_sets.DATA_SETS[name].files}
      continue
    path = _value(args, "--config.data.path", "--data.path")
    if path:
      assert path in fetched or os.path.isfile(os.path.join(ROOT, path)), (
          f"{' '.join(args)}: {path} was not fetched before")
      checked += 1
    init_from = _value(args, "--config.init_from")
    if init_from and not init_from.startswith("gs://"):
      assert init_from in made, f"{' '.join(args)}: {init_from} was not made before"
      checked += 1
    writes = entry == "llm.train" or (entry == "llm.convert" and _value(args, "--from_hf"))
    if writes:
      made.add(workdir)
    elif workdir and entry != "llm.bench":
      assert workdir in made, f"{' '.join(args)}: {workdir} was not made before"
      checked += 1
    if _value(args, "--out"):
      made.add(_value(args, "--out"))
  assert checked >= 20 and "runs/gpt_tiny" in made


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


@pytest.fixture
def mirror(tmp_path):
  """A file server on 127.0.0.1 holding copies of the sources, made from tests/data."""
  served = tmp_path / "served"
  served.mkdir()
  archive = io.BytesIO()
  with zipfile.ZipFile(archive, "w") as z:
    z.write(os.path.join(TEST_DATA, "sms_spam", "SMSSpamCollection"), "SMSSpamCollection")
    z.writestr("readme", "SMS Spam Collection v.1")
  (served / "sms+spam+collection.zip").write_bytes(archive.getvalue())
  shutil.copy(os.path.join(TEST_DATA, "instructions", "instruction-examples.json"),
              served / "instruction-data.json")
  shutil.copy(os.path.join(TEST_DATA, "gpt2", "encoder.json"), served / "encoder.json")
  shutil.copy(os.path.join(TEST_DATA, "gpt2", "vocab.bpe"), served / "vocab.bpe")
  (served / "instruction-data-with-preference.json").write_text(
      '[{"instruction": "x", "output": "y"}]')  # no chosen / rejected
  handler = functools.partial(_QuietHandler, directory=str(served))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{server.server_address[1]}", served
  server.shutdown()


def _pin_to(monkeypatch, name: str, *paths) -> None:
  """Pins data set `name` to the sha256 of `paths` (the test server's shortened copies)."""
  from llm import data_sets
  digests = tuple(hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths)
  monkeypatch.setitem(data_sets.DATA_SETS, name,
                      dataclasses.replace(data_sets.DATA_SETS[name], sha256=digests))


def test_fetch_writes_checked_files_from_the_source(tmp_path, mirror, monkeypatch):
  from llm import data_sets
  url, served = mirror
  out = tmp_path / "data"
  # The GPT-2 files served are the release's own bytes: their real pins check them. The others
  # are tests/data's first lines and records of theirs, pinned here to those.
  spam_copy = os.path.join(TEST_DATA, "sms_spam", "SMSSpamCollection")
  _pin_to(monkeypatch, "sms_spam", spam_copy)
  _pin_to(monkeypatch, "alpaca_book", served / "instruction-data.json")
  [spam] = data_sets.fetch("sms_spam", str(out), mirror=url)
  assert open(spam, "rb").read() == open(spam_copy, "rb").read()
  assert data_sets.fetch("gpt2_bpe", str(out), mirror=url) == [
      str(out / "encoder.json"), str(out / "vocab.bpe")]
  data_sets.fetch("alpaca_book", str(out), mirror=url)
  assert (out / "instruction-data.json").read_bytes() == (
      served / "instruction-data.json").read_bytes()
  (served / "instruction-data.json").write_text("not json")  # a file already there is kept
  data_sets.fetch("alpaca_book", str(out), mirror=url)
  assert (out / "instruction-data.json").read_bytes() != b"not json"


def test_fetch_fails_in_one_line_and_writes_nothing(tmp_path, mirror):
  url, served = mirror
  out = tmp_path / "data"
  (served / "vocab.bpe").write_bytes((served / "vocab.bpe").read_bytes().replace(b"e", b"E", 1))
  altered = run_cli("llm.data_sets", "fetch", "gpt2_bpe", str(out), f"--mirror={url}")
  assert re.search("gpt2_bpe: the downloaded vocab.bpe has sha256 [0-9a-f]{64}, not the pinned "
                   "1ce16647[0-9a-f]{56}; .* nothing was written", one_error_line(altered))
  bad = run_cli("llm.data_sets", "fetch", "preference_book", str(out), f"--mirror={url}")
  assert "the downloaded instruction-data-with-preference.json has sha256" in one_error_line(bad)
  offline = run_cli("llm.data_sets", "fetch", "verdict", str(out),
                    "--mirror=http://127.0.0.1:9")  # nothing listens on the discard port
  assert "could not download http://127.0.0.1:9/the-verdict.txt" in one_error_line(offline)
  assert "offline" in offline.stderr
  unknown = run_cli("llm.data_sets", "fetch", "wikipedia", str(out))
  assert "no data set 'wikipedia'" in one_error_line(unknown)
  assert not out.exists()  # not even the folder (encoder.json, which matched, is not written)


def test_a_fetched_file_of_the_wrong_format_is_refused(tmp_path, mirror, monkeypatch):
  from llm import data_sets
  from llm.errors import UserError
  url, served = mirror
  _pin_to(monkeypatch, "preference_book", served / "instruction-data-with-preference.json")
  with pytest.raises(UserError, match="records without 'chosen' and 'rejected'"):
    data_sets.fetch("preference_book", str(tmp_path / "data"), mirror=url)
  assert not (tmp_path / "data").exists()


def test_chatter_of_xla_and_gloo_is_hidden_and_the_rest_passes():
  from llm import cli
  read_end, write_end = os.pipe()
  out_read, out_write = os.pipe()
  thread = threading.Thread(target=cli._filter, args=(read_end, out_write))
  thread.start()
  for piece in [
      "start\n[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ",
      "ranks is : 1\n[Gloo] Rank [Gloo] Rank 0 is connected to 1 peer ranks. Expected 1\n",
      "0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n",
      "\rtrain:  25%|##  | 1/4",  # a progress bar: no newline
      "W1129 10:50:50.146451    9022 spmd_partitioner.cc:656] [SPMD] Involuntary full\n",
      "E1129 10:50:51.000001    9022 gpu_driver.cc:10] a real error\n",
      "step 2: eval loss 7.5\n"]:
    os.write(write_end, piece.encode())
  os.close(write_end)
  thread.join(timeout=10)
  os.close(out_write)
  shown = os.read(out_read, 65536).decode()
  assert shown == ("start\n\rtrain:  25%|##  | 1/4"
                   "E1129 10:50:51.000001    9022 gpu_driver.cc:10] a real error\n"
                   "step 2: eval loss 7.5\n")


@pytest.mark.slow
def test_training_needs_no_compiler(tmp_path):
  """A machine without a C++ compiler trains: the run's PATH holds Python and, in place of
  every compiler, a script that records being called and fails. None is called."""
  bin_dir, called = tmp_path / "bin", tmp_path / "compiler-called"
  bin_dir.mkdir()
  os.symlink(sys.executable, bin_dir / "python")
  for name in ("cc", "c++", "gcc", "g++", "clang", "clang++", "ld"):
    (bin_dir / name).write_text(f"#!/bin/sh\necho {name} >> {called}\nexit 1\n")
    (bin_dir / name).chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX", "LD")}
  env["PATH"] = str(bin_dir)
  result = run_cli("llm.train", "--config=configs/gpt_tiny.py", f"--workdir={tmp_path / 'run'}",
                   "--config.train.steps=2", "--config.train.eval_every=2",
                   "--config.model.num_layers=1", "--config.model.d_model=64",
                   "--config.model.d_ff=128", "--config.model.num_heads=2",
                   "--config.tokenizer.vocab_size=512", "--config.train.batch_size=4",
                   f"--config.data.cache_dir={tmp_path / 'cache'}", env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert not called.exists(), called.read_text()
  assert '"split": "eval"' in (tmp_path / "run" / "metrics.jsonl").read_text()
