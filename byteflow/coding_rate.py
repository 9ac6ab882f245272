"""Coding-rate scores and chunk selection rules for ByteFlow (docs/protocols.md, "2. Causality";
docs/adapters.md, "ByteFlow").

The coding rate of vectors h_1..h_n (rows of H, width d) at distortion eps is
    R(H) = 1/2 logdet(I_d + a H^T H) = 1/2 logdet(I_n + a H H^T),  a = d / eps^2,
and a position's score is the rate that its encoder output h_t adds. Every score here
uses h_1..h_t only (causal by construction) and carries no gradient. The readings
(ByteFlowConfig.score; the paper's PDF could not be read, see the README's fidelity
table for the sources):

- logdet: the prefix gain R(h_{1:t}) - R(h_{1:t-1}), the paper's eq. 11-12 as secondary
  sources quote them (no 1/n). The gains shrink as the prefix fills: once about d
  vectors have been seen a new one adds little, so top-K and a calibrated threshold
  both pick the first positions of a window (mean start about a quarter of the way in).
- logdet_normalized: the prefix gain of the usual normalised rate
  R_n = 1/2 logdet(I + a/n H^T H), n the number of vectors. Signed; still larger in
  magnitude early in a window, so it front-loads too (less when a |h|^2 is small).
- logdet_recent: the gain of h_t over the last `context` - 1 outputs,
  R(h_{t-c+1:t}) - R(h_{t-c+1:t-1}) = 1/2 log(1 + a h_t^T (I + a P^T P)^{-1} h_t), P the
  previous c - 1 outputs: how new h_t is against the recent past. Stationary once t >= c
  (positions before the window start are zero vectors, which add nothing), so chunk
  starts spread over the window. The harness default, with c = 4: on the smoke suite's
  validation split c = 2, 4, 8, 16 gave 3.83, 3.75, 3.81, 3.86 bpb; trained encoder
  outputs are strongly correlated (cosine about 0.9 between neighbours), so the first c
  positions, with fewer outputs to compare against, score higher, and a long context
  front-loads again (c = 16: mean start 51 of 127).
- l2: ||h_t||^2, the per-position norm (no front-loading).
- l2_streaming: sqrt(S_t) - sqrt(S_{t-1}), S_t = sum_{i<=t} ||h_i||^2, the streaming L2
  form secondary sources give for the paper's fast path (appendix B). It shrinks like
  1/sqrt(t), so it front-loads like the prefix logdet.

Prefix logdet in one call: with K = I + a H H^T = L L^T (Cholesky), logdet K[:t, :t] =
2 sum_{i<=t} log L_ii, so the gain of position t is exactly log L_tt. For long windows
the factorisation runs blockwise: with M = I_d + a sum_{i<start} h_i h_i^T carried as its
inverse P, the gains of the next block are log L_tt of I_b + a H_b P H_b^T (matrix
determinant lemma), and P is updated by Woodbury, P <- P - a Y^T Y with Y = L^{-1} H_b P.
Cost per byte: about 4 d^2 + 2 b d counted matrix products plus b^3 / 3 + b d for the
factorisation and the triangular solve, instead of 2 T d + T^2 / 3 for one factorisation
over the whole window.

Recent logdet: the dot products of each output with its c - 1 predecessors (a band of the
Gram matrix, 2 c d FLOPs per position) are gathered into each position's c x c window Gram
matrix; the gain is log L_cc of its Cholesky factor (c^3 / 3 per position, uncounted).

The selection rules that turn scores into chunk starts (top-K in training, as published;
a calibrated threshold or a rolling rule in evaluation) are shared with the other chunking
models in harness.modeling.chunking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCORES = ("logdet", "logdet_normalized", "logdet_recent", "l2", "l2_streaming")


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


def normalized_logdet_gains(h: torch.Tensor, a: float, block: int = 64) -> torch.Tensor:
    """Prefix gains of the normalised rate, (B, T, d) -> (B, T) float64, no gradient:
    gain_t = R_t - R_{t-1}, R_n = 1/2 logdet(I_d + a/n sum_{i<=n} h_i h_i^T), R_0 = 0.
    One d x d Cholesky per position; `block` positions at a time bound the memory."""
    h = h.detach().double()
    B, T, d = h.shape
    block = T if block <= 0 else min(block, T)
    eye = torch.eye(d, dtype=h.dtype, device=h.device)
    running = h.new_zeros(B, 1, d, d)  # sum of h_i h_i^T before the block
    rates = []
    for start in range(0, T, block):
        hb = h[:, start : start + block]  # (B, b, d)
        sums = running + (hb.unsqueeze(-1) @ hb.unsqueeze(-2)).cumsum(1)  # (B, b, d, d)
        n = torch.arange(start + 1, start + hb.shape[1] + 1, dtype=h.dtype, device=h.device).view(1, -1, 1, 1)
        factor = torch.linalg.cholesky(eye + (a / n) * sums)
        rates.append(factor.diagonal(dim1=-2, dim2=-1).log().sum(-1))  # 1/2 logdet = sum log L_ii
        running = sums[:, -1:]
    rate = torch.cat(rates, dim=1)
    return torch.diff(rate, dim=1, prepend=rate.new_zeros(B, 1))


def recent_logdet_gains(h: torch.Tensor, a: float, context: int) -> torch.Tensor:
    """Gain of h_t over the previous `context` - 1 outputs, (B, T, d) -> (B, T) float64, no
    gradient: 1/2 logdet(I + a W_t^T W_t) - 1/2 logdet(I + a P_t^T P_t), W_t = h_{t-c+1..t},
    P_t = h_{t-c+1..t-1}, with zero vectors before the window start."""
    h = h.detach().double()
    B, T, d = h.shape
    c = max(1, min(context, T))
    padded = F.pad(h, (0, 0, c - 1, 0))  # (B, T + c - 1, d)
    recent = padded.unfold(1, c, 1).transpose(-1, -2)  # (B, T, c, d): h_{t-c+1} .. h_t
    band = (recent @ h.unsqueeze(-1)).squeeze(-1)  # (B, T, c): band[t, k] = h_{t-c+1+k} . h_t
    band = F.pad(band, (0, 0, c - 1, 0))  # row t + c - 1 holds position t
    i = torch.arange(c, device=h.device)
    later = torch.maximum(i[:, None], i[None, :])  # window entry (i, j): the later vector's slot
    lag = c - 1 - (i[:, None] - i[None, :]).abs()
    rows = torch.arange(T, device=h.device)[:, None, None] + later  # (T, c, c)
    gram = band[:, rows, lag.expand(T, c, c)]  # (B, T, c, c)
    eye = torch.eye(c, dtype=h.dtype, device=h.device)
    factor = torch.linalg.cholesky(eye + a * gram)
    return factor[..., c - 1, c - 1].log()


def l2_scores(h: torch.Tensor) -> torch.Tensor:
    """||h_t||^2, (B, T, d) -> (B, T), no gradient."""
    h = h.detach().float()
    return (h * h).sum(-1)


def l2_streaming_gains(h: torch.Tensor) -> torch.Tensor:
    """sqrt(S_t) - sqrt(S_{t-1}), S_t = sum_{i<=t} ||h_i||^2 (S_0 = 0): (B, T, d) -> (B, T)
    float64, no gradient."""
    root = (h.detach().double() ** 2).sum(-1).cumsum(1).sqrt()
    return torch.diff(root, dim=1, prepend=root.new_zeros(root.shape[0], 1))


def scores(h: torch.Tensor, score: str, a: float, block: int = 0, context: int = 4) -> torch.Tensor:
    """(B, T, d) encoder outputs -> (B, T) scores of the named reading (module docstring)."""
    if score == "logdet":
        return logdet_gains(h, a, block)
    if score == "logdet_normalized":
        return normalized_logdet_gains(h, a, block)
    if score == "logdet_recent":
        return recent_logdet_gains(h, a, context)
    if score == "l2":
        return l2_scores(h)
    if score == "l2_streaming":
        return l2_streaming_gains(h)
    raise ValueError(f"unknown coding-rate score {score!r} (known: {', '.join(SCORES)})")


def score_flops(score: str, length: int, dim: int, block: int = 0, context: int = 4) -> tuple[float, float]:
    """Forward FLOPs of scores() on one window: (matrix products that FlopCounterMode
    counts, factorisations it cannot see). Norms and sums count 0 by the convention."""
    if score == "logdet":
        return logdet_flops(length, dim, block)
    if score == "logdet_normalized":
        return 2.0 * length * dim * dim, length * dim**3 / 3  # outer products; a d x d Cholesky per position
    if score == "logdet_recent":
        c = max(1, min(context, length))
        return 2.0 * length * c * dim, length * c**3 / 3  # the Gram band; a c x c Cholesky per position
    return 0.0, 0.0
