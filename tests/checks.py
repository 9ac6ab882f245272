"""Checks every adapter's tests call: the analytic FLOP count against FlopCounterMode."""

from __future__ import annotations

import torch

from harness.modeling.flops import measure_forward
from harness.api.registry import Adapter


def assert_flops_match(model: Adapter, windows: torch.Tensor, tolerance: float = 0.02) -> tuple[float, float]:
    """Analytic forward FLOPs per byte within `tolerance` (relative) of the counted ones."""
    model.eval()
    analytic = model.flops_per_byte(windows.shape[1])["total"]
    measured = measure_forward(model, windows) / windows.numel() + model.uncounted_flops_per_byte(windows.shape[1])
    assert abs(analytic - measured) <= tolerance * measured, f"analytic {analytic:.6g} vs counted {measured:.6g} FLOPs/byte"
    return analytic, measured
