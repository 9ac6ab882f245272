import pytest
import torch

from harness.api import registry
from harness.analysis.audit import assert_causal, causality_audit
from tests.checks import assert_flops_match


@pytest.mark.parametrize("config", [
    {"d_model": 64, "n_layers": 2, "n_heads": 4},
    {"d_model": 48, "n_layers": 2, "n_heads": 3, "attn_window": 32},
])
@pytest.mark.parametrize("window", [96, 130])
def test_flops_match_flop_counter(config, window):
    model = registry.build("bytes", config)
    assert_flops_match(model, torch.randint(0, 256, (2, window)))


@pytest.mark.parametrize("config", [{"d_model": 32, "n_layers": 2, "n_heads": 2}, {"d_model": 32, "n_layers": 2, "n_heads": 2, "attn_window": 16}])
def test_causality_audit_passes(config):
    torch.manual_seed(0)
    model = registry.build("bytes", config)
    window = bytes(range(40, 140))
    assert_causal(model, window, positions=[0, 1, 15, 16, 17, 50, 99])


class PeekingBytes(registry.get("bytes")):
    """A deliberately broken model: it feeds byte t itself into the prediction of byte t."""

    def next_byte_logits(self, windows):
        return self.head(self.body(self.embed(windows)))


def test_causality_audit_catches_a_leak():
    model = PeekingBytes(PeekingBytes.Config(d_model=32, n_layers=1, n_heads=2))
    results = causality_audit(model, bytes(range(64)), positions=[5, 30])
    assert any(not r.passed(1e-5) for r in results)
    with pytest.raises(AssertionError, match="causality leak"):
        assert_causal(model, bytes(range(64)), positions=[5, 30])


def test_output_shape_and_gradient():
    model = registry.build("bytes", {"d_model": 32, "n_layers": 1, "n_heads": 2})
    nll = model(torch.randint(0, 256, (3, 17)))
    assert nll.shape == (3, 17) and (nll > 0).all()
    nll.mean().backward()
    assert model.embed.weight.grad is not None
