"""Intervals and significance for bits-per-byte figures, from scipy.

- Several seeds: mean test bpb with a 95% Student-t interval over the seeds.
- One seed: a 95% bootstrap interval over the evaluation windows (all windows
  have the same length, so the bpb of a run is the mean of its window bpbs).
- Ranking: every model against the best one of the same budget. Where both have
  at least two seeds, Welch's t-test over the seed means; otherwise a paired
  t-test over the windows (all models score the same windows). A difference with
  p >= 0.05 is marked as not significant.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from harness.run.records import Evaluation, RunRecord

CONFIDENCE = 0.95
ALPHA = 0.05


def window_bpb(record: RunRecord, split: str = "test") -> np.ndarray:
    return evaluation_window_bpb(getattr(record, split))


def evaluation_window_bpb(result: Evaluation) -> np.ndarray:
    """The bpb of each scored window of one evaluation (a split, or a test set)."""
    per_window_bytes = result.bytes / result.windows
    return np.asarray(result.window_nll_nats) / (math.log(2) * per_window_bytes)


def seed_interval(values: list[float] | np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% Student-t interval over seeds; low = high = mean for one value
    or for values that do not vary (scipy would give nan)."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2 or np.ptp(values) == 0:
        return mean, mean, mean
    low, high = stats.t.interval(CONFIDENCE, len(values) - 1, loc=mean, scale=stats.sem(values))
    return mean, float(low), float(high)


def bootstrap_interval(per_window: np.ndarray, seed: int = 0, resamples: int = 2000) -> tuple[float, float, float]:
    """(mean, low, high): 95% percentile bootstrap interval of the mean over windows."""
    per_window = np.asarray(per_window, dtype=float)
    mean = float(per_window.mean())
    if len(per_window) < 2:
        return mean, mean, mean
    result = stats.bootstrap((per_window,), np.mean, confidence_level=CONFIDENCE, n_resamples=resamples,
                             method="percentile", random_state=np.random.default_rng(seed))
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high)


def difference_p_value(a_runs: list[RunRecord], b_runs: list[RunRecord]) -> tuple[float, str]:
    """p-value of the difference in test bpb between two models' runs at one budget, and the test used."""
    if len(a_runs) >= 2 and len(b_runs) >= 2:
        a = [r.test.bpb for r in a_runs]
        b = [r.test.bpb for r in b_runs]
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue), "Welch t over seeds"
    a = np.mean([window_bpb(r) for r in a_runs], axis=0)
    b = np.mean([window_bpb(r) for r in b_runs], axis=0)
    if np.allclose(a, b):
        return 1.0, "paired t over windows"
    return float(stats.ttest_rel(a, b).pvalue), "paired t over windows"
