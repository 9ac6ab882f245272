"""ByteFlow Net (Deng et al., ICLR 2026, arXiv 2603.03583): a byte model that chunks its
own input by coding rate. No official code exists; this follows the paper's description.

    bytes -> embed -> local encoder (E blocks) -> h_t                        (B, T, d_local)
          -> coding-rate score per position, no gradient                     (B, T)
          -> select K = round(r T) chunk starts (static shapes in training)
          -> z_i = W_proj h_{s_i} -> global Transformer over the K starts    (B, K, d_global)
          -> byte t adds U[b] g_s, s the latest start <= t, b = min(t - s, B - 1)
             (upsample_by: offset) or floor(t B / T) (position)              (B, T, d_local)
          -> local decoder (D blocks) -> byte head                           (B, T, 256)

The score (config `score`) is one of the readings of the paper's coding rate in
byteflow/coding_rate.py. The default, `logdet_recent`, scores how much h_t adds to the
coding rate of the last `context` outputs; the prefix reading `logdet` (the paper's
equations as secondary sources quote them) piles chunk starts into the first positions of
every window, because the rate of a growing prefix saturates (README, fidelity table).

Local blocks are harness.modeling.nn blocks with a sliding window and Canon convolutions:
norm -> windowed attention -> residual -> Canon -> norm -> SwiGLU -> residual -> Canon.

Causality. The input is shifted by one (BOS, x_0 .. x_{T-2}), so position t, its encoder
output, its score and every decision taken at t have seen bytes < t only, and the logits
at t predict byte t. A chunk may therefore start at t and serve byte t itself. Training
selects the top K scores of the whole window, as published; that lets later bytes decide
which earlier positions start chunks, so it is not a valid likelihood. Evaluation uses a
causal rule (config eval_rule): a threshold calibrated on the training split after
training (finish_training), or a rolling rule (top fraction r of the last scores). With a
causal rule the number of chunks varies per window: the global model runs over the batch's
largest count, shorter rows padded at the end, where the causal global model never
attends them.
The top-K rule stays available in evaluation as the variant "topk" (reported, labelled).
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from byteflow import coding_rate
from harness.api import BOS, BYTE_VOCAB, MAX_WIDTH, Adapter, AdapterConfig, CalibrationCost, RunContext, SizingFields, register
from harness.modeling.runtime import autocast
from harness.errors import HarnessError
from harness.modeling import chunking, flops
from harness.modeling.nn import Block, Transformer, init_weights
from harness.modeling.hash_ngrams import HashNgramConfig, HashNgramEmbedding

TOPK_LABEL = "global top-K selection (non-causal, not a valid likelihood)"


class ByteFlowConfig(AdapterConfig, HashNgramConfig):
    d_local: int = Field(64, ge=8, le=MAX_WIDTH, description="width of the byte-level encoder and decoder")
    d_global: int = Field(128, ge=8, le=MAX_WIDTH, description="width of the global Transformer over chunks")
    encoder_layers: int = Field(1, ge=1, description="E: local encoder blocks")
    decoder_layers: int = Field(1, ge=1, description="D: local decoder blocks")
    global_layers: int = Field(2, ge=1, description="global Transformer blocks")
    n_heads: int = Field(4, ge=1, description="attention heads of the local blocks")
    global_heads: int = Field(4, ge=1, description="attention heads of the global blocks")
    mlp_ratio: float = Field(8 / 3, gt=0, description="SwiGLU hidden width / width")
    attn_window: int = Field(32, ge=1, description="w: sliding attention window of the local blocks, in bytes")
    renamed = {"window": "attn_window"}  # the eval window is the suite\'s eval.window
    rate: float = Field(0.25, gt=0, le=1, description="r: chunks per byte; K = round(r * window length)")
    score: Literal["logdet", "logdet_normalized", "logdet_recent", "l2", "l2_streaming"] = Field(
        "logdet_recent", description="coding-rate reading (byteflow/coding_rate.py): prefix gain (logdet), prefix gain of "
        "the 1/n-normalised rate (logdet_normalized), gain over the last `context` outputs (logdet_recent), ||h_t||^2 (l2), "
        "sqrt(S_t) - sqrt(S_t-1) with S_t the running sum of ||h||^2 (l2_streaming)")
    context: int = Field(4, ge=1, description="logdet_recent: outputs in the coding rate a position's gain is measured against, "
                                               "its own included")
    eps: float = Field(4.0, gt=0, description="coding-rate distortion; a = d_local / eps^2")
    score_block: int = Field(64, ge=0, description="logdet, logdet_normalized: positions per factorisation block (0 = whole window)")
    eval_rule: Literal["threshold", "rolling"] = Field(
        "threshold", description="causal rule in evaluation: threshold calibrated after training (rolling until then) or rolling top fraction r")
    rolling_window: int = Field(64, ge=1, description="scores the rolling rule compares, ending at t")
    upsample_matrices: int = Field(16, ge=1, description="B: upsampling matrices")
    upsample_by: Literal["offset", "position"] = Field(
        "offset", description="which matrix a byte uses: min(offset from its chunk start, B - 1) or its window position bin "
                              "floor(t B / T) (the paper's eq. 15 as a secondary source quotes it)")
    calibration_windows: int = Field(256, ge=1, description="training windows used to calibrate the threshold")


@register
class ByteFlow(Adapter):
    name = "byteflow"
    description = "ByteFlow Net: coding-rate chunking (top-K in training, causal rule in evaluation), global model over chunks"
    Config = ByteFlowConfig
    sizing = SizingFields(width="d_global", depth="global_layers", heads="global_heads",
                          other_widths={"d_local": "n_heads"})

    def __init__(self, config: ByteFlowConfig):
        super().__init__(config)
        c = config
        self.embed = nn.Embedding(BYTE_VOCAB + 1, c.d_local)
        # hashed n-grams on the encoder's input embedding: input t is byte t-1, so its n-gram ends at byte t-1
        self.hash_embeds = HashNgramEmbedding(c.hash_ngrams, c.hash_buckets, c.d_local)
        self.encoder = nn.ModuleList(Block(c.d_local, c.n_heads, c.mlp_ratio, c.attn_window, canon=True) for _ in range(c.encoder_layers))
        self.down = nn.Linear(c.d_local, c.d_global, bias=False)
        self.global_model = Transformer(c.d_global, c.global_layers, c.global_heads, c.mlp_ratio)
        self.up = nn.Parameter(torch.empty(c.upsample_matrices, c.d_global, c.d_local))
        self.decoder = Transformer(c.d_local, c.decoder_layers, c.n_heads, c.mlp_ratio, c.attn_window, canon=True)
        self.head = nn.Linear(c.d_local, BYTE_VOCAB, bias=False)
        init_weights(self)
        nn.init.normal_(self.up, std=0.02)
        self.register_buffer("threshold", torch.tensor(math.nan, dtype=torch.float64))  # set by finish_training
        self.variant: str | None = None

    # --- stages -------------------------------------------------------------------------

    def auxiliary_part(self, windows: torch.Tensor):
        """Coding-rate scoring, top-K and layout, given the encoder outputs (timed by `harness bench`)."""
        with torch.no_grad(), autocast(windows.device):
            h = self.encode(windows)

        def part() -> None:
            starts = self.select(self.scores(h), "topk")
            chunking.layout(starts, chunking.selected_count(windows.shape[1], self.config.rate))

        return f"coding-rate scoring ({self.config.score}), top-K and layout", part

    def encode(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, T) bytes -> (B, T, d_local); position t has seen bytes < t only."""
        inputs = F.pad(windows[:, :-1], (1, 0), value=BOS)  # BOS, x_0 .. x_{T-2}
        x = self.hash_embeds(self.embed(inputs), inputs)
        for block in self.encoder:
            x = block(x)
        return x

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, d_local) -> (B, T) coding-rate scores, no gradient."""
        c = self.config
        return coding_rate.scores(h, c.score, c.d_local / c.eps**2, c.score_block, c.context)

    def rule(self) -> str:
        if self.training or self.variant == "topk":
            return "topk"
        if self.config.eval_rule == "threshold" and not math.isnan(float(self.threshold)):
            return "threshold"
        return "rolling"

    @torch.no_grad()
    def select(self, scores: torch.Tensor, rule: str) -> torch.Tensor:
        """(B, T) scores -> (B, T) chunk starts under `rule`."""
        c = self.config
        if rule == "topk":
            return chunking.select_top_k(scores, chunking.selected_count(scores.shape[1], c.rate))
        if rule == "threshold":
            return chunking.select_threshold(scores, float(self.threshold))
        return chunking.select_rolling(scores, c.rolling_window, c.rate)

    def upsample(self, g: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """(B, T, d_global) chunk outputs per byte, (B, T) offsets -> (B, T, d_local): one
        matrix product per byte, grouped by matrix (bytes sorted by matrix index)."""
        B, T, _ = g.shape
        matrices = self.config.upsample_matrices
        if self.config.upsample_by == "position":
            offset = (torch.arange(T, device=g.device) * matrices // T).expand(B, T)
        which = offset.clamp(max=matrices - 1).reshape(-1)
        order = which.argsort(stable=True)
        counts = torch.bincount(which, minlength=matrices).tolist()
        pieces = [rows @ matrix for rows, matrix in zip(g.reshape(B * T, -1)[order].split(counts), self.up.unbind(0))]
        return torch.cat(pieces)[order.argsort()].view(B, T, -1)

    def next_byte_logits(self, windows: torch.Tensor) -> torch.Tensor:
        B, T = windows.shape
        h = self.encode(windows)  # (B, T, dl)
        rule = self.rule()
        starts = self.select(self.scores(h), rule)  # (B, T) bool
        slots = chunking.selected_count(T, self.config.rate) if rule == "topk" else int(starts.sum(1).max())
        positions, chunk, offset = chunking.layout(starts, slots)
        z = self.down(h.gather(1, positions.unsqueeze(-1).expand(-1, -1, h.shape[-1])))  # (B, S, dg)
        g = self.global_model(z)  # (B, S, dg)
        g_bytes = g.gather(1, chunk.unsqueeze(-1).expand(-1, -1, g.shape[-1]))  # (B, T, dg)
        return self.head(self.decoder(h + self.upsample(g_bytes, offset)))  # (B, T, 256)

    # --- evaluation variants and the segment hook -----------------------------------------

    def eval_variants(self) -> dict[str, str]:
        return {"topk": TOPK_LABEL}

    def set_eval_variant(self, name: str | None) -> None:
        if name not in (None, "topk"):
            raise HarnessError(f"adapter {self.name!r} has no evaluation variant {name!r} (known: topk)")
        self.variant = name

    @torch.no_grad()
    def segment(self, windows: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(B, W) bytes -> (scores (B, W) float, starts (B, W) bool): the score computed
        from bytes < t, and whether byte t starts a chunk, under the current rule."""
        h = self.encode(windows)
        scores = self.scores(h)
        return scores.float(), self.select(scores, self.rule())

    # --- calibration after training -------------------------------------------------------

    @torch.no_grad()
    def calibrate(self, train: bytes, window: int) -> dict:
        """Set the threshold so that it selects K = round(r * window) positions per window on
        average over windows spread across the training split."""
        c = self.config
        device = self.threshold.device
        windows = chunking.calibration_windows(train, window, c.calibration_windows)
        was_training = self.training
        self.eval()
        with autocast(device):  # the numerics of evaluation
            scores = torch.cat([self.scores(self.encode(w.to(device))) for w in windows.split(32)])
        self.train(was_training)
        k = chunking.selected_count(window, c.rate)
        self.threshold.fill_(chunking.threshold_for_rate(scores, k))
        starts = {rule: self.select(scores, rule).double() for rule in ("threshold", "rolling", "topk")}
        rates = {rule: float(mask.mean()) for rule, mask in starts.items()}
        position = torch.arange(window, device=scores.device, dtype=torch.float64)
        eighth = (position * 8 // window).long()
        matrices = c.upsample_matrices
        lengths = {rule: chunking.unit_lengths(mask.bool()) for rule, mask in starts.items()}
        return {
            "threshold": float(self.threshold),
            "calibration_windows": len(windows),
            "calibration_bytes": windows.numel(),
            "target_rate": k / window,
            "selection_rate": rates,
            "mean_chunk_bytes": {rule: 1 / rate for rule, rate in rates.items()},
            # where in the window chunks start (uniform: (window - 1) / 2); the prefix coding rate favours the start
            "mean_start_position": {rule: float((mask * position).sum() / mask.sum()) for rule, mask in starts.items()},
            # share of the chunk starts in each eighth of the window (uniform: 1/8 each)
            "start_position_eighths": {rule: [round(float(x), 4) for x in torch.zeros(8, dtype=torch.float64).index_add_(
                0, eighth, mask.sum(0)) / mask.sum()] for rule, mask in starts.items()},
            # bytes in chunks of B (upsampling matrices) or more bytes; beyond B they share the last matrix
            "bytes_in_chunks_of_at_least_B": {rule: float(n[n >= matrices].sum() / n.sum()) for rule, n in lengths.items()},
            "longest_chunk": {rule: int(n.max()) for rule, n in lengths.items()},
        }

    def finish_training(self, train: bytes, ctx: RunContext) -> dict:
        started = time.perf_counter()
        facts = self.calibrate(train, ctx.window)
        facts["seconds"] = time.perf_counter() - started
        return facts

    def calibration_cost(self, train_bytes: int, window: int) -> CalibrationCost:
        """calibrate runs the encoder and the coding-rate scores on the calibration windows. (How
        much of a training step the scoring takes is a timing: `harness bench` measures it, as the
        auxiliary part's share of a step, outside any budget.)"""
        parts = self.flops_per_byte(window)
        scored_bytes = window * chunking.calibration_window_count(train_bytes, window, self.config.calibration_windows)
        per_byte = parts["encoder"] + parts["scoring"] + parts["scoring_factorisation"]
        return CalibrationCost(flops=scored_bytes * per_byte, uncounted=scored_bytes * parts["scoring_factorisation"])

    # --- accounting -------------------------------------------------------------------------

    def forward_flops(self, window: int, slots: int) -> dict[str, float]:
        """Forward FLOPs per byte with `slots` global positions per window of `window` bytes."""
        c = self.config
        counted, uncounted = coding_rate.score_flops(c.score, window, c.d_local, c.score_block, c.context)
        parts = {
            "encoder": c.encoder_layers * flops.block(window, c.d_local, c.mlp_ratio, c.attn_window, canon=True) / window,
            "scoring": counted / window,
            "scoring_factorisation": uncounted / window,
            "projection": flops.linear(slots, c.d_local, c.d_global) / window,
            "global": flops.transformer(slots, c.d_global, c.global_layers, c.mlp_ratio) / window,
            "upsampling": flops.linear(window, c.d_global, c.d_local) / window,
            "decoder": flops.transformer(window, c.d_local, c.decoder_layers, c.mlp_ratio, c.attn_window, canon=True) / window,
            "head": flops.linear(1, c.d_local, BYTE_VOCAB),
        }
        parts["total"] = sum(parts.values())
        return parts

    def flops_per_byte(self, window: int) -> dict[str, float]:
        """Training forward (top-K, K = round(r * window) chunks). A calibrated causal rule
        selects the same rate on average."""
        return self.forward_flops(window, chunking.selected_count(window, self.config.rate))

    def uncounted_flops_per_byte(self, window: int) -> float:
        return self.flops_per_byte(window)["scoring_factorisation"]

    def units_per_byte(self) -> float:
        """Chunks (global positions) per byte: the rate r that training selects."""
        return self.config.rate

