"""How a model's evaluation rule cuts bytes into units (tokens, patches, chunks), through the
adapter's segment hook: what a run records and `harness segment` draws."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.errors import HarnessError


@dataclass
class Segmentation:
    text: bytes
    scores: np.ndarray | None  # (N,) float, or None
    starts: np.ndarray  # (N,) bool: byte i starts a chunk
    window: int

    def chunks(self) -> list[bytes]:
        cuts = np.flatnonzero(self.starts).tolist() + [len(self.text)]
        return [self.text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]

    def lengths(self) -> np.ndarray:
        return np.array([len(c) for c in self.chunks()])


def segment_bytes(model, text: bytes, window: int) -> Segmentation | None:
    """Run the adapter's segment hook over consecutive windows of `text`; None for a model
    without units."""
    import torch

    if not text:
        raise HarnessError("segment: the text is empty")
    device = next(model.parameters()).device
    model.eval()
    scores, starts = [], []
    for begin in range(0, len(text), window):
        piece = torch.tensor(list(text[begin : begin + window]), dtype=torch.long, device=device)[None]
        cut = model.segment(piece)
        if cut is None:
            return None
        s, b = cut
        starts.append(b[0].bool().cpu().numpy())
        scores.append(None if s is None else s[0].float().cpu().numpy())
    merged = None if any(s is None for s in scores) else np.concatenate(scores)
    return Segmentation(text=text, scores=merged, starts=np.concatenate(starts), window=window)


def units_per_byte(model, scored: bytes, window: int) -> float:
    """Model positions per byte of `scored` (whole windows of `window` bytes), each window on its
    own as evaluation cuts it: a tokenizer's tokens, else the segment hook's units, else 1 (bytes)."""
    tokens = model.tokenizer_metrics(scored, window)
    if tokens:
        return 1.0 / tokens["bytes_per_token_test_windows"]
    segmentation = segment_bytes(model, scored, window)
    return 1.0 if segmentation is None else float(segmentation.starts.mean())
