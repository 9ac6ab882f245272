"""Patch-boundary rules of the hierarchical patcher (baselines/patcher.py).

Every rule returns `starts`, a (B, W) bool tensor: starts[b, t] says that a patch
begins at byte t of window b; starts[:, 0] is always True. All rules here decide
a start at t from bytes < t only (stronger than DESIGN.md section 3 asks), so the
patch that holds byte t, and every patch before it, is fixed before byte t is seen.

- static: a patch every P bytes;
- space (SpaceByte, Slagle 2024): a patch starts after a space-like byte (not an
  ASCII letter or digit and not a UTF-8 continuation byte 0x80-0xBF) that does
  not itself follow a space-like byte;
- entropy (BLT, Pagnoni et al. 2024): a patch starts at byte t when the entropy
  model's next-byte entropy H_t (nats, from bytes < t) exceeds theta ("global"),
  or when H_t - H_{t-1} exceeds theta ("monotonic", BLT's approximate rule);
- every rule then caps patches at a maximum length (a forced start every
  `limit` bytes after a rule's start).

No Python loops over positions: the cap is a cumulative max, calibration bisects
over the sorted candidate thresholds.
"""

from __future__ import annotations

import torch

from harness.api.registry import Adapter


def _shift(x: torch.Tensor, k: int, fill: bool = False) -> torch.Tensor:
    """x shifted right by k along the last axis: out[..., t] = x[..., t - k], `fill` before the start."""
    k = min(k, x.shape[-1])
    pad = torch.full((*x.shape[:-1], k), fill, dtype=x.dtype, device=x.device)
    return torch.cat((pad, x[..., : x.shape[-1] - k]), dim=-1)


def space_like(x: torch.Tensor) -> torch.Tensor:
    """SpaceByte's space-like bytes: neither an ASCII letter or digit nor a UTF-8 continuation byte."""
    letter = ((x >= 65) & (x <= 90)) | ((x >= 97) & (x <= 122))
    digit = (x >= 48) & (x <= 57)
    continuation = (x >= 0x80) & (x <= 0xBF)
    return ~(letter | digit | continuation)


def space_starts(x: torch.Tensor) -> torch.Tensor:
    """(B, W) bytes -> starts: byte t starts a patch when byte t-1 is space-like and byte t-2 is not."""
    space = space_like(x)
    starts = _shift(space, 1) & ~_shift(space, 2)
    starts[:, 0] = True
    return starts


def static_starts(batch: int, window: int, size: int, device=None) -> torch.Tensor:
    starts = torch.arange(window, device=device) % size == 0
    return starts.expand(batch, window)


def entropy_score(entropy: torch.Tensor, rule: str) -> torch.Tensor:
    """The statistic compared with theta: H_t ("global") or H_t - H_{t-1} ("monotonic");
    +inf at t = 0, which always starts a patch."""
    score = entropy if rule == "global" else entropy - _shift(entropy, 1, fill=0.0)
    return torch.cat((torch.full_like(score[:, :1], float("inf")), score[:, 1:]), dim=1)


def cap_patch_length(starts: torch.Tensor, limit: int) -> torch.Tensor:
    """Add a start every `limit` bytes after each rule start, so no patch is longer than `limit`."""
    position = torch.arange(starts.shape[-1], device=starts.device)
    last_start = torch.where(starts, position, 0).cummax(dim=-1).values  # starts[:, 0] is True
    return (position - last_start) % limit == 0


@torch.no_grad()
def next_byte_entropy(model: Adapter, windows: torch.Tensor) -> torch.Tensor:
    """(B, W) entropy in nats of the model's distribution of byte t given bytes < t, in float32
    (autocast off, so a GPU run makes the decisions the CPU calibration made)."""
    with torch.autocast(windows.device.type, enabled=False):
        logp = torch.log_softmax(model.next_byte_logits(windows).float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def patch_lengths(starts: torch.Tensor) -> torch.Tensor:
    """Lengths of all patches of all windows (1-D), in window order."""
    flat = starts.reshape(-1).nonzero().squeeze(1)  # every window begins with a start
    return torch.diff(flat, append=torch.tensor([starts.numel()], device=flat.device))


def patch_statistics(starts: torch.Tensor, limit: int) -> dict:
    """Average patch size and the histogram of patch sizes 1..limit (counts[i] = patches of i + 1 bytes)."""
    lengths = patch_lengths(starts)
    counts = torch.bincount(lengths, minlength=limit + 1)[1:]
    return {"avg_patch_size": starts.numel() / len(lengths), "patches": len(lengths),
            "patch_size_counts": [int(c) for c in counts]}


def calibrate_threshold(score: torch.Tensor, target: float, limit: int) -> float:
    """The theta whose patches (starts = score > theta, capped at `limit`) have an average
    size closest to `target` bytes. Candidates are the distinct score values (the average
    changes only there and is non-decreasing in theta); a binary search over them finds the
    crossing. Deterministic: a pure function of the scores."""
    finite = score[torch.isfinite(score)]
    candidates = torch.unique(finite)  # sorted ascending
    lowest = candidates[0] - 1.0 if len(candidates) else torch.tensor(0.0)
    candidates = torch.cat((lowest.reshape(1).to(score.dtype), candidates))

    def average(theta: torch.Tensor) -> float:
        return score.numel() / float(cap_patch_length(score > theta, limit).sum())

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
