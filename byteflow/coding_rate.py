"""Coding-rate scores and chunk selection rules for ByteFlow (DESIGN.md sections 3 and 8).

Scores. The coding rate of the first t encoder outputs h_1..h_t (rows of H, width d) is
    R(h_{1:t}) = 1/2 logdet(I_d + a H^T H) = 1/2 logdet(I_t + a H H^T),  a = d / eps^2,
and the score of position t is its marginal gain R(h_{1:t}) - R(h_{1:t-1}). With
K = I + a H H^T = L L^T (Cholesky), logdet K[:t, :t] = 2 sum_{i<=t} log L_ii, so the gain
of position t is exactly log L_tt: every gain in one factorisation, each depending on
h_1..h_t only (causal by construction).

For long windows the factorisation runs blockwise: with M = I_d + a sum_{i<start} h_i h_i^T
carried as its inverse P, the gains of the next block are log L_tt of
I_b + a H_b P H_b^T (matrix determinant lemma), and P is updated by Woodbury,
P <- P - a Y^T Y with Y = L^{-1} H_b P. Cost per byte: about 4 d^2 + 2 b d counted
matrix products plus b^2 / 3 + b d for the factorisation and the triangular solve, instead
of 2 T d + T^2 / 3 for one factorisation over the whole window.

The paper's fast approximation scores ||h_t||^2 (norms count 0 FLOPs by the convention).

The selection rules that turn scores into chunk starts (top-K in training, as published;
a calibrated threshold or a rolling rule in evaluation) are shared with the other chunking
models in harness.modeling.chunking.
"""

from __future__ import annotations

import torch


def logdet_gains(h: torch.Tensor, a: float, block: int = 0) -> torch.Tensor:
    """Marginal coding-rate gains in nats: (B, T, d) -> (B, T) float64, no gradient.

    gain_t = 1/2 logdet(I + a H_{1:t}^T H_{1:t}) - 1/2 logdet(I + a H_{1:t-1}^T H_{1:t-1}).
    `block` > 0 factorises blocks of that many positions (0: the whole window at once).
    """
    h = h.detach().double()
    B, T, d = h.shape
    block = T if block <= 0 else min(block, T)
    inverse = None  # P = M^{-1} of the positions before the block; None means the identity
    gains = []
    for start in range(0, T, block):
        hb = h[:, start : start + block]  # (B, b, d)
        hp = hb if inverse is None else hb @ inverse  # (B, b, d): rows h_t^T P
        eye = torch.eye(hb.shape[1], dtype=h.dtype, device=h.device)
        factor = torch.linalg.cholesky(eye + a * (hp @ hb.mT))  # (B, b, b)
        gains.append(factor.diagonal(dim1=-2, dim2=-1).log())
        if start + block < T:
            y = torch.linalg.solve_triangular(factor, hp, upper=False)  # (B, b, d) = L^{-1} H_b P
            base = torch.eye(d, dtype=h.dtype, device=h.device) if inverse is None else inverse
            inverse = base - a * (y.mT @ y)
    return torch.cat(gains, dim=1)


def logdet_flops(length: int, dim: int, block: int = 0) -> tuple[float, float]:
    """Forward FLOPs of logdet_gains on one window: (matrix products that FlopCounterMode
    counts, work it cannot see). A Cholesky factorisation of n x n costs n^3 / 3 FLOPs
    (n^3 / 6 multiply-adds, leading term); a triangular solve with m right-hand sides
    n^2 m FLOPs."""
    block = length if block <= 0 else min(block, length)
    sizes = [block] * (length // block) + ([length % block] if length % block else [])
    counted = uncounted = 0.0
    for j, b in enumerate(sizes):
        last = j == len(sizes) - 1
        counted += 2.0 * b * b * dim  # H_b P H_b^T
        counted += (2.0 * b * dim * dim if j > 0 else 0.0) + (2.0 * b * dim * dim if not last else 0.0)  # H_b P, Y^T Y
        uncounted += b**3 / 3 + (b * b * dim if not last else 0.0)  # Cholesky, triangular solve
    return counted, uncounted


def l2_scores(h: torch.Tensor) -> torch.Tensor:
    """The paper's fast approximation: ||h_t||^2, (B, T, d) -> (B, T), no gradient."""
    h = h.detach().float()
    return (h * h).sum(-1)
