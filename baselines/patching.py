"""Patch-boundary rules of the hierarchical patcher (baselines/patcher.py).

Every rule returns `starts`, a (B, W) bool tensor: starts[b, t] says that a patch
begins at byte t of window b; starts[:, 0] is always True. All rules here decide
a start at t from bytes < t only (stronger than docs/protocols.md, "2. Causality", asks), so the
patch that holds byte t, and every patch before it, is fixed before byte t is seen.

- static: a patch every P bytes;
- space (SpaceByte, Slagle 2024): a patch starts after a space-like byte (not an
  ASCII letter or digit and not a UTF-8 continuation byte 0x80-0xBF) that does
  not itself follow a space-like byte;
- entropy (BLT, Pagnoni et al. 2024): a patch starts at byte t when the entropy
  model's next-byte entropy H_t (nats, from bytes < t) exceeds theta ("global"),
  or when H_t - H_{t-1} exceeds theta ("monotonic", BLT's approximate rule);
- every rule then caps patches at a maximum length (harness.modeling.chunking.cap_lengths).

Layout, caps and threshold calibration are shared with the other chunking models in
harness.modeling.chunking.
"""

from __future__ import annotations

import torch

from harness.api import Adapter
from harness.modeling import chunking


def space_like(x: torch.Tensor) -> torch.Tensor:
    """SpaceByte's space-like bytes: neither an ASCII letter or digit nor a UTF-8 continuation byte."""
    letter = ((x >= 65) & (x <= 90)) | ((x >= 97) & (x <= 122))
    digit = (x >= 48) & (x <= 57)
    continuation = (x >= 0x80) & (x <= 0xBF)
    return ~(letter | digit | continuation)


def space_starts(x: torch.Tensor) -> torch.Tensor:
    """(B, W) bytes -> starts: byte t starts a patch when byte t-1 is space-like and byte t-2 is not."""
    space = space_like(x)
    starts = chunking.shift(space, 1) & ~chunking.shift(space, 2)
    starts[:, 0] = True
    return starts


def entropy_score(entropy: torch.Tensor, rule: str) -> torch.Tensor:
    """The statistic compared with theta: H_t ("global") or H_t - H_{t-1} ("monotonic");
    +inf at t = 0, which always starts a patch."""
    score = entropy if rule == "global" else entropy - chunking.shift(entropy, 1, fill=0.0)
    return torch.cat((torch.full_like(score[:, :1], float("inf")), score[:, 1:]), dim=1)


@torch.no_grad()
def next_byte_entropy(model: Adapter, windows: torch.Tensor) -> torch.Tensor:
    """(B, W) entropy in nats of the model's distribution of byte t given bytes < t, in float32
    (autocast off, so a GPU run makes the decisions the CPU calibration made)."""
    with torch.autocast(windows.device.type, enabled=False):
        logp = torch.log_softmax(model.next_byte_logits(windows).float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)

