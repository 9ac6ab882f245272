"""MegaByte (after Yu et al. 2023): fixed patches of P bytes, a global Transformer
over patches and a small local Transformer within each patch.

For a window of W bytes cut into n = ceil(W / P) patches (the tail padded with
zeros, which is never scored):
- global input: each patch's P byte embeddings, concatenated (P * d_embed) and
  projected to d_global; a learned padding patch is prepended and the last patch
  dropped, so global position k sees only patches < k;
- global model: causal Transformer over the n patch positions;
- local model: each patch on its own, a causal Transformer over its P positions
  whose input at byte i is the local embedding of byte i-1 of the patch (a learned
  start embedding at i = 0) plus the global output of the patch, projected to
  d_local for each of the P positions; a head gives logits over 256 bytes.

Byte t = kP + i is predicted from patches < k (through the global model) and the
bytes kP .. t-1 (through the local model), so it sees bytes < t only. Padding
lies in the last patch, which the global model never reads, and after every
real byte of that patch, which the causal local model does not look ahead to.

Deviations from the paper (its global model is P * D_G wide and reads the
concatenated embeddings directly; its output is cut into P slices, each mapped to
the local width by one shared D_G -> D_L matrix; learned absolute position
embeddings are added to the global input): here the concatenation is projected
to d_global, so the global width can be sized freely (matched inference cost);
one d_global -> P * d_local matrix maps the global output (the paper's shared
matrix is the case where it is block-diagonal with equal blocks); and both
models are the shared harness blocks (RMSNorm, SwiGLU, RoPE), like every adapter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from harness.modeling import chunking, flops
from harness.modeling.nn import Transformer, init_weights
from harness.modeling.hash_ngrams import HashNgramConfig, HashNgramEmbedding
from harness.api import BOS, BYTE_VOCAB, MAX_WIDTH, Adapter, AdapterConfig, SizingFields, register


class MegaByteConfig(AdapterConfig, HashNgramConfig):
    patch_size: int = Field(4, ge=1, description="bytes per patch (P)")
    d_embed: int = Field(16, ge=1, le=MAX_WIDTH, description="width of each byte embedding in the global input (P of them are concatenated)")
    d_global: int = Field(64, ge=8, le=MAX_WIDTH, description="global model width")
    global_layers: int = Field(2, ge=1, description="global model blocks")
    global_heads: int = Field(4, ge=1, description="global model attention heads")
    d_local: int = Field(32, ge=8, le=MAX_WIDTH, description="local model width")
    local_layers: int = Field(2, ge=1, description="local model blocks")
    local_heads: int = Field(2, ge=1, description="local model attention heads")
    mlp_ratio: float = Field(8 / 3, gt=0, description="SwiGLU hidden width / width, both levels")

    @model_validator(mode="after")
    def _heads_fit(self):
        for level, width, heads in (("global", self.d_global, self.global_heads), ("local", self.d_local, self.local_heads)):
            if width % heads or (width // heads) % 2:
                raise ValueError(f"d_{level} {width} must split into {level}_heads {heads} heads of even width (RoPE)")
        return self


@register
class MegaByte(Adapter):
    name = "megabyte"
    description = "MegaByte: global Transformer over fixed P-byte patches, local Transformer within each patch"
    Config = MegaByteConfig
    sizing = SizingFields(width="d_global", depth="global_layers", heads="global_heads",
                          other_widths={"d_local": "local_heads", "d_embed": None})

    def __init__(self, config: MegaByteConfig):
        super().__init__(config)
        c = config
        P = c.patch_size
        self.global_embed = nn.Embedding(BYTE_VOCAB, c.d_embed)
        self.global_in = nn.Linear(P * c.d_embed, c.d_global, bias=False)
        self.pad_patch = nn.Parameter(torch.zeros(c.d_global))  # global input at patch 0
        self.global_model = Transformer(c.d_global, c.global_layers, c.global_heads, c.mlp_ratio)
        self.global_to_local = nn.Linear(c.d_global, P * c.d_local, bias=False)  # one d_local vector per byte position
        self.local_embed = nn.Embedding(BYTE_VOCAB + 1, c.d_local)  # row BOS is the start embedding
        # MegaByte embeds bytes twice, for the patch embedder and for the local model, so each gets its own
        # hashed n-gram tables (of its width). Both hash the window's byte stream across patch edges: the
        # global input's n-gram ends at the byte it embeds, the local model's at byte t-1 for the position
        # predicting byte t (at a patch's first position, the previous patch's last byte); bytes < t only.
        self.global_hash_embeds = HashNgramEmbedding(c.hash_ngrams, c.hash_buckets, c.d_embed)
        self.local_hash_embeds = HashNgramEmbedding(c.hash_ngrams, c.hash_buckets, c.d_local)
        self.local_model = Transformer(c.d_local, c.local_layers, c.local_heads, c.mlp_ratio)
        self.head = nn.Linear(c.d_local, BYTE_VOCAB, bias=False)
        init_weights(self)
        nn.init.normal_(self.pad_patch, std=0.02)
        # Byte embeddings of the local model start at unit scale (PyTorch's default): the projected
        # global output added to them grows by about lr per weight per Adam step whatever its size,
        # and at std 0.02 it drowned the byte identity and the local model stalled near the
        # order-0 entropy for tens of steps.
        nn.init.normal_(self.local_embed.weight, std=1.0)

    def units_per_byte(self) -> float:
        return 1.0 / self.config.patch_size

    def segment(self, windows: torch.Tensor) -> tuple[None, torch.Tensor]:
        """Fixed patches of P bytes, no score."""
        return None, chunking.static_starts(*windows.shape, self.config.patch_size, windows.device)

    def global_context(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (B, n, P) -> (B, n, d_global): position k is the global input for patch k,
        built from patches < k only (padding patch, then patches 0 .. n-2)."""
        B, n, P = patches.shape
        stream = patches[:, :-1].reshape(B, (n - 1) * P)  # the bytes of patches 0 .. n-2, in order
        previous = self.global_hash_embeds(self.global_embed(stream), stream).reshape(B, n - 1, P * self.config.d_embed)
        return torch.cat((self.pad_patch.expand(B, 1, -1), self.global_in(previous)), dim=1)

    def next_byte_logits(self, windows: torch.Tensor) -> torch.Tensor:
        c = self.config
        B, W = windows.shape
        P = c.patch_size
        n = math.ceil(W / P)
        patches = F.pad(windows, (0, n * P - W)).view(B, n, P)  # tail padded with byte 0, never scored
        hidden = self.global_model(self.global_context(patches))  # (B, n, d_global)
        from_global = self.global_to_local(hidden).view(B, n, P, c.d_local)
        local_inputs = F.pad(patches[:, :, :-1], (1, 0), value=BOS)  # (B, n, P): start, bytes 0 .. P-2 of the patch
        before = F.pad(patches.view(B, n * P)[:, :-1], (1, 0), value=BOS)  # byte t-1 at t (BOS at 0): for the n-grams
        x = self.local_hash_embeds(self.local_embed(local_inputs).view(B, n * P, c.d_local), before)
        x = (x.view(B, n, P, c.d_local) + from_global).view(B * n, P, c.d_local)
        out = self.local_model(x).view(B, n * P, c.d_local)[:, :W]  # drop the padding before the head
        return self.head(out)  # (B, W, 256)

    def flops_per_byte(self, window: int) -> dict[str, float]:
        """Per byte of a W-byte window, counting what next_byte_logits computes: n = ceil(W/P)
        patches (the padded tail included), n - 1 projected patches, the head on W bytes.
        For W divisible by P this is global / P + local + projections + head."""
        c = self.config
        P = c.patch_size
        n = math.ceil(window / P)
        terms = {
            "global_in": flops.linear(n - 1, P * c.d_embed, c.d_global),
            "global": flops.transformer(n, c.d_global, c.global_layers, c.mlp_ratio),
            "global_to_local": flops.linear(n, c.d_global, P * c.d_local),
            "local": n * flops.transformer(P, c.d_local, c.local_layers, c.mlp_ratio),
            "head": flops.linear(window, c.d_local, BYTE_VOCAB),
        }
        per_byte = {k: v / window for k, v in terms.items()}
        per_byte["total"] = sum(per_byte.values())
        return per_byte
