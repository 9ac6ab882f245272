"""The one place that knows about devices: which to use, its numerics (bf16 autocast on
CUDA, full precision elsewhere), synchronisation for timing, and its measured matmul peak."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext

import torch

from harness.errors import HarnessError

log = logging.getLogger(__name__)


def pick_device(name: str | None, fall_back: bool = False) -> torch.device:
    """`auto` (or None) takes CUDA when present, else the CPU. An explicit CUDA device that is
    missing is an error, or, with `fall_back` (lm-eval passes cuda:0 by default), the CPU."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        if not fall_back:
            raise HarnessError(f"--device {name}: no CUDA device is available")
        log.warning("device %s: no CUDA device is available; using the CPU", name)
        return torch.device("cpu")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of fn() over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_matmul_peak(device: torch.device, size: int = 1024, seconds: float = 0.5) -> float:
    """Achievable fp32 matmul FLOP/s on `device`, measured now, never looked up."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    synchronize(device)
    for _ in range(2):
        a @ b
    synchronize(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
        if device.type == "cuda" and reps % 8:
            continue
        synchronize(device)
    synchronize(device)
    return 2.0 * size**3 * reps / (time.perf_counter() - start)
