"""H-Net (Hwang, Wang and Gu, 2025, "Dynamic Chunking for End-to-End Hierarchical Sequence
Modeling"; reference code goombalab/hnet): a byte model that learns where its chunks start.
One stage, like the paper's 1-stage models:

    bytes -> embed -> encoder (sliding-window blocks) -> h_t                      (B, T, d_local)
          -> routing: p_t = (1 - cos(W_q h_{t-1}, W_k h_t)) / 2, p_0 = 1; b_t = [p_t >= 0.5]
          -> chunking: h_t at the boundaries, nothing pooled, padded with learned
             dimensions to d_main (the reference's pad_dimension)                  (B, S, d_main)
          -> main network: causal Transformer over the chunks, first d_local dims  (B, S, d_local)
          -> dechunking: EMA over chunks z_i = P_i zhat_i + (1 - P_i) z_{i-1} (fp32),
             byte t reads chunk cumsum(b)_t - 1, times STE(c_t), c_t = p_t if b_t
             else 1 - p_t, plus a zero-initialised projection of h_t              (B, T, d_local)
          -> decoder (sliding-window blocks) -> byte head                         (B, T, 256)

Training adds the ratio loss alpha * N/(N-1) * ((1-F)(1-G) + (N-1) F G), F the fraction of
positions that are boundaries and G the mean p over the batch, which steers the chunk rate to
1/N; the trainer records it in the loss curve (TrainingLoss.auxiliary).

Deviations from the reference (README, fidelity table): the encoder and decoder are the shared
sliding-window attention blocks with SwiGLU MLPs (the paper: Mamba-2 layers without MLPs), and
the main network is the shared Transformer (the paper: Transformer or Mamba-2 hybrids); one
stage only; the harness's initialisation (std 0.02 everywhere; the reference draws embeddings at
std 1 and scales output projections by depth) and one learning rate for every stage (the
reference multiplies the outer stages' rate); the residual projection has no bias.

Causality. The input is shifted by one (BOS, x_0 .. x_{T-2}), so encoder state t has seen bytes
< t, and so have p_t and b_t. A chunk that starts at t holds h_t; the main network and the EMA
are causal over chunks; position t reads the latest chunk that starts at or before t, so the
logits at t, which predict byte t, depend on bytes < t only. In a batch, windows with fewer
chunks are padded at the end, where nothing real reads them. The segment hook marks byte t as
a chunk start when b_t: the chunk that serves byte t holds h_t, which has read bytes < t, so a
boundary the reference places on a word's first byte (whose state has read that byte) shows
here one byte later, after the word's first letter.

Compute. The chunk rate is learned and moves during training, so training_loss reports the
forward FLOPs each batch ran, each window at its own chunk count (the padding of a batch is not
charged: a packed implementation such as the reference's does not compute it), and the trainer
charges them to the budget. flops_per_byte uses the rate measured on the training split after
training (finish_training; kept in checkpoints), and before it the rate the model is sized with:
`sizing_bytes_per_chunk` when given (measured on earlier runs, e.g. the previous rung's records,
so that matched-inference sizing uses the rate the model actually learns), else the target 1/N.
That measurement runs the encoder and the routing over calibration_windows training windows; the
budget reserves it before training (calibration_cost).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from harness.api import (BOS, BYTE_VOCAB, MAX_WIDTH, Adapter, AdapterConfig, CalibrationCost, RunContext, SizingFields,
                         TrainingLoss, register)
from harness.modeling.runtime import autocast
from harness.modeling import chunking, flops
from harness.modeling.nn import Transformer, init_weights
from harness.modeling.hash_ngrams import HashNgramConfig, HashNgramEmbedding

P_CLAMP = 1e-4  # the EMA's P lies in [1e-4, 1 - 1e-4], as in the reference


class HNetConfig(AdapterConfig, HashNgramConfig):
    d_local: int = Field(64, ge=8, le=MAX_WIDTH, description="width of the encoder and decoder (the paper's D_0)")
    d_main: int = Field(128, ge=8, le=MAX_WIDTH, description="width of the main network (D_1 >= D_0: chunks get d_main - d_local learned extra dimensions)")
    encoder_layers: int = Field(2, ge=1, description="encoder blocks (sliding window, over bytes)")
    main_layers: int = Field(2, ge=1, description="main network blocks (causal, over chunks)")
    decoder_layers: int = Field(2, ge=1, description="decoder blocks (sliding window, over bytes)")
    n_heads: int = Field(4, ge=1, description="attention heads of the encoder and decoder")
    main_heads: int = Field(4, ge=1, description="attention heads of the main network")
    mlp_ratio: float = Field(8 / 3, gt=0, description="SwiGLU hidden width / width")
    attn_window: int = Field(32, ge=1, description="sliding attention window of the encoder and decoder, in bytes")
    renamed = {"window": "attn_window"}  # the eval window is the suite\'s eval.window
    target_ratio: float = Field(6.0, gt=1, description="N: the bytes per chunk the ratio loss aims at")
    ratio_weight: float = Field(0.03, ge=0, description="alpha: weight of the ratio loss (the paper's 0.03; small models need more to reach N)")
    calibration_windows: int = Field(256, ge=1, description="training windows on which the chunk rate is measured after training")
    sizing_bytes_per_chunk: float | None = Field(
        None, gt=1, description="bytes per chunk that the cost before training assumes (sizing to an inference cost, "
                                "the step plan): a rate measured on earlier runs of this model, e.g. the mean "
                                "bytes_per_chunk of the previous rung's records; none: target_ratio")

    @model_validator(mode="after")
    def _main_is_wider(self):
        if self.d_main < self.d_local:
            raise ValueError(f"d_main {self.d_main} is narrower than d_local {self.d_local} (chunks are padded, never cut)")
        return self


def ratio_loss(p: torch.Tensor, boundaries: torch.Tensor, n: float) -> torch.Tensor:
    """N/(N-1) * ((1-F)(1-G) + (N-1) F G) over the batch: F = fraction of boundaries (no
    gradient), G = mean boundary probability. Its minimum, 1, lies at F = G = 1/N."""
    f = boundaries.float().mean()
    g = p.float().mean()
    return n / (n - 1) * ((1 - f) * (1 - g) + (n - 1) * f * g)


def ste_ones(c: torch.Tensor) -> torch.Tensor:
    """Exactly 1 in the forward pass; the gradient of c in the backward (straight-through)."""
    return 1.0 + (c - c.detach())


def smooth(z: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """The dechunking EMA over chunks: out_i = P_i z_i + (1 - P_i) out_{i-1}, out_{-1} = 0.
    z: (B, S, d), P: (B, S) in (0, 1); in fp32. Vectorised as one product per window:
    out_i = sum_{j<=i} exp(sum_{k=j+1..i} log(1 - P_k)) P_j z_j. Each segment sum is summed
    directly (a cumsum down the columns of a masked matrix, never a difference of two running
    sums, so nothing cancels), and is never positive, so exp cannot overflow. Costs one
    (S x S) @ (S x d) product, like one of attention's two products."""
    S = P.shape[-1]
    log_keep = torch.log1p(-P)  # (B, S), <= 0
    i_after_j = torch.ones(S, S, dtype=torch.bool, device=P.device).tril(-1)
    segment = log_keep.unsqueeze(-1).expand(*P.shape, S).masked_fill(~i_after_j, 0.0).cumsum(dim=-2)  # (B, S, S)
    segment = segment.masked_fill(~torch.ones_like(i_after_j).tril(), -math.inf)  # j > i: no weight
    return (segment.exp() * P.unsqueeze(-2)) @ z  # (B, S, d)


@register
class HNet(Adapter):
    name = "hnet"
    description = "H-Net (1 stage): learned routing p_t = (1 - cos)/2 with a ratio loss, main Transformer over chunks, EMA dechunking"
    Config = HNetConfig
    sizing = SizingFields(width="d_main", depth="main_layers", heads="main_heads", other_widths={"d_local": "n_heads"})

    def __init__(self, config: HNetConfig):
        super().__init__(config)
        c = config
        self.embed = nn.Embedding(BYTE_VOCAB + 1, c.d_local)
        # hashed n-grams on the encoder's input embedding: input t is byte t-1, so its n-gram ends at byte t-1
        self.hash_embeds = HashNgramEmbedding(c.hash_ngrams, c.hash_buckets, c.d_local)
        self.encoder = Transformer(c.d_local, c.encoder_layers, c.n_heads, c.mlp_ratio, c.attn_window)
        self.q = nn.Linear(c.d_local, c.d_local, bias=False)
        self.k = nn.Linear(c.d_local, c.d_local, bias=False)
        self.pad = nn.Parameter(torch.zeros(c.d_main - c.d_local))
        self.main = Transformer(c.d_main, c.main_layers, c.main_heads, c.mlp_ratio)
        self.residual = nn.Linear(c.d_local, c.d_local, bias=False)
        self.decoder = Transformer(c.d_local, c.decoder_layers, c.n_heads, c.mlp_ratio, c.attn_window)
        self.head = nn.Linear(c.d_local, BYTE_VOCAB, bias=False)
        init_weights(self)
        with torch.no_grad():
            self.q.weight.copy_(torch.eye(c.d_local))  # routing starts as the plain cosine of h_{t-1} and h_t
            self.k.weight.copy_(torch.eye(c.d_local))
            self.residual.weight.zero_()
        self.chunk_rate: float | None = None  # chunks per byte on the training split, measured after training

    def get_extra_state(self) -> dict:
        return {"chunk_rate": self.chunk_rate}

    def set_extra_state(self, state: dict) -> None:
        self.chunk_rate = None if state["chunk_rate"] is None else float(state["chunk_rate"])

    # --- stages ---------------------------------------------------------------------------

    def encode(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, T) bytes -> (B, T, d_local); position t has seen bytes < t only."""
        inputs = F.pad(windows[:, :-1], (1, 0), value=BOS)  # BOS, x_0 .. x_{T-2}
        return self.encoder(self.hash_embeds(self.embed(inputs), inputs))

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, d_local) -> boundary probabilities p (B, T) fp32, p_0 = 1, and boundaries
        b = p >= 0.5 (B, T) bool. The cosine is a dot product per position (counted 0, like a norm)."""
        q = F.normalize(self.q(h[:, :-1]).float(), dim=-1)
        k = F.normalize(self.k(h[:, 1:]).float(), dim=-1)
        p = ((1 - (q * k).sum(-1)) / 2).clamp(0.0, 1.0)
        p = F.pad(p, (1, 0), value=1.0)
        return p, p >= 0.5

    def run(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T) bytes -> logits (B, T, 256), p (B, T), boundaries (B, T)."""
        c = self.config
        B, T = windows.shape
        h = self.encode(windows)  # (B, T, dl)
        p, b = self.route(h)
        slots = int(b.sum(1).max())  # S: chunks of the most-chunked window
        positions, chunk, _ = chunking.layout(b, slots)
        z = h.gather(1, positions.unsqueeze(-1).expand(-1, -1, c.d_local))  # (B, S, dl)
        z = torch.cat((z, self.pad.to(z.dtype).expand(B, slots, -1)), dim=-1)  # (B, S, dm)
        z = self.main(z)[..., : c.d_local]  # (B, S, dl)
        P = p.gather(1, positions).clamp(P_CLAMP, 1 - P_CLAMP)  # (B, S): p at each chunk's start
        with torch.autocast(h.device.type, enabled=False):  # the EMA and the residual in fp32
            z = smooth(z.float(), P)
            out = z.gather(1, chunk.unsqueeze(-1).expand(-1, -1, c.d_local))  # (B, T, dl)
            confidence = torch.where(b, p, 1 - p)
            x = out * ste_ones(confidence).unsqueeze(-1) + self.residual(h.float())
        return self.head(self.decoder(x)), p, b

    def next_byte_logits(self, windows: torch.Tensor) -> torch.Tensor:
        return self.run(windows)[0]

    def training_loss(self, windows: torch.Tensor) -> TrainingLoss:
        c = self.config
        logits, p, b = self.run(windows)
        nll = F.cross_entropy(logits.float().transpose(1, 2), windows, reduction="none")
        chunks = b.sum(1).tolist()
        return TrainingLoss(
            nll=nll,
            auxiliary={"ratio": c.ratio_weight * ratio_loss(p, b, c.target_ratio)},
            forward_flops=sum(self.forward_flops(windows.shape[1], s)["total"] for s in chunks),
            units=sum(chunks),
        )

    @torch.no_grad()
    def segment(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, W) bytes -> (p (B, W), boundaries (B, W)), both from bytes < t."""
        return self.route(self.encode(windows))

    # --- after training: the rate the model settled on ----------------------------------------

    @torch.no_grad()
    def measure_rate(self, train: bytes, window: int) -> dict:
        """Chunks per byte of the trained model on windows spread over the training split; kept
        for flops_per_byte and units_per_byte."""
        c = self.config
        device = self.q.weight.device
        windows = chunking.calibration_windows(train, window, c.calibration_windows)
        was_training = self.training
        self.eval()
        with autocast(device):  # the numerics of evaluation
            cuts = [self.segment(w.to(device)) for w in windows.split(64)]
        self.train(was_training)
        p = torch.cat([cut[0].cpu() for cut in cuts])
        starts = torch.cat([cut[1].cpu() for cut in cuts])
        self.chunk_rate = float(starts.double().mean())
        return {
            "calibration_windows": len(windows),
            "bytes_per_chunk": 1 / self.chunk_rate,
            "target_bytes_per_chunk": c.target_ratio,
            "relative_error": 1 / (self.chunk_rate * c.target_ratio) - 1,
            "mean_boundary_probability": float(p.double().mean()),
            "ratio_loss": float(ratio_loss(p, starts, c.target_ratio)),
        }

    def finish_training(self, train: bytes, ctx: RunContext) -> dict:
        return self.measure_rate(train, ctx.window)

    def calibration_cost(self, train_bytes: int, window: int) -> CalibrationCost:
        """measure_rate runs the encoder and the routing (segment) on the calibration windows."""
        parts = self.forward_flops(window, self.units_per_byte() * window)
        windows = chunking.calibration_window_count(train_bytes, window, self.config.calibration_windows)
        return CalibrationCost(flops=windows * (parts["encoder"] + parts["routing"]))

    def carry_preparation(self, prepared: "HNet") -> None:
        self.chunk_rate = prepared.chunk_rate

    # --- accounting -------------------------------------------------------------------------

    def units_per_byte(self) -> float:
        """Chunks per byte: measured after training; before, the rate it is sized with (a rate
        measured on earlier runs, sizing_bytes_per_chunk), else the target 1/N."""
        if self.chunk_rate is not None:
            return self.chunk_rate
        return 1 / (self.config.sizing_bytes_per_chunk or self.config.target_ratio)

    def forward_flops(self, window: int, chunks: float) -> dict[str, float]:
        """Forward FLOPs of one window of `window` bytes cut into `chunks` chunks. With a window's
        actual chunk count this is what the implementation computes (the FlopCounterMode check)."""
        c, W, S = self.config, window, chunks
        dl = c.d_local
        parts = {
            "encoder": flops.transformer(W, dl, c.encoder_layers, c.mlp_ratio, c.attn_window),
            "routing": 2 * flops.linear(W - 1, dl, dl),  # W_q h_{t-1} and W_k h_t; the cosine counts 0
            "main": flops.transformer(S, c.d_main, c.main_layers, c.mlp_ratio),
            "dechunk": flops.linear(S, S, dl),  # the EMA: one (S x S) @ (S x d_local) product
            "residual": flops.linear(W, dl, dl),
            "decoder": flops.transformer(W, dl, c.decoder_layers, c.mlp_ratio, c.attn_window),
            "head": flops.linear(W, dl, BYTE_VOCAB),
        }
        parts["total"] = sum(parts.values())
        return parts

    def flops_per_byte(self, window: int) -> dict[str, float]:
        """Forward FLOPs per byte at the expected chunk count: units_per_byte() x window."""
        per_window = self.forward_flops(window, self.units_per_byte() * window)
        return {name: value / window for name, value in per_window.items()}
