"""The one evaluator: bits per byte on fixed W-byte windows, each scored from an
empty context (docs/protocols.md, "1. Bytes and bits per byte"). The evaluator owns the windows; adapters
only return per-byte NLLs."""

from __future__ import annotations

import math

import torch

from harness.api import Adapter
from harness.modeling.runtime import autocast, to_device
from harness.run.records import Evaluation


@torch.no_grad()
def window_nll(model: Adapter, windows: torch.Tensor, batch_windows: int, device: torch.device) -> torch.Tensor:
    """Summed NLL in nats of each window: (N,) float64."""
    was_training = model.training
    model.eval()
    totals = []
    try:
        for start in range(0, len(windows), batch_windows):
            batch = to_device(windows[start : start + batch_windows], device)
            with autocast(device):
                nll = model(batch)
            totals.append(nll.double().sum(dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(totals) if totals else torch.zeros(0, dtype=torch.float64)


def bits_per_byte(total_nll_nats: float, scored_bytes: int) -> float:
    return total_nll_nats / (math.log(2) * scored_bytes)


def evaluate(model: Adapter, windows: torch.Tensor, batch_windows: int, device: torch.device,
             label: str | None = None) -> Evaluation:
    """bpb over all windows, plus each window's NLL (for intervals over windows)."""
    nll = window_nll(model, windows, batch_windows, device)
    return Evaluation(bpb=bits_per_byte(float(nll.sum()), windows.numel()), bytes=windows.numel(), windows=len(windows),
                      window_nll_nats=[round(float(x), 6) for x in nll], label=label)
