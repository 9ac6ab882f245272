"""Byte Transformer: bytes as tokens (vocabulary 256 + BOS), a decoder-only
Transformer from the shared blocks, predicting each byte from the ones before it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harness.modeling import flops
from harness.modeling.nn import Transformer, init_weights
from harness.modeling.hash_ngrams import HashNgramConfig, HashNgramEmbedding
from harness.api import BOS, BYTE_VOCAB, MAX_WIDTH, Adapter, AdapterConfig, SizingFields, register


class ByteTransformerConfig(AdapterConfig, HashNgramConfig):
    d_model: int = Field(64, ge=8, le=MAX_WIDTH, description="width")
    n_layers: int = Field(2, ge=1, description="number of blocks")
    n_heads: int = Field(4, ge=1, description="attention heads")
    mlp_ratio: float = Field(8 / 3, gt=0, description="SwiGLU hidden width / d_model")
    attn_window: int = Field(0, ge=0, description="sliding attention window in bytes (0 = full causal)")
    renamed = {"window": "attn_window"}  # the eval window is the suite\'s eval.window


@register
class ByteTransformer(Adapter):
    name = "bytes"
    description = "decoder-only Transformer over raw bytes (vocabulary 256 + BOS)"
    Config = ByteTransformerConfig
    sizing = SizingFields(width="d_model", depth="n_layers", heads="n_heads")

    def __init__(self, config: ByteTransformerConfig):
        super().__init__(config)
        c = config
        self.embed = nn.Embedding(BYTE_VOCAB + 1, c.d_model)
        # hashed n-grams on the input embedding: input t is byte t-1, so its n-gram ends at byte t-1
        self.hash_embeds = HashNgramEmbedding(c.hash_ngrams, c.hash_buckets, c.d_model)
        self.body = Transformer(c.d_model, c.n_layers, c.n_heads, c.mlp_ratio, c.attn_window)
        self.head = nn.Linear(c.d_model, BYTE_VOCAB, bias=False)
        init_weights(self)

    def next_byte_logits(self, windows: torch.Tensor) -> torch.Tensor:
        inputs = F.pad(windows[:, :-1], (1, 0), value=BOS)  # (B, W): BOS, x_0 .. x_{W-2}
        return self.head(self.body(self.hash_embeds(self.embed(inputs), inputs)))  # (B, W, 256)

    def flops_per_byte(self, window: int) -> dict[str, float]:
        c = self.config
        body = flops.transformer(window, c.d_model, c.n_layers, c.mlp_ratio, c.attn_window) / window
        head = flops.linear(1, c.d_model, BYTE_VOCAB)
        return {"transformer": body, "head": head, "total": body + head}
