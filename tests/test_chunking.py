"""The shared chunking module (harness/modeling/chunking.py): selection rules, their causality,
threshold calibration and the unit layout."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.modeling import chunking as ch


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 60), rate=st.floats(0.01, 1.0), seed=st.integers(0, 10_000))
def test_top_k_selects_k_largest_with_position_zero(length, rate, seed):
    scores = torch.randn(3, length, generator=torch.Generator().manual_seed(seed))
    k = ch.selected_count(length, rate)
    mask = ch.select_top_k(scores, k)
    assert (mask.sum(1) == k).all() and mask[:, 0].all()
    for row, chosen in zip(scores, mask):
        rest = row[1:][~chosen[1:]]
        if len(rest) and chosen[1:].any():
            assert row[1:][chosen[1:]].min() >= rest.max()


@settings(max_examples=25, deadline=None)
@given(length=st.integers(2, 60), window=st.integers(1, 20), seed=st.integers(0, 10_000))
def test_causal_rules_decide_each_position_from_its_prefix(length, window, seed):
    scores = torch.randn(2, length, generator=torch.Generator().manual_seed(seed))
    full_threshold = ch.select_threshold(scores, 0.3)
    full_rolling = ch.select_rolling(scores, window, 0.3)
    for t in range(1, length + 1):
        assert torch.equal(ch.select_threshold(scores[:, :t], 0.3), full_threshold[:, :t])
        assert torch.equal(ch.select_rolling(scores[:, :t], window, 0.3), full_rolling[:, :t])


def test_top_k_is_not_causal():
    scores = torch.tensor([[0.0, 5.0, 4.0, 1.0, 1.0]])
    before = ch.select_top_k(scores, 2)
    scores[0, 4] = 9.0  # a later score pushes position 1 out
    after = ch.select_top_k(scores, 2)
    assert before[0, 1] and not after[0, 1]


def test_rolling_rule_matches_a_direct_count_and_its_rate():
    scores = torch.randn(4, 300, generator=torch.Generator().manual_seed(3))
    window, rate = 16, 0.25
    mask = ch.select_rolling(scores, window, rate)
    for b in range(4):
        for t in range(1, 300):
            recent = scores[b, max(0, t - window + 1) : t + 1]
            assert bool(mask[b, t]) == bool((recent > scores[b, t]).sum() < rate * len(recent))
    assert mask[:, 0].all()
    assert abs(float(mask[:, window:].double().mean()) - rate) < 0.03


def test_calibrated_threshold_selects_k_per_window_on_average():
    scores = torch.rand(50, 64, generator=torch.Generator().manual_seed(4)).double()
    k = ch.selected_count(64, 0.25)
    threshold = ch.threshold_for_rate(scores, k)
    selected = ch.select_threshold(scores, threshold).sum(1).double().mean()
    assert abs(float(selected) - k) < 0.05
    assert ch.threshold_for_rate(scores, 1) == math.inf  # only position 0


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_chunk_layout_matches_a_python_loop(length, seed):
    mask = torch.rand(3, length, generator=torch.Generator().manual_seed(seed)) < 0.3
    mask[:, 0] = True
    slots = int(mask.sum(1).max())
    starts, chunk, offset = ch.layout(mask, slots)
    assert starts.shape == (3, slots)
    for b in range(3):
        positions = [t for t in range(length) if mask[b, t]]
        assert starts[b, : len(positions)].tolist() == positions
        assert all(not mask[b, p] for p in starts[b, len(positions) :].tolist())  # padding: unselected positions
        for t in range(length):
            latest = max(p for p in positions if p <= t)
            assert chunk[b, t] == positions.index(latest) and offset[b, t] == t - latest


def test_selected_count_rounds_and_is_at_least_one():
    assert ch.selected_count(128, 0.25) == 32
    assert ch.selected_count(10, 0.25) == 3  # 2.5 rounds half up
    assert ch.selected_count(3, 0.01) == 1 and ch.selected_count(5, 1.0) == 5
