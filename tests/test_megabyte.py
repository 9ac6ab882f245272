import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from harness.modeling import flops

from harness.api import registry
from harness.analysis.audit import assert_causal, causality_audit
from harness.errors import HarnessError
from harness.run.records import read_suite_records
from harness.orchestrate.runner import run_suite
from harness.orchestrate.suite import load_suite
from tests.checks import assert_flops_match
from tests.conftest import tiny_suite

TINY = {"d_embed": 8, "d_global": 32, "global_layers": 2, "global_heads": 2, "d_local": 16, "local_layers": 2, "local_heads": 2}


def build(patch_size: int, **overrides):
    torch.manual_seed(patch_size)
    return registry.build("megabyte", TINY | {"patch_size": patch_size} | overrides)


def patch_edges(patch_size: int, window: int) -> list[int]:
    """First, middle and last byte of the first, a middle and the last (possibly partial) patch."""
    n = math.ceil(window / patch_size)
    starts = [0, (n // 2) * patch_size, (n - 1) * patch_size]
    positions = {min(s + offset, window - 1) for s in starts for offset in (0, patch_size // 2, patch_size - 1)}
    return sorted(positions)


@pytest.mark.parametrize("patch_size", [4, 8])
@pytest.mark.parametrize("window", [64, 70])
def test_flops_match_flop_counter(patch_size, window):
    model = registry.build("megabyte", {"patch_size": patch_size})
    analytic, _ = assert_flops_match(model, torch.randint(0, 256, (2, window)))
    terms = model.flops_per_byte(window)
    assert analytic == pytest.approx(sum(v for k, v in terms.items() if k != "total"))
    if window % patch_size == 0:  # the global model costs 1/P of a byte-level model of its size per byte
        c = model.config
        global_per_patch = flops.transformer(window // patch_size, c.d_global, c.global_layers, c.mlp_ratio) / (window // patch_size)
        assert terms["global"] == pytest.approx(global_per_patch / patch_size)


def test_flops_match_for_a_window_shorter_than_a_patch():
    assert_flops_match(build(8), torch.randint(0, 256, (2, 5)))


@pytest.mark.parametrize("patch_size", [4, 8])
@pytest.mark.parametrize("window", [64, 61])
def test_causality_audit_passes_at_patch_edges(patch_size, window):
    model = build(patch_size)
    positions = patch_edges(patch_size, window)
    assert len(positions) >= 7
    results = assert_causal(model, bytes((37 * i + 11) % 256 for i in range(window)), positions)
    # perturbing any byte but the last moves some later prediction: the audit is not vacuous anywhere
    assert all(r.max_change_after > 1e-5 for r in results if r.position < window - 1)


class GlobalSeesOwnPatch(registry.get("megabyte")):
    """A deliberately broken MegaByte: the global input at patch k is patch k itself."""

    def global_context(self, patches):
        B, n, P = patches.shape
        return self.global_in(self.global_embed(patches).reshape(B, n, P * self.config.d_embed))


def test_causality_audit_catches_a_global_leak():
    torch.manual_seed(0)
    model = GlobalSeesOwnPatch(GlobalSeesOwnPatch.Config(**TINY, patch_size=4))
    window = bytes(range(40, 80))
    results = causality_audit(model, window, positions=[8, 9, 11])
    assert all(not r.passed(1e-5) for r in results)  # any byte of patch 2 moves the prediction of its first byte
    with pytest.raises(AssertionError, match="causality leak"):
        assert_causal(model, window, positions=[9])


@pytest.mark.parametrize("patch_size", [4, 8])
def test_unaligned_window_scores_every_byte_once_and_no_padding(patch_size):
    model = build(patch_size).eval()
    window = 19  # 19 = 4 * 4 + 3 = 2 * 8 + 3
    x = torch.randint(0, 256, (2, window), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        nll = model(x)
        logits = model.next_byte_logits(x)
        assert nll.shape == (2, window) and logits.shape == (2, window, 256)
        # explicit per-byte computation: byte t scored as the last byte of the prefix x[:, :t+1],
        # which the model pads differently (or not at all)
        explicit = torch.stack([model(x[:, : t + 1])[:, -1] for t in range(window)], dim=1)
        torch.testing.assert_close(nll, explicit, atol=1e-5, rtol=1e-5)
        assert float(nll.double().sum()) == pytest.approx(float(explicit.double().sum()), rel=1e-6)
        # whatever fills the rest of the last patch, the W real bytes score the same
        aligned = math.ceil(window / patch_size) * patch_size
        for fill in (0, 255):
            extended = F.pad(x, (0, aligned - window), value=fill)
            torch.testing.assert_close(model(extended)[:, :window], nll, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(nll, F.cross_entropy(logits.transpose(1, 2), x, reduction="none"))


def test_window_shorter_than_a_patch():
    model = build(8).eval()
    x = torch.randint(0, 256, (3, 5))
    with torch.no_grad():
        nll = model(x)
    assert nll.shape == (3, 5) and torch.isfinite(nll).all()


def test_every_parameter_gets_a_gradient():
    model = build(4)
    model(torch.randint(0, 256, (3, 18))).mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_units_per_byte_is_one_patch_per_p_bytes():
    assert build(8).units_per_byte() == 1 / 8


@pytest.mark.parametrize("bad", [{"d_global": 30, "global_heads": 4}, {"d_local": 24, "local_heads": 5}, {"patch_size": 0}])
def test_bad_configs_are_rejected(bad):
    with pytest.raises(ValidationError):
        registry.build("megabyte", TINY | bad)


def test_bad_config_in_a_suite_is_one_line(write_suite):
    suite = tiny_suite(models=[{"name": "mb", "adapter": "megabyte", "config": TINY | {"d_local": 24, "local_heads": 5}}])
    with pytest.raises(HarnessError, match=r"models\[0\]\.config: .*d_local 24 must split"):
        load_suite(write_suite(suite))


def test_trains_and_evaluates_through_the_runner(write_suite, tmp_path):
    suite = tiny_suite(
        eval={"window": 60, "max_windows": 8, "batch_windows": 8},  # 60 is not a multiple of 8
        budgets=[1.5e9],
        models=[
            {"name": "megabyte-p4", "adapter": "megabyte", "config": TINY | {"patch_size": 4}},
            {"name": "megabyte-p8", "adapter": "megabyte", "config": TINY | {"patch_size": 8}},
        ],
    )
    records = {r.model.name: r for r in read_suite_records(run_suite(write_suite(suite), tmp_path, "cpu", show_progress=False))}
    assert set(records) == {"megabyte-p4", "megabyte-p8"}
    for name, patch_size in (("megabyte-p4", 4), ("megabyte-p8", 8)):
        record = records[name]
        assert record.bytes_per_unit == patch_size
        assert record.test.bytes == 8 * 60 and math.isfinite(record.test.bpb)
        analytic = record.flops_per_byte.analytic["total"]
        assert abs(record.flops_per_byte.counted_training - analytic) <= 0.02 * analytic
        assert abs(record.flops_per_byte.test - analytic) <= 0.02 * analytic
        first, last = record.loss_curve[0].train_bpb, record.loss_curve[-1].train_bpb
        assert last < first - 0.5
