"""The FLOP convention, written once (docs/protocols.md, "3. FLOPs"):

- a multiply-add is 2 FLOPs; every matrix product counts, including the output
  head and both attention products (scores and the weighted sum of values);
- embedding lookups, norms, activations and softmax count 0;
- attention counts what is computed: full causal attention over T positions
  counts T x T; sliding-window attention counts its blocks (harness.modeling.nn);
- backward = 2 x forward, so training FLOPs = 3 x forward FLOPs.

Like Kaplan et al. and Chinchilla, attention is counted over the full context
with no discount for the causal mask. Functions here give forward FLOPs for a
whole sequence; adapters divide by the bytes the sequence covers.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from harness.modeling.nn import mlp_hidden

TRAIN_MULTIPLIER = 3  # forward + backward (2 x forward)


def linear(tokens: float, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def attention_products(queries: float, keys_per_query: float, dim: int) -> float:
    """Scores (q k^T) and weighted values (p v), each 2 * keys * dim per query."""
    return 4.0 * queries * keys_per_query * dim


def attention_keys(length: int, window: int) -> float:
    """Keys each query is scored against, as harness.modeling.nn computes it (padded blocks included)."""
    if window and window < length:
        return math.ceil(length / window) * window * 2 * window / length
    return float(length)


def causal_conv(length: int, dim: int, kernel: int = 4) -> float:
    """Depthwise causal convolution: a multiply-add per tap, channel and position."""
    return 2.0 * length * dim * kernel


def block(length: int, dim: int, mlp_ratio: float = 8 / 3, window: int = 0, canon: bool = False) -> float:
    """One harness.modeling.nn.Block over `length` positions."""
    hidden = mlp_hidden(dim, mlp_ratio)
    projections = linear(length, dim, 3 * dim) + linear(length, dim, dim)
    mlp = 3 * linear(length, dim, hidden)
    convs = 2 * causal_conv(length, dim) if canon else 0.0
    return projections + attention_products(length, attention_keys(length, window), dim) + mlp + convs


def transformer(length: int, dim: int, n_layers: int, mlp_ratio: float = 8 / 3, window: int = 0, canon: bool = False) -> float:
    """harness.modeling.nn.Transformer over `length` positions."""
    return n_layers * block(length, dim, mlp_ratio, window, canon)


def cross_attention(queries: int, keys: int, dim: int) -> float:
    """harness.modeling.nn.CrossAttention: q, k/v and out projections plus a full (queries x keys) product."""
    return linear(queries, dim, dim) + linear(keys, dim, 2 * dim) + linear(queries, dim, dim) + attention_products(queries, keys, dim)


def training_steps(budget: float, training_flops_per_byte: float, batch_bytes: int) -> int:
    """The one conversion of a FLOP budget into optimizer steps: bytes D = C / training FLOPs
    per byte, steps = floor(D / bytes per batch)."""
    return int(max(0.0, budget) / training_flops_per_byte // batch_bytes)


@contextmanager
def counting():
    """A FlopCounterMode over the block (its get_total_flops() after), with attention on the
    MATH backend (the fused CPU kernel is counted as zero in torch 2.13)."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        yield counter


def measure_forward(fn, *args) -> float:
    """FLOPs that torch's FlopCounterMode counts for fn(*args) (see counting)."""
    with torch.no_grad(), counting() as counter:
        fn(*args)
    return float(counter.get_total_flops())
