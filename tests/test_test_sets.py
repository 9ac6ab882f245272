"""Extra test sets (RunRecord.test_sets): each is scored under the model's evaluation rule and
charged the forward FLOPs counted on its own windows, so a set whose text cuts into more units
shows a higher cost per byte."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from harness.api import registry
from harness.run import data
from harness.run.evaluate import evaluate
from harness.run.pipeline import score_test_set
from tests.conftest import SMALL_CONFIGS, context

TEXT = data.embedded_corpus("pydoc-topics", 8192)


def reference_flops_per_byte(model, windows: torch.Tensor) -> float:
    """torch's own counter, one window at a time (no batch padding), with attention on the math
    backend: torch 2.13 counts the fused CPU kernel as zero."""
    total = 0
    for window in windows.split(1):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
            model(window)
        total += counter.get_total_flops()
    return total / windows.numel()


def test_a_test_set_is_scored_and_charged_on_its_own_windows():
    torch.manual_seed(0)
    model = registry.build("hnet", SMALL_CONFIGS["hnet"]).eval()
    prose = data.windows(TEXT, 64, 8)
    digits = data.windows(bytes(str(list(range(2000))), "ascii"), 64, 8)
    ctx = context(64)
    scores = {name: score_test_set(model, w, ctx, 4, "language", name) for name, w in (("prose", prose), ("digits", digits))}
    for name, windows in (("prose", prose), ("digits", digits)):
        assert scores[name].bpb == pytest.approx(evaluate(model, windows, 4, ctx.device).bpb, rel=1e-9)
        assert scores[name].bytes == windows.numel() and scores[name].kind == "language" and scores[name].label == name
        assert scores[name].flops_per_byte == pytest.approx(reference_flops_per_byte(model, windows), rel=1e-9)
    assert scores["prose"].flops_per_byte != scores["digits"].flops_per_byte  # chunk counts follow the text
