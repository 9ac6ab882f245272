"""Chunking, shared by every model that groups bytes into units (patches, chunks): the
layout of a boundary mask, unit lengths, a length cap, selection rules, threshold
calibration and the training windows calibration uses.

A boundary mask `starts` is a (B, W) bool tensor: starts[b, t] says that a unit begins
at byte t of window b; starts[:, 0] is always True. No Python loops over positions: caps
are cumulative maxima, layouts are cumsums and sorts, calibration bisects.
"""

from __future__ import annotations

import math

import torch

from harness.modeling.windows import windows
from harness.errors import HarnessError


def shift(x: torch.Tensor, k: int, fill: bool | float = False) -> torch.Tensor:
    """x shifted right by k along the last axis: out[..., t] = x[..., t - k], `fill` before the start."""
    k = min(k, x.shape[-1])
    pad = torch.full((*x.shape[:-1], k), fill, dtype=x.dtype, device=x.device)
    return torch.cat((pad, x[..., : x.shape[-1] - k]), dim=-1)


def static_starts(batch: int, window: int, size: int, device=None) -> torch.Tensor:
    """A unit every `size` bytes."""
    starts = torch.arange(window, device=device) % size == 0
    return starts.expand(batch, window)


def cap_lengths(starts: torch.Tensor, limit: int) -> torch.Tensor:
    """Add a start every `limit` bytes after each start, so no unit is longer than `limit`."""
    position = torch.arange(starts.shape[-1], device=starts.device)
    last_start = torch.where(starts, position, 0).cummax(dim=-1).values  # starts[:, 0] is True
    return (position - last_start) % limit == 0


def unit_lengths(starts: torch.Tensor) -> torch.Tensor:
    """Lengths of all units of all windows (1-D), in window order."""
    flat = starts.reshape(-1).nonzero().squeeze(1)  # every window begins with a start
    return torch.diff(flat, append=torch.tensor([starts.numel()], device=flat.device))


def length_counts(starts: torch.Tensor, limit: int | None = None) -> list[int]:
    """counts[i] = units of i + 1 bytes, for i + 1 up to `limit` (default: the longest unit)."""
    lengths = unit_lengths(starts)
    return [int(c) for c in torch.bincount(lengths, minlength=(limit or 0) + 1)[1:]]


def layout(starts: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From a (B, T) boundary mask (position 0 set in every row, at most `slots` per row):
    positions (B, slots): the start positions in time order, padded at the end with
    positions that are not starts (never read: they come after every real slot);
    unit (B, T): the slot of the latest start <= t;
    offset (B, T): t minus that start."""
    B, T = starts.shape
    t = torch.arange(T, device=starts.device).expand(B, T)
    positions = torch.where(starts, t, t + T).topk(slots, dim=1, largest=False, sorted=True).indices
    unit = starts.long().cumsum(1) - 1
    offset = t - torch.where(starts, t, 0).cummax(1).values
    return positions, unit, offset


# ---- selection rules: scores (B, T) -> starts (B, T), position 0 always selected ----------

def selected_count(length: int, rate: float) -> int:
    """K = round(rate * length), at least 1 (position 0) and at most `length`."""
    return max(1, min(length, math.floor(rate * length + 0.5)))


def select_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest scores of each window, position 0 always among them. NOT causal: a later
    byte can push an earlier position out of the top k."""
    forced = scores.clone()
    forced[:, 0] = math.inf
    index = forced.topk(k, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, index, True)


def select_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Positions whose score reaches the threshold, plus position 0. Causal."""
    mask = scores >= threshold
    mask[:, 0] = True
    return mask


def select_rolling(scores: torch.Tensor, window: int, rate: float) -> torch.Tensor:
    """Position t is selected when its score is among the top fraction `rate` of the last
    n = min(t + 1, window) scores, i.e. fewer than rate * n of them are larger (ties favour
    selection); position 0 always. Causal."""
    T = scores.shape[1]
    padded = torch.nn.functional.pad(scores, (window - 1, 0), value=-math.inf)
    recent = padded.unfold(1, window, 1)  # (B, T, window): scores t-window+1..t
    larger = (recent > scores.unsqueeze(-1)).sum(-1)
    available = torch.arange(1, T + 1, device=scores.device).clamp(max=window)
    mask = larger < rate * available
    mask[:, 0] = True
    return mask


# ---- calibration on the training split ------------------------------------------------------

def calibration_window_count(train_bytes: int, window: int, count: int) -> int:
    """How many windows calibration_windows picks from a training split of `train_bytes` (what a
    calibration costs is known before it runs)."""
    return min(count, train_bytes // window)


def calibration_windows(train: bytes, window: int, count: int) -> torch.Tensor:
    """`count` windows of `window` bytes evenly spaced over the training split (all of them if
    it holds fewer): calibration sees every part of the split, deterministically."""
    n = len(train) // window
    if n == 0:
        raise HarnessError(f"the training split ({len(train)} bytes) is shorter than one {window}-byte window")
    pick = torch.linspace(0, n - 1, calibration_window_count(len(train), window, count)).round().long().tolist()
    # only the picked windows are copied out of the split (of many GB, perhaps)
    return windows(b"".join(train[i * window:(i + 1) * window] for i in pick), window)


def threshold_for_rate(scores: torch.Tensor, k: int) -> float:
    """Threshold at which select_threshold picks k of the T positions of a window on average:
    (k - 1) / (T - 1) of the positions 1..T-1 reach it (position 0 is always selected).
    scores: (N, T) from windows of the training split."""
    rest = scores[:, 1:].reshape(-1).double()
    wanted = round((k - 1) / max(1, scores.shape[1] - 1) * rest.numel())
    if wanted <= 0:
        return math.inf
    return float(rest.topk(wanted).values[-1])


def threshold_for_mean_length(score: torch.Tensor, target: float, limit: int) -> float:
    """The theta whose units (starts = score > theta, capped at `limit`) have an average length
    closest to `target` bytes. Candidates are the distinct score values (the average changes
    only there and is non-decreasing in theta); a binary search over them finds the crossing.
    Deterministic: a pure function of the scores."""
    finite = score[torch.isfinite(score)]
    candidates = torch.unique(finite)  # sorted ascending
    lowest = candidates[0] - 1.0 if len(candidates) else torch.tensor(0.0)
    candidates = torch.cat((lowest.reshape(1).to(score.dtype), candidates))

    def average(theta: torch.Tensor) -> float:
        return score.numel() / float(cap_lengths(score > theta, limit).sum())

    lo, hi = 0, len(candidates) - 1  # find the first candidate whose average reaches the target
    if average(candidates[hi]) < target:
        return float(candidates[hi])
    while lo < hi:
        mid = (lo + hi) // 2
        if average(candidates[mid]) >= target:
            hi = mid
        else:
            lo = mid + 1
    if lo > 0 and abs(average(candidates[lo - 1]) - target) < abs(average(candidates[lo]) - target):
        lo -= 1
    return float(candidates[lo])
