"""End to end: the smoke suite, determinism, resume after kill -9, the report."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness.cli import main
from harness.errors import HarnessError
from harness.run.records import read_suite_records
from harness.run.checkpoint import load_checkpoint
from harness.orchestrate.runner import run_suite
from tests.checks import kill_while_training
from tests.conftest import ROOT, tiny_suite


def test_smoke_suite_beats_order0_entropy_and_reports(tmp_path, capsys):
    assert main(["run", str(ROOT / "suites" / "smoke.yaml"), "--results", str(tmp_path), "--quiet", "--device", "cpu"]) == 0
    out = tmp_path / "smoke"
    records = read_suite_records(out)
    suite = json.loads((out / "suite.json").read_text())
    order0 = suite["corpora"]["pydoc-topics"]["references"]["test"]["order0_entropy_bpb"]
    bytes_run = next(r for r in records if r.model.adapter == "bytes")
    assert bytes_run.test.bpb < order0
    # BLT's entropy model learned something: below the order-0 entropy of bytes it never trained on
    blt = next(r for r in records if r.model.name == "blt-entropy")
    entropy_model = blt.preparation.facts["entropy_model"]
    assert entropy_model["test_bpb"] < entropy_model["order0_bpb"] and blt.preparation.facts["warnings"] == []
    # the record holds what docs/protocols.md, "5. Records", lists
    for key in ("suite", "run_id", "config_hash", "corpus", "parameters", "flops_per_byte", "budget_flops",
                "bytes_seen", "epochs", "loss_curve", "val", "test", "bytes_per_unit", "wall_seconds",
                "achieved_flops_per_s", "mfu", "versions"):
        assert hasattr(bytes_run, key), key
    assert bytes_run.flops_per_byte.counted_training == bytes_run.flops_per_byte.analytic["total"]
    assert bytes_run.achieved_flops_per_s > 0 and bytes_run.epochs <= 1

    capsys.readouterr()
    assert main(["report", str(out), "-o", str(out / "report.md")]) == 0
    report = (out / "report.md").read_text()
    assert "| bytes" in report and "order-0 entropy" in report and "gzip -9" in report
    assert "tokenizer-free" in report and "leads with" in report  # one sentence per budget names both kinds
    assert "### Other evaluation rules" in report and "| topk " in report  # ByteFlow's top-K gap
    assert (out / "plots" / "bpb_vs_flops_pydoc-topics.png").stat().st_size > 1000
    assert (out / "plots" / "learning_curves_pydoc-topics.png").stat().st_size > 1000
    assert (out / "plots" / "bpb_vs_inference_flops_pydoc-topics.png").stat().st_size > 1000
    # the checkpoint reloads to the same test score
    model = load_checkpoint(out / "runs" / bytes_run.run_id)
    from harness.run import data
    from harness.run.evaluate import evaluate
    from harness.run.spec import load_corpus
    from harness.orchestrate.suite import load_suite

    loaded = load_suite(ROOT / "suites" / "smoke.yaml")
    windows = data.windows(load_corpus(loaded).test, loaded.eval.window, loaded.eval.max_windows)
    import torch

    again = evaluate(model, windows, 32, torch.device("cpu")).bpb
    assert abs(again - bytes_run.test.bpb) < 1e-6


def test_a_suite_with_two_corpora_runs_and_reports_each(write_suite, tmp_path, capsys):
    from harness.lm_eval_plugin.tasks import utils

    corpora = [{"embedded": "pydoc-topics"}, {"embedded": "stdlib-code"}]
    path = write_suite(tiny_suite(corpus=corpora))
    out = run_suite(path, tmp_path, "cpu", show_progress=False)
    records = {r.run_id: r for r in read_suite_records(out)}
    assert sorted(records) == ["pydoc-topics__bytes__C2.00e09__s0", "stdlib-code__bytes__C2.00e09__s0"]
    code = records["stdlib-code__bytes__C2.00e09__s0"]
    assert code.corpus.label == "stdlib-code"
    assert code.corpus.sha256 != records["pydoc-topics__bytes__C2.00e09__s0"].corpus.sha256
    assert main(["report", str(out), "-o", str(out / "report.md")]) == 0
    report = (out / "report.md").read_text()
    assert "## Corpus `pydoc-topics`" in report and "## Corpus `stdlib-code`" in report
    assert (out / "plots" / "bpb_vs_flops_stdlib-code.png").stat().st_size > 1000
    # the lm-eval task scores a run on its own corpus; a suite with two corpora needs one named
    from_run = utils.test_windows(pretrained=str(out / "runs" / "stdlib-code__bytes__C2.00e09__s0"))
    assert from_run == utils.test_windows(suite=str(out), corpus="stdlib-code")
    assert from_run != utils.test_windows(suite=str(out), corpus="pydoc-topics")
    with pytest.raises(HarnessError, match="has corpora pydoc-topics, stdlib-code"):
        utils.test_windows(suite=str(out))


def test_same_seed_same_bpb(write_suite, tmp_path):
    path = write_suite(tiny_suite())
    first = read_suite_records(run_suite(path, tmp_path / "a", "cpu", show_progress=False))[0]
    second = read_suite_records(run_suite(path, tmp_path / "b", "cpu", show_progress=False))[0]
    assert first.test.bpb == second.test.bpb
    assert first.loss_curve == second.loss_curve
    path2 = write_suite(tiny_suite(seeds=[1]), "other.yaml")
    third = read_suite_records(run_suite(path2, tmp_path / "c", "cpu", show_progress=False))[0]
    assert third.test.bpb != first.test.bpb


def test_resume_after_kill_minus_nine(write_suite, tmp_path):
    suite = tiny_suite(seeds=[0, 1, 2, 3], budgets=[6e9])
    path = write_suite(suite)
    results = tmp_path / "results"
    runs_dir = results / "tiny" / "runs"
    command = [sys.executable, "-m", "harness.cli", "run", str(path), "--results", str(results), "--quiet", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(runs_dir.glob("*/record.json")):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # mid-way through the second run
    process.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in runs_dir.glob("*/record.json")}
    assert 1 <= len(finished) < 4

    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = list(runs_dir.glob("*/record.json"))
    assert len(records) == 4 and len({p.parent.name for p in records}) == 4
    for run_id, mtime in finished.items():  # finished runs were not redone
        assert (runs_dir / run_id / "record.json").stat().st_mtime_ns == mtime
        assert f"{run_id}: done already, skipped" in done.stdout + done.stderr
    assert not [p for p in runs_dir.rglob("*") if ".tmp" in p.name]  # no half-written files left behind
    assert [json.loads(p.read_text())["seed"] for p in sorted(records)] == [0, 1, 2, 3]


def test_report_on_an_empty_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no suite.json" in capsys.readouterr().err


def test_list_shows_the_byte_transformer(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "bytes: decoder-only Transformer over raw bytes" in out and "d_model" in out
    assert "sized to an inference cost by d_model in steps of 2 x n_heads, then n_layers" in out


def test_output_cut_short_by_a_closed_pipe_is_not_an_error():
    """`harness list | head -1`: the reader has gone; no traceback, exit 0."""
    reader, writer = os.pipe()
    os.close(reader)  # gone before the first write, so every write fails (a fast reader can't hide it)
    process = subprocess.Popen([sys.executable, "-m", "harness.cli", "list"], stdout=writer, stderr=subprocess.PIPE)
    os.close(writer)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0 and b"Traceback" not in err, err.decode()


def test_a_killed_run_continues_from_its_saved_state(write_suite, tmp_path):
    path = write_suite(tiny_suite(budgets=[8e9]))
    results = tmp_path / "killed"
    run_dir = results / "tiny" / "runs"
    command = [sys.executable, "-m", "harness.cli", "run", str(path), "--results", str(results), "--quiet",
               "--device", "cpu", "--save-every", "0"]
    kill_while_training(command, run_dir)

    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = read_suite_records(results / "tiny")[0]
    assert resumed.resumed_at_step > 0
    assert not list(run_dir.glob("*/partial.pt"))
    uninterrupted = read_suite_records(run_suite(path, tmp_path / "straight", "cpu", show_progress=False))[0]
    assert resumed.loss_curve == uninterrupted.loss_curve
    assert resumed.test.bpb == uninterrupted.test.bpb


def test_records_count_the_training_forward_and_the_inference_cost_on_the_scored_windows(write_suite, tmp_path):
    patcher = {"patcher": "space", "d_local": 32, "d_global": 48, "n_heads_local": 2, "n_heads_global": 2,
               "local_window": 16, "calibration_bytes": 4096}
    suite = tiny_suite(models=[{"name": "bytes", "adapter": "bytes", "config": {"d_model": 32, "n_layers": 1, "n_heads": 2}},
                               {"name": "space", "adapter": "patcher", "config": patcher}])
    out = run_suite(write_suite(suite), tmp_path, "cpu", show_progress=False)
    records = {r.model.name: r for r in read_suite_records(out)}
    fixed = records["bytes"].flops_per_byte
    assert fixed.counted_training == fixed.test == fixed.analytic["total"] and fixed.counted_training_windows == 64
    # a data-dependent patch count: the inference cost is the formula at each scored window's own count
    space = records["space"]
    model = load_checkpoint(out / "runs" / space.run_id)
    from harness.run import data
    from harness.run.spec import load_corpus
    from harness.orchestrate.suite import load_suite

    windows = data.windows(load_corpus(load_suite(write_suite(suite))).test, 64, 16)
    expected = sum(model.forward_flops(64, int(model.patch_starts(w[None]).sum()))["total"] for w in windows) / windows.numel()
    assert space.flops_per_byte.test == pytest.approx(expected, rel=1e-9)
    assert space.flops_per_byte.test != space.flops_per_byte.analytic["total"]
    assert main(["report", str(out)]) == 0
    assert "test fwd FLOPs/byte" in (out / "report.md").read_text()
