"""The lm-eval plugin: the model `harness`, the task harness_bpb (parity with the harness
evaluator, for every adapter), the local copy of arc_easy, `harness lm-eval`, and the
bytes <-> text mapping. lm-eval is imported once; one tiny run per adapter is trained
once for the module, on a corpus whose windows cut multi-byte characters and hold
invalid UTF-8, with the network unreachable while lm-eval runs."""

import argparse
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.api import registry
from harness.errors import HarnessError
from harness.run.evaluate import window_nll
from harness.lm_eval_plugin import RAW_BYTE_BASE, TASKS_DIR, HarnessLM, bytes_to_text, task_manager, text_to_bytes
from harness.lm_eval_plugin.model import scoring_windows
from harness.commands.lm_eval import add_parser
from harness.run.records import read_record, read_suite_records
from harness.orchestrate.runner import run_suite
from tests.conftest import ROOT, SMALL_CONFIGS, tiny_suite

import lm_eval  # noqa: E402  (after the plugin: the plugin must work whatever the import order)
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model, model_registry

WINDOW = 64
# One tiny config per adapter for the parity test. Every registered adapter needs an entry
# (test_every_adapter_has_a_parity_config); entries for adapters not registered are ignored.
ADAPTERS = [name for name in SMALL_CONFIGS if name in registry.available()]


def tricky_corpus() -> bytes:
    """Prose with multi-byte characters (cut by window edges), invalid UTF-8, NUL bytes and
    a genuine U+10FF80 (the first character of the plugin's raw-byte range)."""
    from harness.run.data import embedded_corpus

    prose = embedded_corpus("pydoc-topics", 24_000)
    extras = ["naïve café — ", "日本語のテキスト ", "😀 ", "\U0010ff80 "]
    pieces = []
    for i in range(0, len(prose), 200):
        pieces.append(prose[i : i + 200])
        pieces.append(extras[(i // 200) % 4].encode())
        if (i // 200) % 5 == 0:
            pieces.append(b"\xff\x80\x00\xc3")  # invalid UTF-8 and a NUL
    return b"".join(pieces)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(autouse=True)
def no_environment_report(monkeypatch):
    """simple_evaluate's environment report (torch's collect_env: pip list and other subprocesses,
    about 3 s a call) is not under test here."""
    import lm_eval.evaluator

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One trained tiny run per adapter: {adapter: run directory}."""
    root = tmp_path_factory.mktemp("lm_eval_runs")
    (root / "corpus.txt").write_bytes(tricky_corpus())
    suite = tiny_suite(
        name="plugin", corpus={"files": "corpus.txt"},
        split={"train_bytes": 16384, "val_bytes": 4 * WINDOW, "test_bytes": 16 * WINDOW},
        eval={"window": WINDOW, "max_windows": 16, "batch_windows": 16}, budgets=[1.2e8], count_auxiliary_flops=False,
        trainer={"batch_windows": 4, "log_every": 2},
        models=[{"name": name, "adapter": name, "config": SMALL_CONFIGS[name]} for name in ADAPTERS])
    (root / "suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HARNESS_CACHE_DIR", str(root / "cache"))  # tokenizer cache
        out = run_suite(root / "suite.yaml", root / "results", "cpu", show_progress=False)
    return {r.model.adapter: out / "runs" / r.run_id for r in read_suite_records(out)}


@pytest.fixture(scope="module")
def bytes_lm(runs):
    return HarnessLM(pretrained=str(runs["bytes"]), device="cpu", batch_size=8)


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def evaluator_window_nll(model, sequence: bytes) -> float:
    windows = torch.tensor(list(sequence)).view(1, -1)
    return float(window_nll(model, windows, 1, torch.device("cpu"))[0])


# ---- bytes <-> text -------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64)
       | st.text(max_size=16).map(lambda s: s.encode("utf-8", "surrogatepass"))
       | st.lists(st.sampled_from([b"a", "é".encode(), b"\xff", b"\xf4\x8f", "\U0010ff80".encode(), "\U0010ffff".encode(),
                                   "\U0010ff7f".encode()]), max_size=12).map(b"".join))
def test_bytes_to_text_is_lossless_and_valid_unicode(data):
    text = bytes_to_text(data)
    assert text_to_bytes(text) == data
    text.encode("utf-8")  # no lone surrogates: storable in Arrow and JSON


def test_bytes_to_text_leaves_valid_text_alone_and_escapes_the_rest():
    assert bytes_to_text("naïve 日本 😀".encode()) == "naïve 日本 😀"
    assert bytes_to_text(b"a\xffb") == "a" + chr(RAW_BYTE_BASE + 0xFF) + "b"
    assert bytes_to_text("é".encode()[:1]) == chr(RAW_BYTE_BASE + 0xC3)  # a character cut in two
    genuine = "\U0010ff80".encode()
    assert bytes_to_text(genuine) == "".join(chr(RAW_BYTE_BASE + b) for b in genuine)
    assert text_to_bytes("plain") == b"plain"


# ---- the model ------------------------------------------------------------------------------

def test_model_is_registered_next_to_the_builtins():
    assert get_model("harness") is HarnessLM
    assert "hf" in model_registry and "dummy" in model_registry
    # importing the module again (under another name) neither fails nor replaces the model
    spec = importlib.util.spec_from_file_location("harness_plugin_again", ROOT / "harness" / "lm_eval_plugin" / "model.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert get_model("harness") is HarnessLM


def test_model_rejects_what_is_not_a_run_and_unknown_variants(tmp_path, runs):
    with pytest.raises(HarnessError, match="not a harness run directory"):
        HarnessLM(pretrained=str(tmp_path))
    with pytest.raises(HarnessError, match="no evaluation variant"):
        HarnessLM(pretrained=str(runs["bytes"]), eval_variant="topk")


def test_rolling_scores_long_documents_in_evaluator_windows(bytes_lm):
    document = bytes(range(256)) * 2 + "é".encode()[:1]  # eight windows and a one-byte tail (a cut character)
    text = bytes_to_text(document)
    expected = -sum(evaluator_window_nll(bytes_lm.model, document[i : i + WINDOW]) for i in range(0, len(document), WINDOW))
    old, new = bytes_lm.loglikelihood_rolling([request("loglikelihood_rolling", text),  # lm-eval 0.4: (text,)
                                               request("loglikelihood_rolling", "", text)])  # 0.5: ("", text)
    assert old == pytest.approx(expected, rel=1e-6) and new == old
    assert bytes_lm.loglikelihood_rolling([request("loglikelihood_rolling", "")]) == [0.0]
    with pytest.raises(HarnessError, match="non-empty context"):
        bytes_lm.loglikelihood_rolling([request("loglikelihood_rolling", "context", text)])


def test_loglikelihood_sums_the_continuation_bytes(bytes_lm):
    context, continuation = "The quick brown fox", " jumps"
    (ll, _), = bytes_lm.loglikelihood([request("loglikelihood", context, continuation)])
    joint = torch.tensor(list((context + continuation).encode())).view(1, -1)
    with torch.no_grad():
        logprobs = F.log_softmax(bytes_lm.model.next_byte_logits(joint).float(), dim=-1)[0]
    n = len(continuation)
    expected = float(logprobs[-n:].gather(-1, joint[0, -n:, None]).sum())
    assert ll == pytest.approx(expected, rel=1e-5)
    # context longer than the window: only the last W bytes are seen
    long_context = "x" * 100 + context
    (truncated, _), = bytes_lm.loglikelihood([request("loglikelihood", long_context, continuation)])
    (same, _), = bytes_lm.loglikelihood([request("loglikelihood", long_context[-(WINDOW - n):], continuation)])
    assert truncated == pytest.approx(same, rel=1e-5)


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 40), st.integers(0, 200), st.integers(0, 200))
def test_scoring_windows_score_every_continuation_byte_once_with_enough_context(window, context, continuation):
    total = context + continuation
    windows = scoring_windows(context, total, window)
    scored = [q for start, end, n in windows for q in range(end - n, end)]
    assert scored == list(range(context, total))  # every continuation byte, once, in order
    for start, end, n in windows:
        assert 0 <= start < end <= total and end - start <= window and 1 <= n <= end - start
        first_context = end - n - start  # the context the first scored byte sees inside the window
        assert first_context == end - n or first_context >= window // 2
    if total <= window:
        assert windows == ([(0, total, continuation)] if continuation else [])


def test_loglikelihood_scores_every_byte_of_a_continuation_longer_than_the_window(bytes_lm):
    context = b"Question: name the bytes. Answer:" * 2
    continuation = bytes(range(32, 127)) + "é日本".encode() * 10  # 155 bytes, about 2.4 windows
    (ll, greedy), = bytes_lm.loglikelihood([request("loglikelihood", bytes_to_text(context), bytes_to_text(continuation))])
    joint = context + continuation
    expected = 0.0
    with torch.no_grad():  # directly: one forward pass per continuation byte, over its window's bytes up to it
        for start, end, n in scoring_windows(len(context), len(joint), WINDOW):
            for q in range(end - n, end):
                inputs = torch.tensor(list(joint[start : q + 1])).view(1, -1)
                logprobs = F.log_softmax(bytes_lm.model.next_byte_logits(inputs).float(), dim=-1)
                expected += float(logprobs[0, -1, joint[q]])
    assert ll == pytest.approx(expected, rel=1e-5)
    assert len(scoring_windows(len(context), len(joint), WINDOW)) >= 3 and greedy is False


def test_token_path_joint_minus_context_is_exact_for_a_byte_model(bytes_lm, monkeypatch):
    """The tokenizer route, log P(ctx + cont) - log P(ctx), equals the byte-level route on a byte-causal model."""
    pairs = [("Question: what is 2 + 2?\nAnswer:", " 4"), ("", "hello"), ("abc" * 30, " défi"),
             ("context " * 12, "a continuation longer than the window, scored in several windows " * 2)]
    exact = bytes_lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    monkeypatch.setattr(bytes_lm, "byte_level", False)
    approx = bytes_lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for (a, _), (b, greedy) in zip(exact, approx):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-4) and greedy is False
    with pytest.raises(HarnessError, match="byte-level adapter"):
        bytes_lm.generate_until([request("generate_until", "abc", {"until": ["\n"]})])


def test_generate_until_is_greedy_and_stops(bytes_lm):
    context = "The harness scores bytes"
    free, = bytes_lm.generate_until([request("generate_until", context, {"max_gen_toks": 24})])
    generated = text_to_bytes(free)
    assert len(generated) == 24
    (ll, greedy), = bytes_lm.loglikelihood([request("loglikelihood", context, free)])
    assert greedy and ll < 0
    altered = bytes([(generated[0] + 1) % 256]) + generated[1:]
    (_, greedy), = bytes_lm.loglikelihood([request("loglikelihood", context, bytes_to_text(altered))])
    assert not greedy
    stop = generated[10:12]
    cut = generated.find(stop)
    stopped, = bytes_lm.generate_until([request("generate_until", context, {"until": [bytes_to_text(stop), "\x01\x02\x03"],
                                                                           "max_gen_toks": 24})])
    assert text_to_bytes(stopped) == generated[:cut]
    with pytest.raises(HarnessError, match="greedily"):
        bytes_lm.generate_until([request("generate_until", context, {"do_sample": True})])


# ---- the tasks ------------------------------------------------------------------------------

def test_every_adapter_has_a_parity_config():
    missing = sorted(set(registry.available()) - set(SMALL_CONFIGS))
    assert not missing, f"add a tiny config for {missing} to SMALL_CONFIGS"


def test_task_folder_is_indexed_like_lm_eval_ls_tasks_does():
    """`lm-eval ls tasks --include_path TASKS_DIR` prints this TaskManager's index."""
    manager = task_manager(include_defaults=False)
    assert {"harness_bpb", "harness_arc_easy_local"} <= set(manager.all_tasks)
    assert "harness_bpb" in manager.list_all_tasks()
    config = yaml.safe_load((TASKS_DIR / "harness_bpb.yaml").read_text().replace("!function ", ""))
    assert config["doc_to_target"] == "text" and config["output_type"] == "loglikelihood_rolling"
    assert {m["metric"]: m["aggregation"] for m in config["metric_list"]} == {
        "bits_per_byte": "bits_per_byte", "byte_perplexity": "weighted_perplexity", "word_perplexity": "weighted_perplexity"}


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_harness_bpb_matches_the_evaluator(runs, adapter, no_network):
    run_dir = runs[adapter]
    record = read_record(run_dir / "record.json")
    lm = HarnessLM(pretrained=str(run_dir), device="cpu", batch_size=16)
    results = lm_eval.simple_evaluate(model=lm, tasks=["harness_bpb"], task_manager=task_manager(
        include_defaults=False, pretrained=str(run_dir)), log_samples=True, bootstrap_iters=0)
    metrics = results["results"]["harness_bpb"]
    assert metrics["bits_per_byte,none"] == pytest.approx(record.test.bpb, rel=1e-4)
    assert metrics["byte_perplexity,none"] == pytest.approx(2 ** record.test.bpb, rel=1e-3)
    assert math.isfinite(metrics["word_perplexity,none"])
    samples = results["samples"]["harness_bpb"]
    assert len(samples) == record.test.windows == 16
    assert sum(len(text_to_bytes(s["doc"]["text"])) for s in samples) == record.test.bytes
    assert any(ord(c) >= RAW_BYTE_BASE + 0x80 for s in samples for c in s["doc"]["text"])  # cut or invalid bytes present
    for sample in samples:  # document by document, the evaluator's window NLL
        loglikelihood = float(sample["filtered_resps"][0])
        expected = record.test.window_nll_nats[sample["doc"]["window"]]
        assert -loglikelihood == pytest.approx(expected, rel=1e-4, abs=1e-5)
    documents = [request("loglikelihood_rolling", s["doc"]["text"]) for s in samples]
    for name, variant in record.test_variants.items():  # other evaluation rules (ByteFlow's top-K)
        scored = HarnessLM(pretrained=str(run_dir), device="cpu", batch_size=16, eval_variant=name)
        bpb = -sum(scored.loglikelihood_rolling(documents)) / (math.log(2) * record.test.bytes)
        assert bpb == pytest.approx(variant.bpb, rel=1e-4)


def test_harness_bpb_reads_a_suite_file_or_results_dir(runs):
    from harness.lm_eval_plugin.tasks import utils

    run_dir = runs["bytes"]
    results_dir = run_dir.parent.parent
    from_run = utils.test_windows(pretrained=str(run_dir))
    assert utils.test_windows(suite=str(results_dir)) == from_run
    assert utils.test_windows(suite=str(results_dir.parent.parent / "suite.yaml")) == from_run
    assert len(from_run) == 16 and all(len(w) == WINDOW for w in from_run)
    with pytest.raises(HarnessError, match="which suite"):
        utils.test_windows()
    with pytest.raises(HarnessError, match="--metadata"):
        utils.test_windows(pretrained="gpt2")


@pytest.fixture
def fast_task_index(monkeypatch):
    """lm-eval's CLI indexes its ~15k built-in task files (about 20 s); index only arc and the plugin."""
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager
    arc = Path(lm_eval.tasks.__file__).parent / "arc"

    class ArcAndPluginOnly(real):
        def __init__(self, include_path=None, include_defaults=True, **kwargs):
            paths = include_path if isinstance(include_path, list) else [include_path] if include_path else []
            super().__init__(include_path=[str(arc), *paths], include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", ArcAndPluginOnly)


def test_harness_lm_eval_command_runs_the_plugin_task_and_arc_easy_offline(runs, tmp_path, fast_task_index, no_network,
                                                                            bytes_lm):
    top = argparse.ArgumentParser(prog="harness")
    add_parser(top.add_subparsers(dest="command"))
    run_dir = runs["bytes"]
    args = top.parse_args(["lm-eval", "--model", "harness", "--model_args", f"pretrained={run_dir}",
                           "--tasks", "harness_bpb,harness_arc_easy_local", "--device", "cpu", "--batch_size", "16",
                           "--output_path", str(tmp_path / "out")])
    args.func(args)
    output = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())
    record = read_record(run_dir / "record.json")
    assert output["results"]["harness_bpb"]["bits_per_byte,none"] == pytest.approx(record.test.bpb, rel=1e-4)
    # arc_easy's own prompt and choices on the local questions, scored through HarnessLM.loglikelihood
    from harness.lm_eval_plugin.tasks.utils import arc_easy_local

    correct = []
    for doc in arc_easy_local()["test"]:
        lls = bytes_lm.loglikelihood([request("loglikelihood", f"Question: {doc['question']}\nAnswer:", f" {choice}")
                                      for choice in doc["choices"]["text"]])
        best = max(range(len(lls)), key=lambda i: lls[i][0])
        correct.append(best == doc["choices"]["label"].index(doc["answerKey"]))
    assert output["results"]["arc_easy"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_a_users_multiple_choice_task_from_a_local_file_runs_quietly(runs, tmp_path, bytes_lm, no_network, capfd,
                                                                   monkeypatch):
    """A 4-way multiple choice over a local JSONL file, passed with --include_path, run outside a git
    checkout: no "fatal: not a git repository" (lm-eval's git probe) and no `--metadata` hint."""
    questions = [
        {"question": "Which word names a colour?", "choices": ["table", "green", "river", "seven"], "answer": 1},
        {"question": "What does a harness measure?", "choices": ["bits per byte", "apples", "rain",
                                                                  "a choice much longer than the evaluation window, "
                                                                  "so that it is scored in more than one window"],
         "answer": 0},
        {"question": "Pick the number.", "choices": ["cat", "dog", "bird", "42"], "answer": 3},
    ]
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "my_choice.yaml").write_text(yaml.safe_dump({
        "task": "my_choice", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}))
    top = argparse.ArgumentParser(prog="harness")
    add_parser(top.add_subparsers(dest="command"))
    monkeypatch.chdir(tmp_path)  # not a git checkout
    monkeypatch.setattr("lm_eval.tasks.TaskManager.__init__", _no_builtin_index(), raising=True)
    args = top.parse_args(["lm-eval", "--model", "harness", "--model_args", f"pretrained={runs['bytes']}",
                           "--tasks", "my_choice,harness_bpb", "--include_path", str(tasks), "--device", "cpu",
                           "--output_path", str(tmp_path / "out")])
    args.func(args)
    err = capfd.readouterr().err
    assert "not a git repository" not in err and "--metadata" not in err
    output = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())
    correct = []
    for q in questions:
        lls = bytes_lm.loglikelihood([request("loglikelihood", f"Question: {q['question']}\nAnswer:", f" {choice}")
                                      for choice in q["choices"]])
        correct.append(max(range(4), key=lambda i: lls[i][0]) == q["answer"])
    assert output["results"]["my_choice"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def _no_builtin_index():
    """TaskManager.__init__ without lm-eval's ~15k built-in task files (about 20 s)."""
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager.__init__

    def init(self, *args, **kwargs):
        kwargs["include_defaults"] = False
        real(self, *args, **kwargs)

    return init


@pytest.mark.slow
def test_lm_eval_ls_tasks_and_harness_lm_eval_with_the_full_task_index(runs, tmp_path):
    """The real thing, in subprocesses: lm-eval's own `ls tasks --include_path`, and the harness command
    with lm-eval's full built-in index (covered faster by the two tests above)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    listing = subprocess.run([sys.executable, "-m", "lm_eval", "ls", "tasks", "--include_path", str(TASKS_DIR)],
                             capture_output=True, text=True, env=env, timeout=600)
    assert listing.returncode == 0 and "harness_bpb" in listing.stdout and "harness_arc_easy_local" in listing.stdout
    done = subprocess.run([sys.executable, "-m", "harness.commands.lm_eval", "--model", "harness", "--model_args",
                           f"pretrained={runs['bytes']}", "--tasks", "harness_bpb,harness_arc_easy_local", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "harness_bpb" in done.stdout and "arc_easy (local data)" in done.stdout
