"""Coding-rate scores and selection rules of ByteFlow (byteflow/coding_rate.py)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 60), rate=st.floats(0.01, 1.0), seed=st.integers(0, 10_000))
def test_top_k_selects_k_largest_with_position_zero(length, rate, seed):
    scores = torch.randn(3, length, generator=torch.Generator().manual_seed(seed))
    k = cr.selected_count(length, rate)
    mask = cr.select_top_k(scores, k)
    assert (mask.sum(1) == k).all() and mask[:, 0].all()
    for row, chosen in zip(scores, mask):
        rest = row[1:][~chosen[1:]]
        if len(rest) and chosen[1:].any():
            assert row[1:][chosen[1:]].min() >= rest.max()


@settings(max_examples=25, deadline=None)
@given(length=st.integers(2, 60), window=st.integers(1, 20), seed=st.integers(0, 10_000))
def test_causal_rules_decide_each_position_from_its_prefix(length, window, seed):
    scores = torch.randn(2, length, generator=torch.Generator().manual_seed(seed))
    full_threshold = cr.select_threshold(scores, 0.3)
    full_rolling = cr.select_rolling(scores, window, 0.3)
    for t in range(1, length + 1):
        assert torch.equal(cr.select_threshold(scores[:, :t], 0.3), full_threshold[:, :t])
        assert torch.equal(cr.select_rolling(scores[:, :t], window, 0.3), full_rolling[:, :t])


def test_top_k_is_not_causal():
    scores = torch.tensor([[0.0, 5.0, 4.0, 1.0, 1.0]])
    before = cr.select_top_k(scores, 2)
    scores[0, 4] = 9.0  # a later score pushes position 1 out
    after = cr.select_top_k(scores, 2)
    assert before[0, 1] and not after[0, 1]


def test_rolling_rule_matches_a_direct_count_and_its_rate():
    scores = torch.randn(4, 300, generator=torch.Generator().manual_seed(3))
    window, rate = 16, 0.25
    mask = cr.select_rolling(scores, window, rate)
    for b in range(4):
        for t in range(1, 300):
            recent = scores[b, max(0, t - window + 1) : t + 1]
            assert bool(mask[b, t]) == bool((recent > scores[b, t]).sum() < rate * len(recent))
    assert mask[:, 0].all()
    assert abs(float(mask[:, window:].double().mean()) - rate) < 0.03


def test_calibrated_threshold_selects_k_per_window_on_average():
    scores = torch.rand(50, 64, generator=torch.Generator().manual_seed(4)).double()
    k = cr.selected_count(64, 0.25)
    threshold = cr.calibrate_threshold(scores, k)
    selected = cr.select_threshold(scores, threshold).sum(1).double().mean()
    assert abs(float(selected) - k) < 0.05
    assert cr.calibrate_threshold(scores, 1) == math.inf  # only position 0


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_chunk_layout_matches_a_python_loop(length, seed):
    mask = torch.rand(3, length, generator=torch.Generator().manual_seed(seed)) < 0.3
    mask[:, 0] = True
    slots = int(mask.sum(1).max())
    starts, chunk, offset = cr.chunk_layout(mask, slots)
    assert starts.shape == (3, slots)
    for b in range(3):
        positions = [t for t in range(length) if mask[b, t]]
        assert starts[b, : len(positions)].tolist() == positions
        assert all(not mask[b, p] for p in starts[b, len(positions) :].tolist())  # padding: unselected positions
        for t in range(length):
            latest = max(p for p in positions if p <= t)
            assert chunk[b, t] == positions.index(latest) and offset[b, t] == t - latest


def test_selected_count_rounds_and_is_at_least_one():
    assert cr.selected_count(128, 0.25) == 32
    assert cr.selected_count(10, 0.25) == 3  # 2.5 rounds half up
    assert cr.selected_count(3, 0.01) == 1 and cr.selected_count(5, 1.0) == 5
