"""Benchmarks as lm-evaluation-harness scores them: the harness's own Hugging Face backend and
this project's adapter on the same random GPT-2, request by request; the in-process scorer
against both; the metrics by hand; fetching every benchmark from a local server."""

import functools
import http.server
import io
import json
import math
import os
import threading
import zipfile

import numpy as np
import pytest

from conftest import ROOT
from test_convert import save_hf_gpt2
from llm import data_sets
from llm.errors import UserError
from llm.evals import benchmarks, splits
from llm.runs import loading

pytestmark = pytest.mark.xdist_group("benchmarks")  # one converted model for the module

DATA = os.path.join(ROOT, "tests", "data", "benchmarks")
TASKS = """
task: tiny_arc
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}/arc.jsonl"}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
---
task: tiny_lambada
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}/lambada.jsonl"}}}}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list: [{{metric: perplexity, aggregation: perplexity, higher_is_better: false}},
              {{metric: acc}}]
---
task: tiny_rolling
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}/lambada.jsonl"}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}]
---
task: tiny_generate
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}/arc.jsonl"}}}}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answerKey}}}}"
generation_kwargs: {{until: ["\\n", "."], max_gen_toks: 6, do_sample: false}}
metric_list: [{{metric: exact_match}}]
"""
TASK_NAMES = ["tiny_arc", "tiny_lambada", "tiny_rolling", "tiny_generate"]


def save_hf_llama(directory, experts: int = 0):
  """A random Llama (with `experts`, a Mixtral: that many experts, top 2) with a byte-level BPE
  tokenizer.json whose post-processor starts every text with <s>, as Llama 3's does."""
  import torch
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  texts = [line for name in ("arc.jsonl", "lambada.jsonl") for line in open(f"{DATA}/{name}")]
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
  torch.manual_seed(0)
  shape = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               bos_token_id=0, eos_token_id=1, initializer_range=0.1)
  if experts:
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        num_local_experts=experts, num_experts_per_tok=2, **shape))
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
  model.eval().save_pretrained(directory)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))


@pytest.fixture(scope="module", params=["gpt2", "llama", "mixtral"])
def harness_runs(request, tmp_path_factory, test_data):
  """The harness's results and per-request answers for its `hf` backend on a random GPT-2 (or
  Llama) folder, and for this project's adapter on the same model converted."""
  import lm_eval
  from lm_eval.tasks import TaskManager
  from llm import convert
  from llm import lm_eval as llm_lm_eval
  tmp = tmp_path_factory.mktemp("harness")
  if request.param == "gpt2":
    save_hf_gpt2(tmp / "hf", test_data, init=0.1, n_layer=2, n_head=2, n_embd=64,
                 n_positions=64)
  else:
    save_hf_llama(tmp / "hf", experts=4 if request.param == "mixtral" else 0)
  convert.from_hf(str(tmp / "hf"), str(tmp / "run"))
  tasks = tmp / "tasks"
  tasks.mkdir()
  for i, text in enumerate(TASKS.format(data=DATA).split("---")):
    (tasks / f"task{i}.yaml").write_text(text)
  manager = TaskManager(include_path=str(tasks))
  evaluate = functools.partial(lm_eval.simple_evaluate, tasks=TASK_NAMES, task_manager=manager,
                               log_samples=True, bootstrap_iters=0)  # (no process pool)
  theirs = evaluate(model="hf", model_args={"pretrained": str(tmp / "hf"), "device": "cpu",
                                            "dtype": "float32"}, batch_size=4)
  ours = llm_lm_eval.evaluate(str(tmp / "run"), TASK_NAMES, include_path=str(tasks),
                              log_samples=True, bootstrap_iters=0)
  return theirs, ours, str(tmp / "run")


def _answers(results, task):
  return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.slow
def test_the_adapter_answers_every_request_as_the_harness_hf_model(harness_runs):
  theirs, ours, _ = harness_runs
  for task in ("tiny_arc", "tiny_lambada"):  # (log-likelihood, greedy) per request
    a, b = _answers(ours, task), _answers(theirs, task)
    logps = lambda answers: [r[0][0] for doc in answers for r in doc]
    np.testing.assert_allclose(logps(a), logps(b), atol=1e-4, rtol=1e-5)
    assert [r[0][1] for d in a for r in d] == [r[0][1] for d in b for r in d]
  rolling = lambda answers: [doc[0][0] for doc in answers]
  np.testing.assert_allclose(rolling(_answers(ours, "tiny_rolling")),
                             rolling(_answers(theirs, "tiny_rolling")), atol=1e-3, rtol=1e-5)
  assert _answers(ours, "tiny_generate") == _answers(theirs, "tiny_generate")
  for task in TASK_NAMES:  # and so the same scores
    for metric, value in theirs["results"][task].items():
      if isinstance(value, float) and "stderr" not in metric:
        assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4), (task, metric)


@pytest.mark.slow
def test_the_in_process_scorer_gives_the_harness_numbers(harness_runs):
  theirs, _, run_dir = harness_runs
  run = loading.load(run_dir)
  first = run.tokenizer.encode_with_specials("Question")[0]  # Llama's <s>, as its file says
  assert first == run.tokenizer.bos_id == 0 if run.tokenizer.kind == "hf" else first != 50256
  got = splits.score_benchmarks(
      run, [f"arc_easy:{DATA}/arc.jsonl", f"lambada:{DATA}/lambada.jsonl"], "", 0, 0, 8)
  arc, lam = theirs["results"]["tiny_arc"], theirs["results"]["tiny_lambada"]
  assert got["arc_easy"]["acc"] == arc["acc,none"]
  assert got["arc_easy"]["acc_norm"] == arc["acc_norm,none"]
  assert got["arc_easy"]["cut"] >= 4  # the long question's 4 choices do not fit 64 tokens
  assert got["lambada"]["acc"] == lam["acc,none"]
  assert got["lambada"]["perplexity"] == pytest.approx(lam["perplexity,none"], rel=1e-4)


class FixedScorer:
  """Scores requests with given log-likelihoods, in order (and greedy where the value is 0)."""
  max_len = 100

  def __init__(self, logps):
    self.logps = logps

  def encode(self, context, continuation):
    return [0] * len(context), [0] * len(continuation)

  def __call__(self, params, requests, progress=None):
    return [(lp, lp == 0.0) for lp in self.logps[:len(requests)]]


def test_acc_norm_and_lambada_by_hand():
  # Two questions; the longer correct choice loses on the sum but wins per character.
  examples = [benchmarks.Example((("q", " ab"), ("q", " abcdef")), 1, ("ab", "abcdef")),
              benchmarks.Example((("q", " x"), ("q", " yy")), 0, ("x", "yy"))]
  result = benchmarks.score(FixedScorer([-2.0, -3.0, -1.0, -1.5]), None, "arc_easy", examples)
  # acc: argmax [-2, -3] = 0 (wrong), [-1, -1.5] = 0 (right); per character: [-1, -0.5] -> 1
  # (right), [-1, -0.75] -> 1 (wrong).
  assert (result["acc"], result["acc_norm"]) == (0.5, 0.5)
  passages = [benchmarks.lambada({"text": text}, None) for text in ("a b c", "d e")]
  assert passages[0].requests == (("a b", " c"),)
  result = benchmarks.score(FixedScorer([0.0, -2.0]), None, "lambada", passages)
  assert result["acc"] == 0.5 and result["perplexity"] == pytest.approx(math.exp(1.0))


def test_the_harness_prompts_of_each_benchmark():
  hs = benchmarks.hellaswag({"activity_label": "Baking", "ctx_a": "She mixes the flour.",
                             "ctx_b": "then she", "endings": ["bakes [title] it.", "runs"],
                             "label": "0"}, None)
  assert hs.requests[0] == ("Baking: She mixes the flour. Then she", " bakes. it.")
  wg = benchmarks.winogrande({"sentence": "Tom gave Bob the book because _ was done.",
                              "option1": "Tom", "option2": "Bob", "answer": "2"}, None)
  assert wg.requests == (("Tom gave Bob the book because Tom", " was done."),
                         ("Tom gave Bob the book because Bob", " was done.")) and wg.gold == 1
  dev = [{"question": "1+1?", "subject": "math", "choices": ["1", "2", "3", "4"], "answer": 1}]
  mm = benchmarks.mmlu({"question": " 2+2? ", "subject": "high_school_math",
                        "choices": ["4", "5", "6", "7"], "answer": 0}, lambda subject: dev)
  assert mm.requests[0][0] == (
      "The following are multiple choice questions (with answers) about high school math.\n\n"
      "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n2+2?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:")
  assert [c for _, c in mm.requests] == [" A", " B", " C", " D"]


def test_bad_benchmark_input_is_one_line(tmp_path):
  with pytest.raises(UserError, match="no benchmark 'helaswag'; did you mean 'hellaswag'"):
    benchmarks.load("helaswag")
  bad = tmp_path / "arc.jsonl"
  bad.write_text('{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, '
                 '"answerKey": "A"}\n{"question": "no choices"}\n')
  with pytest.raises(UserError, match="arc.jsonl record 2: not a arc_easy record"):
    benchmarks.load(f"arc_easy:{bad}")
  bad.write_text("{not json\n")
  with pytest.raises(UserError, match="arc.jsonl line 1: not JSON"):
    benchmarks.load(f"arc_easy:{bad}")
  with pytest.raises(UserError, match="run `python -m llm.data_sets fetch piqa"):
    benchmarks.load("piqa", str(tmp_path))


def _serve(directory):
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server


def _parquet(rows) -> bytes:
  import pyarrow as pa
  import pyarrow.parquet as pq
  out = io.BytesIO()
  pq.write_table(pa.Table.from_pylist(rows), out)
  return out.getvalue()


def test_every_benchmark_is_fetched_and_checked(tmp_path, monkeypatch):
  """Each benchmark from a local server laid out like its source, then read by the scorer."""
  monkeypatch.setattr(data_sets, "print", lambda *a: None, raising=False)
  arc = [json.loads(line) for line in open(os.path.join(DATA, "arc.jsonl"))]
  mmlu = [{"question": "2+2?", "subject": "math", "choices": ["4", "5", "6", "7"], "answer": 0}]
  archive = io.BytesIO()
  with zipfile.ZipFile(archive, "w") as z:
    z.writestr("winogrande_1.1/dev.jsonl", json.dumps(
        {"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"}) + "\n")
  sources = {  # the files each source serves, by the name of its URL
      "hellaswag": {"hellaswag_val.jsonl": json.dumps(
          {"activity_label": "A", "ctx_a": "b", "ctx_b": "c", "endings": ["d", "e"],
           "label": 1}).encode() + b"\n"},
      "lambada": {"lambada_test.jsonl": open(os.path.join(DATA, "lambada.jsonl"), "rb").read()},
      "arc_easy": {"test-00000-of-00001.parquet": _parquet(arc)},
      "arc_challenge": {"test-00000-of-00001.parquet": _parquet(arc[:3])},
      "piqa": {"valid.jsonl": b'{"goal": "g", "sol1": "a", "sol2": "b"}\n',
               "valid-labels.lst": b"1\n"},
      "winogrande": {"winogrande_1.1.zip": archive.getvalue()},
      "mmlu": {"test-00000-of-00001.parquet": _parquet(mmlu),
               "dev-00000-of-00001.parquet": _parquet(mmlu)},
  }
  assert sources.keys() == benchmarks.BENCHMARKS.keys()
  for name, files in sources.items():
    for file, content in files.items():
      (tmp_path / "www" / name).mkdir(parents=True, exist_ok=True)
      (tmp_path / "www" / name / file).write_bytes(content)
  server = _serve(tmp_path / "www")
  try:
    url = f"http://127.0.0.1:{server.server_address[1]}"
    for name in sources:
      data_sets.fetch(name, str(tmp_path / "data"), mirror=f"{url}/{name}")
      _, examples = benchmarks.load(name, str(tmp_path / "data"), num_fewshot=0)
      assert examples
    assert benchmarks.load("piqa", str(tmp_path / "data"))[1][0].gold == 1
    assert len(benchmarks.load("mmlu", str(tmp_path / "data"), num_fewshot=1)[1][0].requests[0][0]
               .split("Answer:")) == 3  # one solved question, then the question
    (tmp_path / "www" / "hellaswag" / "hellaswag_val.jsonl").write_text('{"ctx_a": "b"}\n')
    with pytest.raises(UserError, match="hellaswag: line 1 of the downloaded hellaswag_val.jsonl "
                                        "is not a hellaswag record"):
      data_sets.fetch("hellaswag", str(tmp_path / "again"), mirror=f"{url}/hellaswag")
    assert not os.path.exists(tmp_path / "again" / "hellaswag_val.jsonl")
  finally:
    server.shutdown()


@pytest.mark.slow
def test_benchmarks_while_training_compile_once_survive_a_resume_and_are_drawn(tmp_path,
                                                                               monkeypatch):
  from conftest import read_metrics, tiny_config
  from llm import compare, plot
  from llm.evals import loglikelihood
  from llm.runs.trainer import train
  traces = []
  score_fn = loglikelihood.LogLikelihood._score_fn
  monkeypatch.setattr(loglikelihood.LogLikelihood, "_score_fn",
                      lambda self, *args: (traces.append(1), score_fn(self, *args))[1])
  config = lambda steps: tiny_config(tmp_path, **{
      "train.steps": steps, "train.eval_every": 2, "train.checkpoint_every": 2,
      "train.evals": f"arc_easy:{DATA}/arc.jsonl, lambada:{DATA}/lambada.jsonl"})
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train(config(4), straight)
  compiled_in_two_evaluations = len(traces)
  traces.clear()
  train(config(2), resumed)
  assert len(traces) == compiled_in_two_evaluations > 0  # the second compiled nothing
  train(config(4), resumed)
  lines = lambda run: [(m["split"], m["step"], m.get("acc_norm"), m.get("perplexity"))
                       for m in read_metrics(run) if m["split"] in ("arc_easy", "lambada")]
  assert [(split, step) for split, step, *_ in lines(straight)] == [
      ("arc_easy", 2), ("lambada", 2), ("arc_easy", 4), ("lambada", 4)]
  assert lines(resumed) == lines(straight)
  arc = [m for m in read_metrics(straight) if m["split"] == "arc_easy"][-1]
  assert arc["examples"] == 10 and 0 <= arc["acc"] <= 1 and arc["cut"] > 0  # 32-token context
  runs_ = [compare.RunSummary(straight), compare.RunSummary(resumed)]
  assert "arc_easy acc_norm  lambada acc" in compare.table(runs_)
  plot.plot(straight, str(tmp_path / "curves.png"))
  assert (tmp_path / "curves.png").stat().st_size > 0
