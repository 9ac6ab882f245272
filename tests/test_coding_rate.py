"""Coding-rate scores of ByteFlow (byteflow/coding_rate.py): every reading against direct
log-determinants, causality, the FLOP counter, and where each reading puts chunk starts."""

import pytest
import torch

from byteflow import coding_rate as cr
from harness.modeling import chunking
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


def direct_rate(h: torch.Tensor, a: float) -> torch.Tensor:
    """1/2 logdet(I + a H^T H) of (B, n, d) vectors, one slogdet (0 for n = 0)."""
    eye = torch.eye(h.shape[-1], dtype=torch.float64)
    sign, logdet = torch.linalg.slogdet(eye + a * h.double().mT @ h.double())
    assert (sign > 0).all()
    return 0.5 * logdet


def direct_scores(h: torch.Tensor, score: str, a: float, context: int) -> torch.Tensor:
    """Each reading of the module docstring, position by position, from its definition."""
    h = h.double()
    B, T, _ = h.shape
    columns = []
    for t in range(T):
        if score == "logdet":
            value = direct_rate(h[:, : t + 1], a) - direct_rate(h[:, :t], a)
        elif score == "logdet_normalized":
            value = direct_rate(h[:, : t + 1], a / (t + 1)) - (direct_rate(h[:, :t], a / t) if t else 0.0)
        elif score == "logdet_recent":
            first = max(0, t - context + 1)
            value = direct_rate(h[:, first : t + 1], a) - direct_rate(h[:, first:t], a)
        elif score == "l2":
            value = (h[:, t] ** 2).sum(-1)
        else:  # l2_streaming
            value = (h[:, : t + 1] ** 2).sum((1, 2)).sqrt() - (h[:, :t] ** 2).sum((1, 2)).sqrt()
        columns.append(value)
    return torch.stack(columns, 1)


@pytest.mark.parametrize("score", cr.SCORES)
@pytest.mark.parametrize("length, dim, block, context", [(40, 8, 0, 16), (33, 16, 5, 4), (12, 24, 4, 1), (20, 6, 7, 40)])
def test_every_reading_matches_its_definition(score, length, dim, block, context):
    torch.manual_seed(length + dim)
    h = torch.randn(2, length, dim, dtype=torch.float64) * torch.rand(2, length, 1, dtype=torch.float64) * 3
    a = dim / 4.0
    got = cr.scores(h, score, a, block, context)
    expected = direct_scores(h, score, a, context)
    assert got.shape == (2, length)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-9)


def test_recent_context_covering_the_window_is_the_prefix_gain():
    h = torch.randn(2, 30, 5, dtype=torch.float64)
    torch.testing.assert_close(cr.recent_logdet_gains(h, 0.5, 30), cr.logdet_gains(h, 0.5))


@pytest.mark.parametrize("score", cr.SCORES)
def test_every_reading_at_t_depends_only_on_h_up_to_t(score):
    torch.manual_seed(2)
    h = torch.randn(1, 30, 5, dtype=torch.float64)
    base = cr.scores(h, score, 2.0, 6, 8)
    for j in (0, 5, 6, 17, 29):
        changed = h.clone()
        changed[:, j] += torch.randn(5, dtype=torch.float64)
        other = cr.scores(changed, score, 2.0, 6, 8)
        assert torch.equal(other[:, :j], base[:, :j]), j
        assert (other[:, j] != base[:, j]).all()


@pytest.mark.parametrize("score", cr.SCORES)
@pytest.mark.parametrize("length, block, context", [(64, 16, 16), (70, 0, 8), (10, 64, 32)])
def test_counted_flops_of_every_reading_match_flop_counter(score, length, block, context):
    h = torch.randn(2, length, 16)
    counted, uncounted = cr.score_flops(score, length, 16, block, context)
    assert measure_forward(cr.scores, h, score, 1.0, block, context) == 2 * counted
    assert (uncounted > 0) == score.startswith("logdet")


def test_unknown_reading_is_an_error():
    with pytest.raises(ValueError, match="known"):
        cr.scores(torch.randn(1, 4, 2), "entropy", 1.0)


def mean_start(scores: torch.Tensor, rate: float = 0.25) -> dict[str, float]:
    """Mean chunk-start position under top-K and under a threshold calibrated to the same rate."""
    k = chunking.selected_count(scores.shape[1], rate)
    masks = {"topk": chunking.select_top_k(scores, k),
             "threshold": chunking.select_threshold(scores, chunking.threshold_for_rate(scores, k))}
    position = torch.arange(scores.shape[1], dtype=torch.float64)
    return {rule: float((m.double() * position).sum() / m.sum()) for rule, m in masks.items()}


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_where_each_reading_starts_chunks_on_random_encoder_states(scale):
    """Independent random states carry the same information everywhere, so a score that is
    not positional spreads starts evenly: mean start (T - 1) / 2. The recent-context gain and
    ||h||^2 do (within 20%); the prefix gains (logdet, logdet_normalized, l2_streaming) pile
    them into the first part of the window."""
    torch.manual_seed(0)
    T, d = 256, 48
    h = torch.randn(32, T, d) * scale
    uniform = (T - 1) / 2
    for score in cr.SCORES:
        means = mean_start(cr.scores(h, score, d / 16, 64, 16))
        for rule, mean in means.items():
            if score in ("logdet_recent", "l2"):
                assert abs(mean - uniform) < 0.2 * uniform, (score, rule, mean)
            else:
                assert mean < 0.7 * uniform, (score, rule, mean)


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
