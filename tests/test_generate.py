import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_config
from llm.errors import UserError
from llm.inference.sampling import Generator
from llm.runs import loading
from llm.runs.trainer import train

# Its tests share module fixtures: one pytest-xdist worker runs them all.
pytestmark = pytest.mark.xdist_group("generate")


PROMPTS = ["The for statement", "Class definitions are executable statements. A class"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("gen")
  workdir = str(tmp / "run")
  train(tiny_config(tmp, **{"train.steps": 30, "train.eval_every": 30,
                            "train.checkpoint_every": 30, "model.max_len": 48}), workdir)
  return workdir


@pytest.fixture(scope="module")
def gen(run_dir):
  return Generator(loading.load(run_dir))


def _ids(gen, texts):
  return [gen.tokenizer.encode(t) for t in texts]


def test_cached_greedy_equals_uncached(gen):
  cached = gen.generate(PROMPTS, max_new_tokens=12, temperature=0)
  uncached = gen.generate(PROMPTS, max_new_tokens=12, temperature=0, use_cache=False)
  assert cached == uncached
  assert all(len(s[0]) > 0 for s in cached)


def test_each_prompt_of_a_batch_gets_what_it_gets_alone(gen):
  batch = gen.generate(PROMPTS, max_new_tokens=12, temperature=0)
  alone = [gen.generate([p], max_new_tokens=12, temperature=0)[0] for p in PROMPTS]
  assert batch == alone


def test_top_k_1_and_a_tiny_top_p_equal_greedy(gen):
  greedy = gen.generate(PROMPTS, max_new_tokens=12, temperature=0)
  assert gen.generate(PROMPTS, max_new_tokens=12, temperature=1.0, top_k=1, seed=3) == greedy
  assert gen.generate(PROMPTS, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=4) == greedy


def test_seeds_repeat_and_differ(gen):
  a = gen.generate(PROMPTS, max_new_tokens=12, temperature=1.5, num_samples=2, seed=1)
  assert gen.generate(PROMPTS, max_new_tokens=12, temperature=1.5, num_samples=2, seed=1) == a
  assert gen.generate(PROMPTS, max_new_tokens=12, temperature=1.5, num_samples=2, seed=2) != a
  assert [len(s) for s in a] == [2, 2]


def test_stop_string_ends_the_text(gen):
  text = gen.generate(PROMPTS[:1], max_new_tokens=12, temperature=0)[0][0]
  stop = text[3:6]
  assert gen.generate(PROMPTS[:1], max_new_tokens=12, temperature=0, stop=stop)[0][0] == \
      text[:text.index(stop)]


def test_asking_for_more_than_the_context_fails_clearly(gen):
  with pytest.raises(UserError, match="more than the model's context of 48 tokens"):
    gen.generate(PROMPTS, max_new_tokens=48, temperature=0)
  for bad in (0, -3):
    with pytest.raises(UserError, match=f"max_new_tokens={bad}: ask for at least 1 new token"):
      gen.generate(PROMPTS, max_new_tokens=bad)


def test_cli(run_dir, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("\n".join(PROMPTS) + "\n")
  result = subprocess.run(
      [sys.executable, "-m", "llm.generate", f"--workdir={run_dir}", f"--prompt_file={prompts}",
       "--max_new_tokens=8", "--temperature=0"], cwd=ROOT, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr
  import json
  lines = [json.loads(l) for l in result.stdout.strip().splitlines()]
  assert [l["prompt"] for l in lines] == PROMPTS
  result = subprocess.run([sys.executable, "-m", "llm.generate", f"--workdir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 2 and "is not a run directory" in result.stderr


def test_messages_are_answered_through_the_runs_chat_template(run_dir, tmp_path):
  """--messages: a run given ChatML (kept in DIR/tokenizer/) answers a JSON conversation as
  the sampler does on the rendered prompt, cut at the end of turn."""
  import json
  import shutil
  from llm.text import chat
  chat_run = str(tmp_path / "chat_run")
  shutil.copytree(run_dir, chat_run)
  with open(os.path.join(chat_run, "tokenizer", "chat_template.jinja"), "w") as f:
    f.write(chat.CHATML)
  conversation = [{"role": "user", "content": "for"}]
  (tmp_path / "conversation.json").write_text(json.dumps(conversation))
  result = subprocess.run(
      [sys.executable, "-m", "llm.generate", f"--workdir={chat_run}", "--max_new_tokens=4",
       f"--messages={tmp_path / 'conversation.json'}", "--temperature=0"], cwd=ROOT,
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  [line] = [json.loads(l) for l in result.stdout.strip().splitlines()]
  gen = Generator(loading.load(chat_run))
  prompt = chat.Template(chat.CHATML).render(conversation, add_generation_prompt=True)
  [[expected]] = gen.generate([prompt], 4, temperature=0, stop="<|im_end|>")
  assert line["messages"] == conversation + [{"role": "assistant", "content": expected.strip()}]


def test_streaming_gives_the_text_piece_by_piece(gen):
  pieces = []
  text = gen.generate(PROMPTS[:1], max_new_tokens=12, temperature=0, stream=pieces.append)[0][0]
  assert len(pieces) > 1 and "".join(pieces) == text
