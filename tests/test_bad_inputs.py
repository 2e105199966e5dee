"""Bad input to the newest commands, as a careless user gives it: one line (`error: ...`) naming
the file, line, key or flag, exit status 2, and nothing written (the third fault round's
table). Each case is the command line a user would type."""

import json
import os
import shutil

import pytest

from conftest import config_file, read_metrics
from llm.errors import UserError
from llm.text import chat
from test_newcomer import one_error_line, run_cli

pytestmark = pytest.mark.slow

CONVERSATION = [{"role": "user", "content": "List three primary colors."}]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, base_run):
  """The base run given ChatML, as a chat fine-tune keeps it."""
  run = tmp_path_factory.mktemp("chat") / "run"
  shutil.copytree(base_run, run)
  (run / "tokenizer" / "chat_template.jinja").write_text(chat.CHATML)
  return str(run)


def _file(tmp_path, name: str, text: str) -> str:
  (tmp_path / name).write_text(text)
  return str(tmp_path / name)


def test_messages_reads_the_manuals_file_and_answers_it(tmp_path, chat_run):
  ask = _file(tmp_path, "ask.jsonl", json.dumps({"messages": CONVERSATION}))  # the manual's
  result = run_cli("llm.generate", f"--workdir={chat_run}", f"--messages={ask}",
                   "--max_new_tokens=3", "--temperature=0")
  assert result.returncode == 0, result.stderr
  [line] = result.stdout.strip().splitlines()
  assert json.loads(line)["messages"][:1] == CONVERSATION


MESSAGES_CASES = {  # file content -> the line
    "[]": "holds no conversation",
    json.dumps({"messages": [{"role": "user", "content": 5}]}):
        "conversation 1 of {file}: message 0 has content=5, not text",
    json.dumps({"messages": "hello"}):
        'conversation 1 of {file}: the conversation is "hello", not a list of',
    json.dumps([{"role": "robot", "content": "hi"}]):
        "conversation 1 of {file}: message 0 has the unknown role 'robot'",
    '{"messages": [\n': "line 1 of {file} is not JSON",
    json.dumps(CONVERSATION) + "\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n":
        "line 2 of {file}: message 0 is not a",
}


def test_bad_messages_files(tmp_path, chat_run):
  from llm import generate
  for number, (content, expected) in enumerate(MESSAGES_CASES.items()):
    path = _file(tmp_path, f"bad{number}.jsonl", content)
    with pytest.raises(UserError) as refused:
      generate._read_conversations(path)
    assert expected.format(file=path) in str(refused.value)
  result = run_cli("llm.generate", f"--workdir={chat_run}", f"--messages={path}")  # the last
  assert f"--messages: {expected.format(file=path)}" in one_error_line(result)


@pytest.mark.parametrize("flags, expected", [
    (["--prompt=Hi", "--num_samples=2", "--best_of=3"],
     "--messages answers each conversation once, from its messages: --prompt, --num_samples, "
     "--best_of would be ignored"),
    (["--top_p=0"], "--top_p=0: use a probability mass in (0, 1]"),
])
def test_flags_messages_cannot_use(tmp_path, chat_run, flags, expected):
  ask = _file(tmp_path, "ask.json", json.dumps(CONVERSATION))
  result = run_cli("llm.generate", f"--workdir={chat_run}", f"--messages={ask}", *flags)
  assert expected in one_error_line(result)


def test_messages_to_a_run_without_a_chat_template(tmp_path, base_run):
  ask = _file(tmp_path, "ask.json", json.dumps(CONVERSATION))
  result = run_cli("llm.generate", f"--workdir={base_run}", f"--messages={ask}")
  line = one_error_line(result)
  assert "has no chat template" in line and "--config.tokenizer.chat_template=chatml" in line


def test_evaluation_limits_and_a_hub_task_offline(base_run):
  assert "flag --limit=-3: -3 is not a non-negative integer" in one_error_line(
      run_cli("llm.evaluate", f"--workdir={base_run}", "--benchmark=arc_easy", "--limit=-3"))
  from llm import lm_eval
  with pytest.raises(UserError, match="--limit=0: use a number of examples per task"):
    lm_eval.evaluate(base_run, ["hellaswag"], limit=0)
  offline = run_cli("llm.lm_eval", f"--workdir={base_run}", "--tasks=hellaswag", "--limit=2",
                    env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
  assert "the harness could not read the data of hellaswag (ConnectionError" in one_error_line(
      offline)


def _rl_command(tmp_path, base_run, records, **overrides) -> list[str]:
  config = config_file(tmp_path, {"train.steps": 2, **overrides}, name="rl_config.py",
                       make=("test_rl.rl_config", base_run, records))
  return [f"--config={config}", f"--workdir={tmp_path / 'run'}"]


REWARD_MODULES = {  # task.rewards -> (its module's text, the line)
    "broken_syntax:f": ("def f(:\n", "broken_syntax.py, line 1:"),
    "raises_on_import:f": ("raise RuntimeError('no GPU here')\n",
                           "cannot load 'raises_on_import:f' (RuntimeError: no GPU here)"),
    ":f": ("", "':f' is not module:function"),
    ".rw:f": ("", "'.rw:f' is not module:function"),
    "exits:f": ("def f(p, c, r):\n  raise SystemExit('bye')\n", "reward 'exits:f' raised "
                "SystemExit: bye"),
}


def test_bad_reward_functions(tmp_path, base_run, records, monkeypatch):
  from llm.tasks import rl
  monkeypatch.syspath_prepend(str(tmp_path))
  for rewards, (text, expected) in REWARD_MODULES.items():
    module = rewards.split(":")[0].lstrip(".")
    if module:
      (tmp_path / f"{module}.py").write_text(text)
    with pytest.raises(UserError) as refused:
      [(_, _, function)] = rl.reward_functions(rewards)
      rl.Rewards.__call__(type("R", (), {"functions": [(rewards, 1.0, function)]})(),
                          ["p"], ["c"], [{}])
    assert expected in str(refused.value), rewards
  result = run_cli("llm.train", *_rl_command(tmp_path, base_run, records,
                                             **{"task.rewards": "broken_syntax:f"}),
                   env={**os.environ, "PYTHONPATH": str(tmp_path)})
  assert "broken_syntax.py, line 1:" in one_error_line(result)


def test_answer_rewards_need_answers(tmp_path, base_run):
  prompts = _file(tmp_path, "prompts.json", json.dumps([{"instruction": f"Say {i}."}
                                                        for i in range(12)]))
  result = run_cli("llm.train", *_rl_command(tmp_path, base_run, prompts,
                                             **{"task.rewards": "exact_match"}))
  assert (f"task.rewards=exact_match compares completions with each record's answer, but "
          f"record 1 of {prompts} has none") in one_error_line(result)
  assert not (tmp_path / "run").exists()


def test_a_classifier_cannot_start_grpo(tmp_path, base_run, records):
  classifier = tmp_path / "classifier"
  shutil.copytree(base_run, classifier)
  config = json.loads((classifier / "config.json").read_text())
  config["task"]["kind"] = "classify"
  (classifier / "config.json").write_text(json.dumps(config))
  result = run_cli("llm.train", *_rl_command(tmp_path, str(classifier), records))
  assert (f"init_from={classifier} is a task.kind=classify run (its model gives classes); "
          "task.kind=grpo trains a model that writes text") in one_error_line(result)


def test_bench_train_points_online_rl_to_bench_rl(tmp_path, base_run, records):
  config = config_file(tmp_path, {}, make=("test_rl.rl_config", base_run, records))
  result = run_cli("llm.bench", "train", f"--config={config}", "--steps=1")
  assert "task.kind=grpo samples its batches as it trains: time it with python -m llm.bench rl" \
      in one_error_line(result)


def test_settings_that_cannot_work(tmp_path):
  template = _file(tmp_path, "bad.jinja", "{% for m in messages %}{{ m.content }\n")
  cases = [
      (["--config=configs/gpt_tiny.py", "--config.train.steps=5",
        "--config.train.profile_steps=4:8"],
       "train.profile_steps='4:8' is not allowed; the run ends at train.steps=5"),
      (["--config=configs/gpt_tiny.py", f"--config.tokenizer.chat_template={template}"],
       f"tokenizer.chat_template={template}: line 1:"),
      (["--config=configs/bert_tiny.py", "--config.data.val_fraction=0.002"],
       "in the validation split"),
  ]
  for args, expected in cases:
    result = run_cli("llm.train", *args, f"--workdir={tmp_path / 'run'}")
    assert expected in one_error_line(result), args
    assert not (tmp_path / "run").exists()


def test_a_run_that_failed_before_its_first_checkpoint_may_start_again_changed(
    tmp_path, base_run, records):
  """A reward that fails at the first rollout leaves config.json; the corrected command is a
  new start, not a refused resume."""
  from llm.runs.trainer import train
  from test_rl import rl_config
  (tmp_path / "flaky.py").write_text("def f(p, c, r):\n  raise KeyError('answer')\n")
  import sys
  sys.path.insert(0, str(tmp_path))
  try:
    with pytest.raises(UserError, match="reward 'flaky:f' raised KeyError"):
      train(rl_config(tmp_path, base_run, records, **{"task.rewards": "flaky:f"}),
            str(tmp_path / "run"))
  finally:
    sys.path.remove(str(tmp_path))
  assert (tmp_path / "run" / "config.json").exists()
  train(rl_config(tmp_path, base_run, records, **{"task.rewards": "test_rl:vowels",
                                                   "train.steps": 2}), str(tmp_path / "run"))
  assert [m["step"] for m in read_metrics(tmp_path / "run") if m["split"] == "train"] == [1, 2]


def test_a_stop_that_skip_mode_caused_suggests_what_skip_mode_can_change(tmp_path):
  from conftest import tiny_config
  from llm.runs.trainer import train
  cfg = tiny_config(tmp_path, **{"train.lr": 1e6, "train.steps": 12,
                                 "train.on_nonfinite": "skip", "train.max_nonfinite": 1})
  with pytest.raises(UserError, match="or raise train.max_nonfinite$"):
    train(cfg, str(tmp_path / "run"))
