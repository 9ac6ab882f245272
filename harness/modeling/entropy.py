"""The order-0 (unigram) entropy of bytes: the floor a reference row reports and that an
auxiliary model (BLT's entropy model) must beat."""

from __future__ import annotations

import math
from collections import Counter


def order0_entropy(data: bytes) -> float:
    """Empirical unigram byte entropy in bits per byte."""
    counts = Counter(data)
    n = len(data)
    return -sum(c / n * math.log2(c / n) for c in counts.values())
