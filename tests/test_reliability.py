"""The harness used as a hostile user would use it (issue 16): planted pickles, damaged files,
divergence, tokenizers that cannot be trained, a read-only folder and a full disk, two
processes on one suite, and budgets that repeat the data. Whatever happens: one line
(`harness: error: ...`, exit status 2) and no traceback, no run's work lost, no run trained twice.
The bad suite files are in tests/test_suite_validation.py."""

import json
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from baselines.bytes import ByteTransformer
from harness.api import registry
from harness.cli import main
from harness.storage import file_mode, remove_hashed
from harness.run.checkpoint import load_weights, save_checkpoint_atomic
from harness.run.records import (read_failure, read_record, read_suite_records, remove_temporaries,
                                  write_json_atomic, write_record)
from harness.orchestrate.runner import run_suite
from harness.errors import HarnessError
from tests.checks import kill_while_training, record_for
from tests.conftest import SMALL_CONFIGS, tiny_suite

BYTES = {"name": "bytes", "adapter": "bytes", "config": {"d_model": 32, "n_layers": 1, "n_heads": 2}}


def one_line_error(status: int, err: str) -> str:
    """The CLI's answer to bad input: status 2, one line on stderr, no traceback."""
    lines = err.strip().splitlines()
    assert status == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("harness: error: "), err
    return lines[0]


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def run_args(path: Path, results: Path, *extra) -> list:
    return ["run", path, "--results", results, "--quiet", "--device", "cpu", *extra]


class Payload:
    """Unpickling this object would create the file `MARKER` (what a malicious checkpoint does)."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path, raw: bool = False) -> None:
    """A checkpoint whose loading with weights_only=False would create `marker`."""
    Payload.marker = str(marker)
    if raw:  # a plain pickle (protocol 4), not torch's zip format
        path.write_bytes(pickle.dumps({"model": Payload()}, protocol=4))
    else:
        torch.save({"key": "x", "model": Payload()}, path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A tiny suite with two finished runs (seeds 0 and 1); tests copy it before changing it."""
    root = tmp_path_factory.mktemp("finished")
    (root / "suite.yaml").write_text(yaml.safe_dump(tiny_suite(seeds=[0, 1]), sort_keys=False))
    return run_suite(root / "suite.yaml", root / "results", "cpu", show_progress=False)


@pytest.fixture
def copy_of(finished, tmp_path):
    """A fresh copy of the finished suite, and the suite file that made it."""
    out = tmp_path / "results" / "tiny"
    shutil.copytree(finished, out)
    shutil.copy(finished.parent.parent / "suite.yaml", tmp_path / "suite.yaml")
    return out


# ---- security -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [False, True], ids=["torch.save", "plain pickle"])
def test_a_planted_model_pt_never_runs_in_export_segment_or_lm_eval(tmp_path, capsys, raw):
    from harness.lm_eval_plugin import HarnessLM

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model = registry.build("bytes", BYTES["config"])
    write_record(run_dir / "record.json", record_for(model))
    marker = tmp_path / "payload-ran"
    plant(run_dir / "model.pt", marker, raw)

    line = one_line_error(*cli(["export", run_dir, tmp_path / "exported"], capsys)[::2])
    assert "model.pt: not a loadable checkpoint" in line and "could run code" in line
    line = one_line_error(*cli(["segment", run_dir, "--text", "hello world"], capsys)[::2])
    assert "model.pt: not a loadable checkpoint" in line
    with pytest.raises(HarnessError, match="model.pt: not a loadable checkpoint"):
        HarnessLM(pretrained=str(run_dir), device="cpu")
    assert not marker.exists()


def test_a_planted_partial_pt_is_discarded_and_the_run_starts_over(write_suite, tmp_path, capsys):
    path = write_suite(tiny_suite())
    run_dir = tmp_path / "results" / "tiny" / "runs" / "bytes__C2.00e09__s0"
    run_dir.mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    plant(run_dir / "partial.pt", marker)
    status, out, err = cli(run_args(path, tmp_path / "results"), capsys)
    assert status == 0, err
    assert "partial.pt: not a loadable checkpoint" in out and "deleted it, the run starts over" in out
    assert read_record(run_dir / "record.json").resumed_at_step is None
    assert not marker.exists() and not (run_dir / "partial.pt").exists()


def test_a_suite_named_dot_dot_is_refused(write_suite, tmp_path, capsys):
    results = tmp_path / "deep" / "results"
    for name in ("..", "."):
        path = write_suite(tiny_suite(name=name))
        line = one_line_error(*cli(run_args(path, results), capsys)[::2])
        assert f"{path}: name: String should match pattern" in line
    assert not list((tmp_path / "deep").rglob("*.json"))


def test_records_checkpoints_and_caches_get_one_file_mode(copy_of, tmp_path):
    saved = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "cache" / "entry.json", {"a": 1})  # the tokenizer cache's writer
        save_checkpoint_atomic(tmp_path / "model.pt", {"w": torch.zeros(2)})
        os.umask(0o027)
        write_json_atomic(tmp_path / "strict.json", {"a": 1})
    finally:
        os.umask(saved)
    assert (tmp_path / "cache" / "entry.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "strict.json").stat().st_mode & 0o777 == 0o640  # the umask is respected
    # and a suite run (the module fixture, under this process's umask) wrote all its files alike
    run_dir = copy_of / "runs" / "bytes__C2.00e09__s0"
    modes = {p.name: p.stat().st_mode & 0o777 for p in (copy_of / "suite.json", run_dir / "record.json",
                                                         run_dir / "model.safetensors",
                                                         run_dir / "model.safetensors.sha256")}
    assert set(modes.values()) == {file_mode()}, modes


# ---- resume -----------------------------------------------------------------------------------


def test_the_entropy_patcher_resumes_bit_exactly_after_kill_minus_nine(write_suite, tmp_path):
    path = write_suite(tiny_suite(budgets=[3e9], models=[
        {"name": "patcher", "adapter": "patcher", "config": SMALL_CONFIGS["patcher"]}]))
    results = tmp_path / "killed"
    runs_dir = results / "tiny" / "runs"
    command = [sys.executable, "-m", "harness.cli", *map(str, run_args(path, results, "--save-every", "0"))]
    kill_while_training(command, runs_dir)

    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    resumed = read_suite_records(results / "tiny")[0]
    assert resumed.resumed_at_step > 0 and resumed.preparation.facts.get("patcher") == "entropy"
    uninterrupted = read_suite_records(run_suite(path, tmp_path / "straight", "cpu", show_progress=False))[0]
    assert resumed.steps > resumed.resumed_at_step
    assert resumed.loss_curve == uninterrupted.loss_curve
    assert resumed.val.window_nll_nats == uninterrupted.val.window_nll_nats
    assert resumed.test.window_nll_nats == uninterrupted.test.window_nll_nats


def test_temporaries_of_a_killed_save_are_removed_when_the_run_starts(copy_of, capsys):
    run_dir = copy_of / "runs" / "bytes__C2.00e09__s0"
    (run_dir / "record.json").unlink()  # so that the run is done again
    left = [run_dir / ".partial.pt.tmp4242", run_dir / ".model.pt.tmp4242", run_dir / ".record.json.x1y2.tmp"]
    for p in left:
        p.write_bytes(b"half a file")
    status, _, err = cli(run_args(copy_of.parent.parent / "suite.yaml", copy_of.parent), capsys)
    assert status == 0, err
    assert not [p for p in left if p.exists()]
    assert read_record(run_dir / "record.json").run_id == "bytes__C2.00e09__s0"


def test_a_failed_save_leaves_no_temporary(tmp_path):
    class Unsavable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(OSError, match="torch.save failed"):
        save_checkpoint_atomic(tmp_path / "partial.pt", {"x": Unsavable()})
    assert list(tmp_path.iterdir()) == []
    assert remove_temporaries(tmp_path) == []


# ---- divergence ---------------------------------------------------------------------------------

class DivergingBytes(ByteTransformer):
    """A byte Transformer whose training loss is NaN from its third step on."""

    name = "diverging-bytes"
    description = "test adapter: NaN loss from step 3"

    def training_loss(self, windows):
        out = super().training_loss(windows)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls >= 3:
            out.nll = out.nll * float("nan")
        return out


@pytest.fixture
def diverging_adapter(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register(DivergingBytes)


def test_a_diverging_run_is_recorded_and_the_next_run_completes(write_suite, tmp_path, capsys, diverging_adapter):
    path = write_suite(tiny_suite(models=[{**BYTES, "name": "nan", "adapter": "diverging-bytes"}, BYTES]))
    results = tmp_path / "results"
    runs = results / "tiny" / "runs"
    status, out, err = cli(run_args(path, results, "--save-every", "0"), capsys)
    line = one_line_error(status, err)
    assert "1 of 2 runs did not finish: nan__C2.00e09__s0 diverged at step 3" in line
    assert read_record(runs / "bytes__C2.00e09__s0" / "record.json").test.bpb > 0  # the healthy run after it ran
    failure = read_failure(runs / "nan__C2.00e09__s0" / "failure.json")
    assert failure.kind == "diverged" and failure.step == 3 and 0 < failure.last_finite_loss < 10
    assert not (runs / "nan__C2.00e09__s0" / "record.json").exists()
    assert not (runs / "nan__C2.00e09__s0" / "partial.pt").exists()  # resumed, it would only diverge again

    # run again: the diverged run is not retried, the finished one not redone; still one line
    status, out, err = cli(run_args(path, results), capsys)
    one_line_error(status, err)
    assert "nan__C2.00e09__s0: diverged at step 3 (last finite loss" in out and "skipped (--retry-failed" in out
    assert "training" not in out
    # unless asked
    status, out, err = cli(run_args(path, results, "--retry-diverged"), capsys)
    assert "nan__C2.00e09__s0: training" in out and "bytes__C2.00e09__s0: done already" in out
    one_line_error(status, err)

    # the report shows it as diverged, not as a number
    status, out, err = cli(["report", results / "tiny", "-o", "-"], capsys)
    assert status == 0, err
    assert "## Runs that did not finish" in out
    row = next(line for line in out.splitlines() if line.startswith("| nan__C2.00e09__s0"))
    assert "diverged at step 3" in row
    assert not [line for line in out.splitlines() if line.startswith("| nan ")]  # in no bpb table


# ---- corruption -----------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "missing field"])
def test_a_damaged_record_is_run_again_and_left_out_of_the_report(copy_of, capsys, damage):
    record = copy_of / "runs" / "bytes__C2.00e09__s1" / "record.json"
    raw = record.read_text()
    if damage == "truncated":
        record.write_text(raw[: len(raw) // 2])
    else:
        record.write_text(json.dumps({k: v for k, v in json.loads(raw).items() if k != "test"}))

    status, out, err = cli(["report", copy_of, "-o", copy_of / "report.md"], capsys)
    assert status == 0 and "Traceback" not in err
    assert f"harness: warning: {record}" in err and err.strip().endswith("skipped")
    report = (copy_of / "report.md").read_text()
    assert "| bytes " in report

    status, out, err = cli(run_args(copy_of.parent.parent / "suite.yaml", copy_of.parent), capsys)
    assert status == 0, err
    assert f"warning: {record}" in out and "running bytes__C2.00e09__s1 again" in out
    assert "bytes__C2.00e09__s0: done already, skipped" in out
    assert read_record(record).seed == 1


@pytest.mark.parametrize("content", ["empty", "garbage", "not a training state", "wrong shapes"])
def test_a_damaged_partial_pt_is_discarded_and_the_run_starts_over(copy_of, capsys, content):
    run_dir = copy_of / "runs" / "bytes__C2.00e09__s1"
    config_hash = read_record(run_dir / "record.json").config_hash
    (run_dir / "record.json").unlink()
    partial = run_dir / "partial.pt"
    if content == "empty":
        partial.write_bytes(b"")
    elif content == "garbage":
        partial.write_bytes(random.Random(0).randbytes(4096))
    elif content == "not a training state":
        torch.save({"key": config_hash, "model": [1, 2]}, partial)
    else:
        weights = {k: torch.zeros(3) for k in load_weights(run_dir / "model.safetensors")}
        torch.save({"key": config_hash, "model": weights, "optimizer": {}, "schedule": {}, "stream": {},
                    "rng": torch.get_rng_state(), "state": {"step": 1, "curve": []}}, partial)
    status, out, err = cli(run_args(copy_of.parent.parent / "suite.yaml", copy_of.parent), capsys)
    assert status == 0, err
    assert f"warning: bytes__C2.00e09__s1: {partial}" in out and "deleted it, the run starts over" in out
    assert read_record(run_dir / "record.json").resumed_at_step is None


@pytest.mark.parametrize("content", ["empty", "garbage", "truncated", "an integer", "a list", "a dict of strings"])
def test_a_damaged_model_pt_is_one_line_in_export_segment_and_lm_eval(copy_of, tmp_path, capsys, content):
    from harness.lm_eval_plugin import HarnessLM

    run_dir = copy_of / "runs" / "bytes__C2.00e09__s0"
    checkpoint = run_dir / "model.pt"  # the weights of a run from before model.safetensors, which still load
    torch.save(load_weights(run_dir / "model.safetensors"), checkpoint)
    remove_hashed(run_dir / "model.safetensors")
    good = checkpoint.read_bytes()
    if content == "empty":
        checkpoint.write_bytes(b"")
    elif content == "garbage":
        checkpoint.write_bytes(random.Random(1).randbytes(4096))
    elif content == "truncated":
        checkpoint.write_bytes(good[: len(good) // 2])
    elif content == "an integer":
        torch.save(3, checkpoint)
    elif content == "a list":
        torch.save([torch.zeros(2)], checkpoint)
    else:
        torch.save({"embed.weight": "not a tensor"}, checkpoint)
    for args in (["export", run_dir, tmp_path / "exported"], ["segment", run_dir, "--text", "some text"]):
        line = one_line_error(*cli(args, capsys)[::2])
        assert str(checkpoint) in line
    with pytest.raises(HarnessError, match="model.pt"):
        HarnessLM(pretrained=str(run_dir), device="cpu")


HOSTILE = {
    "a single repeated byte": lambda n: b"a" * n,
    "random bytes": lambda n: random.Random(0).randbytes(n),
    "invalid UTF-8 with NUL runs": lambda n: (b"\xff\xfe\x00\x00\x00\x00abc\xc3\x28" * n)[:n],
    "mixed encodings with CRLF": lambda n: (("café naïve\r\n".encode("utf-8") + "café naïve\r\n".encode("latin-1")
                                             + "日本\r\n".encode("shift_jis")) * n)[:n],
}


@pytest.mark.parametrize("corpus", list(HOSTILE))
def test_a_tokenizer_that_cannot_be_trained_fails_its_run_and_the_suite_goes_on(write_suite, tmp_path, capsys,
                                                                                   monkeypatch, corpus):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_bytes(HOSTILE[corpus](60_000))
    sentencepiece = {"name": "spm", "adapter": "sentencepiece",
                     "config": {"vocab_size": 512, "d_model": 32, "n_layers": 1, "n_heads": 2}}
    go_on = corpus == "a single repeated byte"  # one corpus shows the next run completing; the others, the failure
    path = write_suite(tiny_suite(corpus={"files": "corpus.txt"}, models=[sentencepiece, BYTES] if go_on else [sentencepiece]))
    results = tmp_path / "results"
    line = one_line_error(*cli(run_args(path, results), capsys)[::2])
    assert f"1 of {2 if go_on else 1} runs did not finish: spm__C2.00e09__s0 failed: sentencepiece could not train" in line
    runs = results / "tiny" / "runs"
    failure = read_failure(runs / "spm__C2.00e09__s0" / "failure.json")
    assert failure.kind == "failed" and "vocab" in failure.reason.lower() and failure.step is None
    if not go_on:
        return
    assert read_record(runs / "bytes__C2.00e09__s0" / "record.json").test.bpb > 0

    status, out, err = cli(["report", results / "tiny", "-o", "-"], capsys)
    assert status == 0, err
    row = next(line for line in out.splitlines() if line.startswith("| spm__C2.00e09__s0"))
    assert "| failed " in row and "sentencepiece could not train" in row


# ---- the system refuses -----------------------------------------------------------------------

@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot write to, even as root (chmod, else chattr +i), or a skip."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK):  # root: permission bits do not stop it
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable:
            pytest.skip("cannot make a folder read-only for this user")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)])
    folder.chmod(0o755)


def test_a_read_only_results_folder_is_one_line(write_suite, read_only_folder, capsys):
    path = write_suite(tiny_suite())
    line = one_line_error(*cli(run_args(path, read_only_folder), capsys)[::2])
    assert str(read_only_folder / "tiny") in line
    assert list(read_only_folder.iterdir()) == []


def test_a_full_disk_is_one_line_and_leaves_no_temporary(write_suite, tmp_path):
    """A file size limit stands in for a full disk: a write past it fails (EFBIG), as at ENOSPC."""
    path = write_suite(tiny_suite())
    results, cache = tmp_path / "results", tmp_path / "cache"

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, do not kill the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    command = [sys.executable, "-m", "harness.cli", *map(str, run_args(path, results, "--save-every", "0"))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=small_disk,
                          env=os.environ | {"HARNESS_CACHE_DIR": str(cache)})
    line = one_line_error(done.returncode, done.stderr)
    assert "partial.pt" in line and "torch.save failed" in line
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    # with room again, the same command finishes the suite
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"HARNESS_CACHE_DIR": str(cache)})
    assert done.returncode == 0, done.stderr
    assert len(read_suite_records(results / "tiny")) == 1


# ---- concurrency and cost ------------------------------------------------------------------------

def test_two_processes_on_one_suite_train_each_run_once(write_suite, tmp_path):
    path = write_suite(tiny_suite(seeds=[0, 1, 2, 3]))
    results = tmp_path / "results"
    command = [sys.executable, "-m", "harness.cli", *map(str, run_args(path, results))]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    trained = [line.split("]")[1].split(":")[0].strip() for out in outputs for line in out.splitlines()
               if line.endswith(": training")]
    records = read_suite_records(results / "tiny")
    assert sorted(trained) == sorted(r.run_id for r in records) and len(records) == 4  # each run trained once
    assert all(r.resumed_at_step is None for r in records)  # and none from the other's saved state
    assert all(" done " in out or "another process" in out for out in outputs)


def test_a_suite_caps_the_epochs_and_planning_warns(write_suite, tmp_path, capsys, monkeypatch):
    """BPE on one repeated byte: thousands of bytes a token, so a small FLOP budget buys many epochs."""
    from harness.run import pipeline
    from harness.run.spec import expand
    from harness.orchestrate.suite import load_suite

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_bytes(b"a" * 60_000)
    bpe = {"name": "bpe", "adapter": "bpe", "config": {"vocab_size": 320, "d_model": 32, "n_layers": 1, "n_heads": 2}}
    path = write_suite(tiny_suite(corpus={"files": "corpus.txt"}, models=[bpe], budgets=[1e9], max_epochs=1))
    status, out, err = cli(run_args(path, tmp_path / "results"), capsys)
    assert status == 0, err
    record = read_suite_records(tmp_path / "results" / "tiny")[0]
    assert record.epoch_cap.max_epochs == 1 and record.epoch_cap.budget_steps > 5 * record.steps
    assert record.epochs <= 1 and record.total_flops < record.budget_flops / 5
    warning = next(line for line in out.splitlines() if line.startswith("warning: bpe__C1.00e09__s0: the budget buys"))
    assert "max_epochs 1 stops it at step" in warning and warning.split(": ", 2)[2] in record.warnings
    report = cli(["report", tmp_path / "results" / "tiny", "-o", "-"], capsys)[1]
    assert "Stopped at max_epochs 1" in report

    # without the cap, planning gives the whole budget and the same warning
    suite = load_suite(write_suite(tiny_suite(corpus={"files": "corpus.txt"}, models=[bpe], budgets=[1e9]), "no-cap.yaml"))
    run, device = expand(suite)[0], torch.device("cpu")
    corpus, ctx = pipeline.load_corpus_data(suite, run.corpus.label, device), pipeline.context(suite, run, device)
    model, preparation, _ = pipeline.prepare(run, suite, corpus, ctx)  # the tokenizer comes from the cache
    plan = pipeline.plan(run, model, preparation, ctx, len(corpus.splits.train), suite.max_epochs)
    assert plan.epoch_cap is None and plan.steps == record.epoch_cap.budget_steps
    assert plan.warnings[0].startswith("the budget buys") and "the data repeats" in plan.warnings[0]
    assert run.config_hash(suite) != record.config_hash  # the cap is part of what determines the result
