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
