"""SpaceByte (after Slagle 2024, "SpaceByte: Towards Deleting Tokenization from Large
Language Modeling", and its reference code kjslag/spacebyte): one byte-level residual
stream; wider global blocks run only at the positions that follow a space-like byte.

For a window of W bytes, input t is byte t-1 (BOS at t = 0) and output t predicts byte t:
- embed the inputs (B, W, d_local) and run `initial_layers` local blocks over all bytes
  (causal, sliding window `local_window`);
- global positions: t = 0 (the BOS position) and every t where byte t-1 is space-like and
  byte t-2 is not (baselines/patching.space_starts, the rule of kjslag's `patch_method=utf8`;
  kjslag's BOS is byte 255, itself space-like, so there t = 1 is never global, here it is when
  byte 0 is space-like), at most `global_cap` of them per window (the first ones; see below);
- gather the byte stream at those positions into a sequence (B, G, d_local), zero-pad it on
  the left to d_global (no projection: the byte state sits in the last d_local channels),
  and run `global_layers` global blocks over it (causal, full attention over the G positions);
- add the last d_local channels of the global stream back into the byte stream at the
  same positions (kjslag adds the whole global residual, which still carries the byte
  state it started from, so a global position's state is 2 x its byte state + what the
  global blocks wrote), then run `final_layers` local blocks and the byte head.

Causality: whether t is a global position depends on bytes < t (the rule reads bytes t-1
and t-2; the cap counts global positions <= t). The byte state at t has seen inputs <= t,
i.e. bytes < t; global attention is causal over global positions, which are in byte order;
so every output t depends on bytes < t only. A batch pads the global sequence to the largest
count of its windows; padding slots come after every real one, so causal attention never
lets a real slot read them, and their outputs are never added back.

The cap (kjslag's `global_context_size`, T_G): kjslag fixes T_G = context_size / P (P = 6
by default, 8 for code in the paper's runs). With fewer boundaries it still runs the global
blocks on T_G positions (padding); with more, the global blocks run on the first T_G and the
predictions from the (T_G + 1)-th global position on are dropped from the loss in training
and evaluation (targets = -1), and generation stops there. Here: the cap is
global_cap = floor(max(W, context) / cap_patch_size), where `context` is the window the
model is prepared for (the run's window; a shorter input keeps the cap, as kjslag's
min(T_G, T) does, so a prefix is scored as inside the full window). The harness scores
every byte, so bytes after the cap are kept: they are predicted from the local stream and
the global positions before the cap, in training and evaluation alike. The global blocks
run only on as many positions as the batch needs (no padding to the cap), so the cost is
data dependent: flops_per_byte uses the mean number of global positions per window (and
its second moment, for the G x G attention) measured in prepare() on windows of the
run's window length from the training split.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from baselines import patching
from harness.api import BOS, BYTE_VOCAB, MAX_WIDTH, Adapter, AdapterConfig, Preparation, RunContext, SizingFields, register
from harness.modeling import chunking, flops
from harness.modeling.nn import Block, Transformer, init_weights
from harness.modeling.hash_ngrams import HashNgramConfig, HashNgramEmbedding


class SpaceByteConfig(AdapterConfig, HashNgramConfig):
    d_local: int = Field(64, ge=8, le=MAX_WIDTH, description="width of the byte-level stream and its local blocks")
    d_global: int = Field(128, ge=8, le=MAX_WIDTH, description="width of the global blocks (>= d_local; the byte stream is zero-padded to it)")
    n_heads_local: int = Field(4, ge=1, description="attention heads of local blocks")
    n_heads_global: int = Field(4, ge=1, description="attention heads of global blocks")
    initial_layers: int = Field(1, ge=0, description="local blocks before the global blocks (kjslag: half the local blocks)")
    global_layers: int = Field(2, ge=1, description="global blocks (causal, full attention over global positions)")
    final_layers: int = Field(1, ge=1, description="local blocks after the global blocks")
    local_window: int = Field(64, ge=0, description="sliding attention window of local blocks in bytes (0 = full; kjslag: d_local)")
    mlp_ratio: float = Field(8 / 3, gt=0, description="SwiGLU hidden width / width, both levels")
    cap_patch_size: float = Field(6.0, ge=1, description="at most floor(context / cap_patch_size) global positions per "
                                                         "window (kjslag: global_context_size = context_size / P, P = 6; "
                                                         "1 = no cap)")
    calibration_bytes: int = Field(262144, ge=2, description="bytes of the training split (evenly spaced windows) the "
                                                             "global-position rate is measured on")

    @model_validator(mode="after")
    def _consistent(self):
        for level, width, heads in (("local", self.d_local, self.n_heads_local), ("global", self.d_global, self.n_heads_global)):
            if width % heads or (width // heads) % 2:
                raise ValueError(f"d_{level} {width} must split into n_heads_{level} {heads} heads of even width (RoPE)")
        if self.d_global < self.d_local:
            raise ValueError(f"d_global {self.d_global} is smaller than d_local {self.d_local} (the byte stream is zero-padded "
                             "to d_global, never cut)")
        return self


@register
class SpaceByte(Adapter):
    name = "spacebyte"
    description = "SpaceByte: one byte stream, wider global blocks inserted at the bytes after space-like bytes"
    Config = SpaceByteConfig
    sizing = SizingFields(width="d_global", depth="global_layers", heads="n_heads_global",
                          other_widths={"d_local": "n_heads_local"})

    def __init__(self, config: SpaceByteConfig):
        super().__init__(config)
        c = config
        self.embed = nn.Embedding(BYTE_VOCAB + 1, c.d_local)  # row BOS is the input at t = 0
        # hashed n-grams on the byte stream's input embedding: input t is byte t-1, so its n-gram ends at byte t-1
        self.hash_embeds = HashNgramEmbedding(c.hash_ngrams, c.hash_buckets, c.d_local)
        self.initial = nn.ModuleList(Block(c.d_local, c.n_heads_local, c.mlp_ratio, c.local_window) for _ in range(c.initial_layers))
        self.global_blocks = nn.ModuleList(Block(c.d_global, c.n_heads_global, c.mlp_ratio) for _ in range(c.global_layers))
        self.final = Transformer(c.d_local, c.final_layers, c.n_heads_local, c.mlp_ratio, c.local_window)  # ends with a norm
        self.head = nn.Linear(c.d_local, BYTE_VOCAB, bias=False)
        init_weights(self)
        # set in prepare() and kept in checkpoints: the context (the run's window) and the mean
        # count of global positions per window of that length on the training split, and its
        # mean square; before prepare(), kjslag's fixed cost (the cap, always full)
        self.register_buffer("context", torch.tensor(0))
        self.register_buffer("globals_mean", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("globals_square", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("prepared", torch.tensor(False))

    # ---- global positions ------------------------------------------------------------------
    def global_cap(self, window: int, context: int | None = None) -> int:
        """Most global positions a window of `window` bytes gets: floor(context / cap_patch_size),
        the context being the prepared window (longer inputs scale it up); at least 1 (BOS)."""
        context = int(self.context) if context is None else context
        return max(1, math.floor(max(window, context) / self.config.cap_patch_size))

    def global_starts(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, W) bool: global blocks run at t. SpaceByte's rule (byte t-1 space-like, byte
        t-2 not; t = 0 always), first global_cap positions only. Depends on bytes < t."""
        starts = patching.space_starts(windows)
        return starts & (starts.long().cumsum(1) <= self.global_cap(windows.shape[1]))

    @torch.no_grad()
    def segment(self, windows: torch.Tensor) -> tuple[None, torch.Tensor]:
        """The hook of `harness segment`: no score; starts = where the global blocks run."""
        return None, self.global_starts(windows)

    # ---- model -------------------------------------------------------------------------------
    def next_byte_logits(self, windows: torch.Tensor) -> torch.Tensor:
        c = self.config
        inputs = F.pad(windows[:, :-1], (1, 0), value=BOS)  # (B, W): BOS, x_0 .. x_{W-2}
        x = self.hash_embeds(self.embed(inputs), inputs)  # (B, W, dl); state t has seen bytes < t
        for block in self.initial:
            x = block(x)

        starts = self.global_starts(windows)  # (B, W)
        count = starts.sum(1)  # (B,) global positions per window, >= 1
        slots = int(count.max())  # G
        # positions of the global slots, in byte order, real ones first: (B, G)
        where = torch.argsort((~starts).to(torch.int8), dim=1, stable=True)[:, :slots]
        real = torch.arange(slots, device=windows.device) < count[:, None]  # (B, G)
        index = where[:, :, None].expand(-1, -1, c.d_local)
        y = F.pad(x.gather(1, index), (c.d_global - c.d_local, 0))  # (B, G, dg): zeros, then the byte state
        for block in self.global_blocks:
            y = block(y)  # causal over global positions
        x = x.scatter_add(1, index, (y[:, :, -c.d_local :] * real[:, :, None]).to(x.dtype))
        return self.head(self.final(x))  # (B, W, 256)

    # ---- preparation on the training split ----------------------------------------------------
    def prepare(self, train_bytes: bytes, ctx: RunContext) -> Preparation:
        """Take the run's window as the context and measure on evenly spaced windows of it from
        the training split how many global positions a window gets (nothing is trained)."""
        window = ctx.window
        cal = chunking.calibration_windows(train_bytes, window, max(1, self.config.calibration_bytes // window))
        self.context.fill_(window)
        rule = patching.space_starts(cal)
        kept = self.global_starts(cal)
        counts = kept.sum(1).double()
        self.globals_mean.fill_(float(counts.mean()))
        self.globals_square.fill_(float(counts.square().mean()))
        self.prepared.fill_(True)
        capped = rule.long().cumsum(1) > self.global_cap(window)  # bytes after the cap (no global position from there on)
        facts = {
            "patcher": "space", "context_window": window, "calibration_bytes": cal.numel(),
            "global_cap": self.global_cap(window), "globals_per_window": float(counts.mean()),
            "rule_starts_per_window": float(rule.sum(1).double().mean()),
            "windows_over_cap": float((rule.sum(1) > self.global_cap(window)).double().mean()),
            "bytes_after_cap": float(capped.double().mean()),
            # bytes from one global position to the next (the last one: to the window's end)
            "avg_patch_size": kept.numel() / float(kept.sum()), "patches": int(kept.sum()),
        }
        return Preparation(facts=facts, unit_length_counts=chunking.length_counts(kept))

    def carry_preparation(self, prepared: "SpaceByte") -> None:
        for name in ("context", "globals_mean", "globals_square", "prepared"):
            getattr(self, name).copy_(getattr(prepared, name))

    # ---- accounting ----------------------------------------------------------------------------
    def expected_globals(self, window: int) -> tuple[float, float]:
        """Mean and mean square of the global positions per window of `window` bytes: measured
        on the training split for the context window; elsewhere the measured rate per byte
        scaled to `window` and capped (an estimate)."""
        if not bool(self.prepared):
            cap = float(self.global_cap(window))
            return cap, cap * cap
        context = int(self.context)
        mean, square = float(self.globals_mean), float(self.globals_square)
        if window == context:
            return mean, square
        scaled = max(1.0, min(float(self.global_cap(window)), mean * window / context))
        return scaled, scaled * scaled

    def units_per_byte(self) -> float:
        context = int(self.context)
        return self.expected_globals(context)[0] / context if context else 1.0 / self.config.cap_patch_size

    def forward_flops(self, window: int, slots: float, slots_square: float | None = None) -> dict[str, float]:
        """Forward FLOPs of one window of `window` bytes with `slots` global positions: with a
        batch's padded slot count, what next_byte_logits computes (the FlopCounterMode check).
        `slots_square` (mean of G^2 over windows) makes the G x G attention exact for a mean G."""
        c, W = self.config, window
        square = slots * slots if slots_square is None else slots_square
        glob = flops.transformer(slots, c.d_global, c.global_layers, c.mlp_ratio)
        glob += c.global_layers * flops.attention_products(1, 1, c.d_global) * (square - slots * slots)
        parts = {
            "local_initial": flops.transformer(W, c.d_local, c.initial_layers, c.mlp_ratio, c.local_window),
            "global": glob,  # zero-padding in and slicing out are free: no projection
            "local_final": flops.transformer(W, c.d_local, c.final_layers, c.mlp_ratio, c.local_window),
            "head": flops.linear(W, c.d_local, BYTE_VOCAB),
        }
        parts["total"] = sum(parts.values())
        return parts

    def flops_per_byte(self, window: int) -> dict[str, float]:
        per_window = self.forward_flops(window, *self.expected_globals(window))
        return {name: value / window for name, value in per_window.items()}
