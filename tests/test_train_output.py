"""What training prints and logs: plain progress lines (no carriage returns) when stderr is not a
terminal, and TensorBoard scalars behind `harness run --tensorboard DIR` (an optional package)."""

import pytest
import torch

from harness.api import registry
from harness.orchestrate import runner
from harness.run import train as train_module
from harness.run.data import TrainStream
from harness.run.spec import TrainerSettings
from harness.run.train import PlainProgress, train
from tests.conftest import tiny_suite


def tiny_model():
    cls = registry.get("bytes")
    return cls(cls.Config(d_model=16, n_layers=1, n_heads=2))


def stream():
    return TrainStream(bytes(range(256)) * 8, 32, 2, seed=0)


def test_progress_in_a_log_is_plain_lines(capsys, monkeypatch):
    monkeypatch.setattr(train_module, "PLAIN_PROGRESS_EVERY_S", 0.0)  # a line at every step
    train(tiny_model(), stream(), TrainerSettings(log_every=2), 6, torch.device("cpu"), description="run-x")
    err = capsys.readouterr().err  # captured: not a terminal
    lines = err.strip().splitlines()
    assert "\r" not in err and len(lines) == 6
    assert lines[-1].startswith("run-x: step 6/6 (100%), train ") and "bpb" in lines[-1] and "steps/s" in lines[-1]
    train(tiny_model(), stream(), TrainerSettings(), 3, torch.device("cpu"), show_progress=False)
    assert capsys.readouterr().err == ""


def test_plain_progress_waits_between_lines(capsys):
    progress = PlainProgress("r", 100, every_s=3600)
    for step in range(1, 100):
        progress.update(step, step * 64)
    assert capsys.readouterr().err == ""
    progress.update(100, 6400)  # the last step always prints
    assert capsys.readouterr().err.startswith("r: step 100/100 (100%), 0.01 MB")


class FakeWriter:
    def __init__(self):
        self.scalars, self.flushed = [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), step))

    def flush(self):
        self.flushed = True


def test_tensorboard_gets_the_loss_curve_learning_rate_and_throughput():
    writer = FakeWriter()
    result = train(tiny_model(), stream(), TrainerSettings(log_every=2, lr=1e-3), 6, torch.device("cpu"),
                   show_progress=False, tensorboard=writer)
    steps = {tag: [s for t, _, s in writer.scalars if t == tag] for tag in ("train/bpb", "train/lr", "train/bytes_per_s")}
    assert steps == {tag: [2, 4, 6] for tag in steps}
    assert [v for t, v, _ in writer.scalars if t == "train/bpb"] == pytest.approx([p["train_bpb"] for p in result.curve],
                                                                                   abs=1e-4)
    assert all(0 < v <= 1e-3 for t, v, _ in writer.scalars if t == "train/lr") and writer.flushed


def test_run_without_the_tensorboard_package_says_so_once_and_trains(write_suite, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "tensorboard_available", lambda: False)
    suite = write_suite(tiny_suite(budgets=[2e9, 4e9]))
    runner.run_suite(suite, tmp_path / "results", "cpu", show_progress=False, tensorboard_dir=tmp_path / "tb")
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("--tensorboard needs the optional tensorboard package") == 1
    assert len(list((tmp_path / "results" / "tiny" / "runs").glob("*/record.json"))) == 2
    assert not (tmp_path / "tb").exists()


def test_run_writes_tensorboard_event_files(write_suite, tmp_path):
    pytest.importorskip("tensorboard")
    suite = write_suite(tiny_suite())
    runner.run_suite(suite, tmp_path / "results", "cpu", show_progress=False, tensorboard_dir=tmp_path / "tb")
    events = list((tmp_path / "tb" / "tiny").glob("*/events.out.tfevents.*"))
    assert len(events) == 1 and events[0].parent.name == "bytes__C2.00e09__s0"
