"""Hashed byte n-gram embeddings (after BLT, Pagnoni et al. 2024), an option of every
byte-level adapter: one table of `buckets` rows per n, and each position gets the sum
of the rows of the n-grams that END at it, so it uses that position's byte and the ones
before it, never a later one.

The n-gram of bytes t-n+1 .. t is hashed as a base-257 number of its digits (byte + 1),
modulo 2^31 - 1 (Horner's rule, no int64 overflow), then modulo `buckets` (the patcher's
hash before this module, unchanged). A position with fewer than n bytes before it reads
digit 0 ("no byte") for the missing ones, and so does BOS: a BOS-shifted input (BOS, x_0
.. x_{T-2}) gets at t the n-grams ending at byte t-1, and at t = 0 the empty n-gram (row 0).

Lookups and additions count 0 FLOPs (harness.modeling.flops); the tables are nn.Embedding,
so Adapter.parameter_counts lists them as embedding parameters.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from harness.modeling.windows import BOS

HASH_PRIME = 2_147_483_647  # 2^31 - 1: rolling-hash modulus (no int64 overflow)


class HashNgramConfig(BaseModel):
    """The config fields of the option; byte-level adapter configs derive from this and from
    AdapterConfig (the same strict settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    hash_ngrams: tuple[Annotated[int, Field(ge=3, le=8)], ...] = Field(
        (), description="n of the hashed byte n-gram embeddings added where the model embeds bytes, one table per n "
                        "and embedding (BLT; none by default)")
    hash_buckets: int = Field(4096, ge=1, description="rows (buckets) of each hashed n-gram table")

    @field_validator("hash_ngrams")
    @classmethod
    def _no_repeats(cls, ngrams: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(ngrams)) != len(ngrams):
            raise ValueError("hash_ngrams lists an n twice")
        return ngrams


def ngram_hashes(ids: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T) byte ids (0..255, or BOS) -> (B, T) hash of the n-gram ending at each position."""
    digits = torch.where(ids == BOS, 0, ids + 1)  # 0 = no byte (BOS, or before the sequence)
    padded = F.pad(digits, (n - 1, 0), value=0)
    T = ids.shape[1]
    h = torch.zeros_like(ids)
    for i in range(n):  # digits of positions t-n+1 .. t, most significant first
        h = (h * 257 + padded[:, i : i + T]) % HASH_PRIME
    return h


class HashNgramEmbedding(nn.ModuleList):
    """One nn.Embedding(buckets, dim) per n, in the order given. A ModuleList, so the tables'
    state_dict keys are `<name>.<index>.weight`, as the patcher's were before this module."""

    def __init__(self, ngrams: tuple[int, ...], buckets: int, dim: int):
        super().__init__(nn.Embedding(buckets, dim) for _ in ngrams)
        self.ngrams, self.buckets, self.dim = tuple(ngrams), buckets, dim

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x (B, T, dim) plus, at each position t of ids (B, T), the rows of the n-grams ending
        at t, one table after another; x itself when there are no tables."""
        for n, table in zip(self.ngrams, self):
            x = x + table(ngram_hashes(ids, n) % self.buckets)
        return x
