"""Bytes as model input: byte strings cut into windows of int64 (or uint8) tensors."""

from __future__ import annotations

import torch

BYTE_VOCAB = 256
BOS = 256  # the one special byte-level symbol: beginning of a window


def to_tensor(data: bytes) -> torch.Tensor:
    return _uint8(data).long()


def _uint8(data) -> torch.Tensor:
    """The bytes as a writable uint8 tensor of their own (a copy: frombuffer shares read-only bytes)."""
    if not len(data):  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def windows(data: bytes, window: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive, non-overlapping windows of `window` bytes: (N, window); the tail
    shorter than a window is not used."""
    return byte_windows(data, window, max_windows).long()


def byte_windows(data: bytes, window: int, max_windows: int | None = None) -> torch.Tensor:
    """windows() as uint8, one byte per byte: for a whole training split, which as int64 would
    take 8 times its size (96 GB for a 12 GB split); index it, then convert the windows taken."""
    n = len(data) // window
    if max_windows is not None:
        n = min(n, max_windows)
    return _uint8(memoryview(data)[: n * window]).view(n, window)
