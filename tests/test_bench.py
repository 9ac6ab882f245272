"""`harness bench` and the speed options: the bench's figures and errors, --threads in run
records, the matmul peak's spread, torch.compile in the trainer, fused AdamW only on CUDA."""

import json
import os
import subprocess
import sys

import pytest
import torch

from harness.api import build
from harness.cli import main
from harness.run import data
from harness.run.device import Peak, busy_machine_warning, choose_threads, measure_matmul_peak, spins_long
from harness.run.records import read_record
from harness.run.spec import TrainerSettings, expand
from harness.orchestrate.suite import load_suite
from harness.run.train import adamw_options, make_optimizer, train
from tests.checks import record_for
from tests.conftest import ROOT, tiny_suite

BYTEFLOW = {"name": "byteflow", "adapter": "byteflow",
            "config": {"d_local": 32, "d_global": 32, "n_heads": 2, "global_heads": 2, "global_layers": 1, "attn_window": 16,
                       "rolling_window": 32, "calibration_windows": 32}}


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_writes_the_figures_of_each_model_as_json_and_markdown(write_suite, tmp_path, capsys, restore_threads):
    suite = tiny_suite(models=tiny_suite()["models"] + [BYTEFLOW])
    out = tmp_path / "bench" / "tiny.json"
    assert main(["bench", str(write_suite(suite)), "--steps", "2", "--warmup", "1", "--threads", "1",
                 "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["torch_threads"] == 1 and result["machine"]["cores"] >= 1
    assert set(result["versions"]) >= {"python", "torch", "harness"}
    peak = result["matmul_peak"]["float32"]
    assert 0 < peak["min"] <= peak["flops_per_s"] <= peak["max"]
    assert [m["name"] for m in result["models"]] == ["bytes", "byteflow"]
    for model in result["models"]:
        for key in ("train_bytes_per_s", "eval_bytes_per_s", "train_flops_per_s", "eval_flops_per_s", "mfu"):
            assert model[key] > 0, key
        steps = model["step_seconds"]
        assert all(steps[phase] > 0 for phase in ("forward", "backward", "optimizer"))
        assert steps["total"] == pytest.approx(sum(steps[p] for p in ("data", "forward", "backward", "optimizer")))
        # FLOPs as records count them: the analytic training FLOPs per byte times the bytes trained on
        assert model["train_flops_per_s"] == pytest.approx(model["training_flops_per_byte"] * model["train_bytes_per_s"])
    bytes_model, byteflow = result["models"]
    assert bytes_model["auxiliary"] is None
    assert byteflow["auxiliary"]["seconds"] > 0 and "scoring" in byteflow["auxiliary"]["part"]
    assert "| byteflow" in out.with_suffix(".md").read_text()
    printed = capsys.readouterr().out
    assert "train B/s" in printed and "float32 matmul peak" in printed


def test_a_profiled_bench_names_where_the_step_time_goes(write_suite, tmp_path, capsys, restore_threads):
    out = tmp_path / "profiled.json"
    assert main(["bench", str(write_suite(tiny_suite())), "--steps", "2", "--warmup", "1", "--threads", "1",
                 "--device", "cpu", "--profile", "--out", str(out)]) == 0
    (model,) = json.loads(out.read_text())["models"]
    shares = model["operator_shares"]
    assert 0 < shares["matmul"] < 1 and 0 < shares["attention"] < 1
    named = [name for name, _ in shares["top_other"]]
    assert named and not {"aten::mm", "aten::addmm"} & set(named) and all(name in model["profile"] for name in named)
    assert shares["matmul"] + shares["attention"] + sum(share for _, share in shares["top_other"]) <= 1 + 1e-9
    assert "profile of bytes" in capsys.readouterr().out


def test_bench_of_an_unknown_model_is_one_line_naming_the_suite_s_models(write_suite, capsys):
    assert main(["bench", str(write_suite(tiny_suite())), "--models", "bytes", "gpt5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "gpt5" in err and "its models: bytes" in err
    assert main(["bench", str(write_suite(tiny_suite())), "--steps", "0"]) == 2
    assert main(["bench", str(write_suite(tiny_suite())), "--threads", "0"]) == 2


def test_threads_are_recorded_in_the_run_record(write_suite, tmp_path, restore_threads):
    results = tmp_path / "results"
    assert main(["run", str(write_suite(tiny_suite())), "--results", str(results), "--quiet", "--device", "cpu",
                 "--threads", "1"]) == 0
    (path,) = (results / "tiny" / "runs").glob("*/record.json")
    record = read_record(path)
    assert record.threads == 1
    low, high = record.matmul_peak_range
    assert low <= record.matmul_peak_flops_per_s <= high
    summary = json.loads((results / "tiny" / "suite.json").read_text())
    assert summary["threads"] == 1


def test_threads_by_default_are_the_free_usable_cores_and_threads_or_omp_num_threads_override(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("HARNESS_OTHER_THREADS", "0")  # what harness/cli.py saw when it started
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr("os.getloadavg", lambda: (9.0, 0.0, 0.0))
    count, reason = choose_threads(None)
    assert count == 4 and "load average 9.00" in reason  # the average is said; the ready threads decide
    monkeypatch.setenv("HARNESS_OTHER_THREADS", "3")  # other jobs' threads ready to run leave one core free
    count, reason = choose_threads(None)
    assert count == 1 and "3 threads of other jobs ready to run" in reason
    monkeypatch.setenv("HARNESS_OTHER_THREADS", "9")
    assert choose_threads(None)[0] == 1  # at least one
    monkeypatch.setenv("HARNESS_OTHER_THREADS", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes of one run share the cores
    assert choose_threads(None)[0] == 2
    assert choose_threads(3) == (3, "3 (--threads)")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert "OMP_NUM_THREADS" in choose_threads(None)[1]


def test_threads_spin_briefly_on_a_free_core_and_sleep_beside_busy_ones_unless_the_user_says(monkeypatch, tmp_path):
    """harness/cli.py sets the OpenMP wait before torch loads (docs/speed.md, "Threads"): a short spin
    where a core is free, passive where other jobs' ready threads fill every core; a user's
    OMP_WAIT_POLICY or GOMP_SPINCOUNT wins, and a long spin is named in the busy warning."""
    from harness.cli import openmp_wait, other_runnable_threads

    loadavg = tmp_path / "loadavg"
    loadavg.write_text("3.91 2.10 1.20 5/310 12345\n")  # 5 running, this process among them
    assert other_runnable_threads(str(loadavg)) == 4
    assert other_runnable_threads(str(tmp_path / "absent")) is None
    assert openmp_wait(4, 2)["OMP_WAIT_POLICY"] == "PASSIVE" and "4 threads of other jobs" in openmp_wait(4, 2)[
        "HARNESS_OPENMP_WAIT"]
    for quiet in (0, 1, None):
        assert openmp_wait(quiet, 2)["GOMP_SPINCOUNT"] == "1000" and "OMP_WAIT_POLICY" not in openmp_wait(quiet, 2)
    probe = "import os, harness.cli; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    for extra, expected in (({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE None"), ({"GOMP_SPINCOUNT": "50"}, "None 50")):
        done = subprocess.run([sys.executable, "-c", probe], env=clean | extra, capture_output=True, text=True, cwd=ROOT)
        assert done.stdout.strip() == expected, done.stderr
    done = subprocess.run([sys.executable, "-c", probe + "; print(os.environ['HARNESS_OTHER_THREADS'])"],
                          env=clean | {"HARNESS_OTHER_THREADS": "stale"}, capture_output=True, text=True, cwd=ROOT)
    wait, others = done.stdout.strip().splitlines()
    assert wait in ("None 1000", "PASSIVE None"), done.stderr  # which one: the machine's load now
    assert others.isdigit()  # looked at again by each harness process, for the default thread count
    for env, long_spin in (({"GOMP_SPINCOUNT": "1000"}, False), ({"OMP_WAIT_POLICY": "PASSIVE"}, False),
                           ({"OMP_WAIT_POLICY": "ACTIVE"}, True), ({}, True)):
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert spins_long() is long_spin
        warning = busy_machine_warning(torch.device("cpu"), Peak(100.0, 95.0, 105.0), load=3.0)
        assert ("spin long" in warning) is long_spin


def test_records_without_threads_or_peak_range_still_load():
    record = record_for(build("bytes", {"d_model": 32, "n_layers": 1, "n_heads": 2}))
    assert record.threads is None and record.matmul_peak_range is None


def test_the_peak_is_a_median_with_its_range_and_a_busy_machine_is_named():
    peak = measure_matmul_peak(torch.device("cpu"), size=64, seconds=0.01, repeats=3)
    assert 0 < peak.low <= peak.flops_per_s <= peak.high and peak.dtype == "float32"
    steady = Peak(100.0, 95.0, 105.0)
    assert busy_machine_warning(torch.device("cpu"), steady, load=0.0) is None
    assert "load average 3.00" in busy_machine_warning(torch.device("cpu"), steady, load=3.0)
    assert "varied" in busy_machine_warning(torch.device("cpu"), Peak(100.0, 40.0, 105.0), load=0.0)
    assert busy_machine_warning(torch.device("cuda"), steady, load=3.0) is None  # the GPU does not share the CPU's load


def test_fused_adamw_only_when_every_parameter_is_on_cuda():
    model = build("bytes", {"d_model": 32, "n_layers": 1, "n_heads": 2})
    assert adamw_options(list(model.parameters())) == {}
    assert not make_optimizer(model, TrainerSettings()).defaults.get("fused")
    if torch.cuda.is_available():
        assert make_optimizer(model.cuda(), TrainerSettings()).defaults["fused"]


def test_compile_is_a_validated_trainer_setting_that_leaves_older_run_hashes_alone(write_suite):
    plain = load_suite(write_suite(tiny_suite(), "plain.yaml"))
    off = load_suite(write_suite(tiny_suite(trainer={"batch_windows": 8, "log_every": 2, "compile": False}), "off.yaml"))
    on = load_suite(write_suite(tiny_suite(trainer={"batch_windows": 8, "log_every": 2, "compile": True}), "on.yaml"))
    per_model = tiny_suite()
    per_model["models"][0]["trainer"] = {"compile": True}
    model_on = load_suite(write_suite(per_model, "model_on.yaml"))
    hashes = [expand(s)[0].config_hash(s) for s in (plain, off, on, model_on)]
    assert hashes[0] == hashes[1] == "32a7a89487f5a7a5"  # computed before the setting existed
    assert hashes[2] != hashes[0] and hashes[3] != hashes[0]
    assert expand(model_on)[0].trainer.compile
    with pytest.raises(Exception, match="compile"):
        load_suite(write_suite(tiny_suite(trainer={"compile": "sometimes"}), "bad.yaml"))


def train_twice() -> tuple[list, list]:
    """The loss curve of 3 training steps of a small byte model, eager and compiled."""
    curves = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = build("bytes", {"d_model": 32, "n_layers": 1, "n_heads": 2})
        stream = data.TrainStream(data.embedded_corpus("pydoc-topics", 20000), 64, 4, seed=0)
        settings = TrainerSettings(batch_windows=4, log_every=1, compile=compile)
        curves.append(train(model, stream, settings, 3, torch.device("cpu"), show_progress=False).curve)
    return curves


def test_a_compiled_training_forward_gives_the_eager_losses(monkeypatch):
    """Through dynamo and AOT autograd (the aot_eager backend: the graphs torch.compile traces,
    without the slow C++ code generation); the slow test below uses the default backend."""
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, backend="aot_eager", **kw))
    eager, compiled = train_twice()
    assert [p["train_bpb"] for p in compiled] == pytest.approx([p["train_bpb"] for p in eager], rel=1e-4)


@pytest.mark.slow
def test_a_compiled_training_forward_gives_the_eager_losses_with_inductor():
    eager, compiled = train_twice()
    assert [p["train_bpb"] for p in compiled] == pytest.approx([p["train_bpb"] for p in eager], rel=1e-4)


def test_a_window_is_tokenized_once_per_tokenizer():
    from baselines.token_lm import Vocabulary

    calls = []

    def encode_texts(texts):
        calls.append(len(texts))
        return [[ord(c) for c in t] for t in texts]

    vocab = Vocabulary(encode_texts, [bytes([i]) for i in range(256)] + [b""], list(range(256)), 256)
    windows = [b"the cat", b"a dog", b"the cat"]
    assert vocab.encode_windows(windows) == vocab.encode(windows)
    tokenized = len(calls)
    assert vocab.encode_windows(windows[::-1]) == vocab.encode(windows)[::-1]
    assert len(calls) == tokenized + 1  # the encode() just above; encode_windows asked the library nothing


def test_a_run_faster_than_the_peak_it_measured_says_so(write_suite, tmp_path, monkeypatch):
    from harness.orchestrate import runner
    from harness.run.records import read_suite_records

    monkeypatch.setattr(runner, "measure_matmul_peak", lambda device: Peak(1e3, 1e3, 1e3))  # a peak taken under load
    out = runner.run_suite(write_suite(tiny_suite(budgets=[1e9])), tmp_path, "cpu", show_progress=False)
    (record,) = read_suite_records(out)
    assert record.mfu > 1 and any("above the 1e+03 matmul peak" in w for w in record.warnings)
