"""Coding-rate scores of ByteFlow (byteflow/coding_rate.py) against direct log-determinants and the FLOP counter."""

import pytest
import torch

from byteflow import coding_rate as cr
from harness.modeling.flops import measure_forward


def direct_gains(h: torch.Tensor, a: float) -> torch.Tensor:
    """gain_t = 1/2 logdet(I + a H_{1:t}^T H_{1:t}) - 1/2 logdet(I + a H_{1:t-1}^T H_{1:t-1}), one slogdet per t."""
    h = h.double()
    eye = torch.eye(h.shape[-1], dtype=torch.float64)
    rates = [torch.zeros(h.shape[0], dtype=torch.float64)]
    for t in range(1, h.shape[1] + 1):
        sign, logdet = torch.linalg.slogdet(eye + a * h[:, :t].mT @ h[:, :t])
        assert (sign > 0).all()
        rates.append(0.5 * logdet)
    return torch.stack(rates, 1).diff(dim=1)


@pytest.mark.parametrize("length, dim, block", [(40, 8, 0), (40, 8, 7), (40, 8, 8), (33, 16, 5), (12, 24, 0), (12, 24, 4), (70, 6, 64)])
@pytest.mark.parametrize("eps", [0.5, 4.0])
def test_incremental_gains_match_direct_log_determinants(length, dim, block, eps):
    torch.manual_seed(length + dim + block)
    h = torch.randn(3, length, dim, dtype=torch.float64) * torch.rand(3, length, 1, dtype=torch.float64) * 3
    a = dim / eps**2
    gains = cr.logdet_gains(h, a, block)
    expected = direct_gains(h, a)
    assert gains.dtype == torch.float64 and gains.shape == (3, length)
    assert ((gains - expected).abs() / expected.abs()).max() < 1e-6
    assert (gains > 0).all()


def test_gains_of_float32_inputs_are_computed_in_float64():
    torch.manual_seed(0)
    h = torch.randn(2, 50, 8)
    expected = direct_gains(h.double(), 8 / 0.25)
    assert ((cr.logdet_gains(h, 8 / 0.25, 16) - expected).abs() / expected).max() < 1e-6


@pytest.mark.parametrize("block", [0, 6])
def test_gain_at_t_depends_only_on_h_up_to_t(block):
    torch.manual_seed(1)
    h = torch.randn(1, 30, 5, dtype=torch.float64)
    gains = cr.logdet_gains(h, 2.0, block)
    for j in (0, 5, 6, 17, 29):
        changed = h.clone()
        changed[:, j] += torch.randn(5, dtype=torch.float64)
        other = cr.logdet_gains(changed, 2.0, block)
        assert torch.equal(other[:, :j], gains[:, :j])
        assert (other[:, j] != gains[:, j]).all()


def test_scores_carry_no_gradient():
    h = torch.randn(2, 10, 4, requires_grad=True)
    assert not cr.logdet_gains(h, 1.0).requires_grad
    assert not cr.l2_scores(h).requires_grad
    torch.testing.assert_close(cr.l2_scores(h), (h.detach() ** 2).sum(-1))


@pytest.mark.parametrize("length, dim, block", [(64, 16, 0), (64, 16, 16), (70, 16, 16), (50, 8, 64)])
def test_counted_scoring_flops_match_flop_counter(length, dim, block):
    h = torch.randn(2, length, dim)
    counted, uncounted = cr.logdet_flops(length, dim, block)
    assert measure_forward(cr.logdet_gains, h, 1.0, block) == 2 * counted
    # one factorisation of the whole window: the T^3 / 3 Cholesky and nothing else unseen
    assert cr.logdet_flops(length, dim, 0)[1] == length**3 / 3


def test_blockwise_scoring_is_cheaper_for_long_windows():
    full = sum(cr.logdet_flops(512, 64, 0))
    blocked = sum(cr.logdet_flops(512, 64, 64))
    assert blocked < 0.3 * full
