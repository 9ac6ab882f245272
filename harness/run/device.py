"""Which device a run uses, and what the machine can do: its measured matmul peak and how
busy it is. How a model runs on the device (autocast, copies, timing) is
harness/modeling/runtime.py."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from harness.errors import HarnessError
from harness.modeling.runtime import synchronize

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


PEAK_REPEATS = 5  # the peak is the median of this many measurements
WIDE_SPREAD = 0.15  # (max - min) / median of the peak above this: something else used the machine
BUSY_LOAD = 0.5  # a 1-minute load average above this before measuring on the CPU: another job is running


@dataclass(frozen=True)
class Peak:
    """The achievable matmul FLOP/s measured in this process: the median of PEAK_REPEATS
    measurements (the MFU denominator) and their range, which says how steady the machine was."""

    flops_per_s: float
    low: float
    high: float
    dtype: str = "float32"

    @property
    def spread(self) -> float:
        return (self.high - self.low) / self.flops_per_s


def _matmul_flops_per_s(a: torch.Tensor, b: torch.Tensor, seconds: float) -> float:
    device = a.device
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
    return 2.0 * a.shape[0] ** 3 * reps / (time.perf_counter() - start)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024,
                        seconds: float = 0.2, repeats: int = PEAK_REPEATS) -> Peak:
    """Achievable matmul FLOP/s on `device` in `dtype`, measured now, never looked up: the
    median of `repeats` timings of square products (one busy moment moves the median little)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    rates = sorted(_matmul_flops_per_s(a, b, seconds) for _ in range(repeats))
    return Peak(rates[len(rates) // 2], rates[0], rates[-1], str(dtype).removeprefix("torch."))


def load_average() -> float | None:
    """The 1-minute load average (None where the system has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def other_threads() -> int:
    """Threads of other jobs that were ready to run when harness started (harness/cli.py; 0 unknown)."""
    seen = os.environ.get("HARNESS_OTHER_THREADS", "")
    return int(seen) if seen.isdigit() else 0


def choose_threads(requested: int | None) -> tuple[int, str]:
    """torch's CPU threads and why: `requested` (--threads), else OMP_NUM_THREADS when set, else the
    usable cores that other jobs' ready threads leave free when harness started (at least one;
    shared out between the processes of a run on this machine): beside jobs that fill the cores
    one thread finishes sooner than two that wait for each other (docs/speed.md, "Threads")."""
    if requested is not None:
        return requested, f"{requested} (--threads)"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), f"{torch.get_num_threads()} (OMP_NUM_THREADS)"
    cores, load, others = usable_cores(), load_average(), other_threads()
    count = max(1, (cores - others) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    seen = "" if load is None else f", load average {load:.2f}"
    busy = f", {others} threads of other jobs ready to run" if others else ""
    return count, (f"{count} ({cores} usable cores{busy}{seen}; OpenMP wait: {openmp_wait()}; "
                   "--threads overrides)")


LONG_SPIN = 100_000  # spins (GOMP_SPINCOUNT) past which a waiting thread holds its core against other jobs


def openmp_wait() -> str:
    """How torch's OpenMP threads wait for work, as the environment sets it (harness/cli.py)."""
    policy, spins = os.environ.get("OMP_WAIT_POLICY", ""), os.environ.get("GOMP_SPINCOUNT", "")
    said = ", ".join(f"{k}={v}" for k, v in (("OMP_WAIT_POLICY", policy), ("GOMP_SPINCOUNT", spins)) if v)
    why = os.environ.get("HARNESS_OPENMP_WAIT")
    return (said + (f" ({why})" if why else "")) if said else "libgomp's default (a long spin)"


def spins_long() -> bool:
    """Whether waiting threads spin long enough to hold cores that other jobs need."""
    policy, spins = os.environ.get("OMP_WAIT_POLICY", "").upper(), os.environ.get("GOMP_SPINCOUNT", "")
    if spins.isdigit():
        return int(spins) > LONG_SPIN
    return policy != "PASSIVE"


def busy_machine_warning(device: torch.device, peak: Peak | None = None, load: float | None = None) -> str | None:
    """One line when the figures measured now would be low because the machine is shared: on
    the CPU a load average above BUSY_LOAD (another job; `load`, read before measuring, else
    now), or a peak that varied widely."""
    reasons = []
    load = load_average() if load is None else load
    if device.type == "cpu" and load is not None and load > BUSY_LOAD:
        reasons.append(f"load average {load:.2f} on {os.cpu_count()} cores")
    if peak is not None and peak.spread > WIDE_SPREAD:
        reasons.append(f"the {peak.dtype} matmul peak varied from {peak.low / 1e9:.3g} to {peak.high / 1e9:.3g} "
                       "GFLOP/s")
    if not reasons:
        return None
    return (f"warning: the machine looks busy ({'; '.join(reasons)}); speed and MFU figures will read low"
            + (f"; torch's threads spin long while they wait ({openmp_wait()}), which beside other jobs can slow "
               "the run many times over (docs/speed.md, \"Threads\")" if spins_long() else ""))
