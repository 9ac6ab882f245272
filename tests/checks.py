"""Helpers that many tests call: the analytic FLOP count against FlopCounterMode, and a
record for a model that did not go through the runner."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from harness.api import Adapter
from harness.run.records import RunRecord
from harness.modeling.flops import measure_forward


def assert_flops_match(model: Adapter, windows: torch.Tensor, tolerance: float = 0.02) -> tuple[float, float]:
    """Analytic forward FLOPs per byte within `tolerance` (relative) of the counted ones."""
    model.eval()
    analytic = model.flops_per_byte(windows.shape[1])["total"]
    measured = measure_forward(model, windows) / windows.numel() + model.uncounted_flops_per_byte(windows.shape[1])
    assert abs(analytic - measured) <= tolerance * measured, f"analytic {analytic:.6g} vs counted {measured:.6g} FLOPs/byte"
    return analytic, measured


def record_for(model: Adapter, run_id: str = "run", **fields) -> RunRecord:
    """A whole, valid run record for `model` (figures are placeholders unless given)."""
    evaluation = {"bpb": 1.0, "bytes": 64, "windows": 1, "window_nll_nats": [44.36]}
    values = {
        "suite": "test", "run_id": run_id, "config_hash": "0" * 16,
        "model": {"name": model.name, "adapter": model.name, "config": model.config.model_dump(mode="json")},
        "trainer": {}, "trainer_overrides": {}, "budget_flops": 1.0, "seed": 0,
        "corpus": {"label": "test", "id": "test", "sha256": "0" * 64, "train_bytes": 1, "val_bytes": 1, "test_bytes": 64},
        "eval": {"window": 64, "max_windows": None, "batch_windows": 16}, "parameters": model.parameter_counts(),
        "flops_per_byte": {"analytic": model.flops_per_byte(64)}, "units_per_byte": 1.0, "bytes_per_unit": 1.0,
        "preparation": {}, "steps": 1, "batch_bytes": 64, "bytes_seen": 64, "epochs": 0.0, "training_flops": 1.0,
        "auxiliary_training_flops": 0.0, "count_auxiliary_flops": True, "total_flops": 1.0,
        "training_flops_per_byte": 1.0, "calibration": {}, "loss_curve": [], "val": evaluation, "test": evaluation,
        "test_variants": {}, "tokenizer": {}, "train_seconds": 1.0, "wall_seconds": 1.0, "achieved_flops_per_s": 1.0,
        "matmul_peak_flops_per_s": 1.0, "mfu": 1.0, "device": "cpu", "warnings": [], "versions": {},
    }
    return RunRecord(**values | fields)


def kill_while_training(command: list, run_dir: Path) -> None:
    """Start `command`, wait for its first saved training state, kill -9 it mid-run."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list(run_dir.glob("*/partial.pt")):
        time.sleep(0.02)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert list(run_dir.glob("*/partial.pt")) and not list(run_dir.glob("*/record.json")), \
        "the run finished (or never saved) before it could be killed"
