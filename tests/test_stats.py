import math
from types import SimpleNamespace

import numpy as np
import pytest

from harness.analysis import stats
from harness.run.records import Evaluation


def test_seed_interval_matches_the_textbook_t_interval():
    # mean 3, sample sd sqrt(2.5), t(0.975, 4) = 2.776445: half-width 2.776445 * sqrt(2.5) / sqrt(5)
    mean, low, high = stats.seed_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)
    assert mean == 3.0
    assert low == pytest.approx(3.0 - half, rel=1e-9) and high == pytest.approx(3.0 + half, rel=1e-9)


def test_one_seed_has_no_seed_interval():
    assert stats.seed_interval([2.5]) == (2.5, 2.5, 2.5)
    assert stats.seed_interval([2.5, 2.5, 2.5]) == (2.5, 2.5, 2.5)  # no spread: no nan from scipy


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_windows():
    rng = np.random.default_rng(0)
    small = rng.normal(3.0, 0.5, 50)
    large = rng.normal(3.0, 0.5, 5000)
    m1, l1, h1 = stats.bootstrap_interval(small)
    m2, l2, h2 = stats.bootstrap_interval(large)
    assert l1 < m1 < h1 and l2 < m2 < h2
    assert (h2 - l2) < (h1 - l1) / 5
    # the normal-theory width 2 * 1.96 * sd / sqrt(n) is what the bootstrap should approach
    assert (h2 - l2) == pytest.approx(2 * 1.96 * large.std(ddof=1) / math.sqrt(len(large)), rel=0.1)


def _record(bpbs):
    nll = [b * math.log(2) * 100 for b in bpbs]
    return SimpleNamespace(test=Evaluation(bpb=float(np.mean(bpbs)), bytes=100 * len(bpbs), windows=len(bpbs),
                                           window_nll_nats=nll))


def test_window_bpb_recovers_the_run_bpb():
    record = _record([3.0, 4.0, 5.0])
    assert stats.window_bpb(record).mean() == pytest.approx(record.test.bpb)


def test_paired_test_over_windows_separates_a_real_gap_from_noise():
    rng = np.random.default_rng(1)
    base = rng.normal(3.0, 0.4, 64)
    better = _record(list(base - 0.2 + rng.normal(0, 0.01, 64)))
    same = _record(list(base + rng.normal(0, 0.01, 64)))
    p_gap, method = stats.difference_p_value([better], [_record(list(base))])
    p_noise, _ = stats.difference_p_value([same], [_record(list(base))])
    assert method == "paired t over windows"
    assert p_gap < 1e-6 and p_noise > 0.01


def test_welch_over_seeds_when_both_have_several():
    a = [_record([3.00]), _record([3.02]), _record([2.98])]
    b = [_record([3.50]), _record([3.52]), _record([3.48])]
    p, method = stats.difference_p_value(a, b)
    assert method == "Welch t over seeds" and p < 1e-3
