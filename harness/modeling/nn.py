"""Shared neural-network blocks. Every adapter builds its Transformers from these,
so that a difference between models comes from tokenization or patching only.

Pieces: RMSNorm, rotary position embeddings, causal self-attention through
scaled_dot_product_attention (full, or a sliding window at O(T*w) cost),
SwiGLU MLP, a causal depthwise convolution ("Canon"), a pre-norm block and a
stack of blocks. FLOP formulas for each piece live in harness/modeling/flops.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


ROTARY_TABLES: dict = {}  # (length, head_dim, device, base) -> (cos, sin)


def rotary_tables(length: int, head_dim: int, device, base: float = 10000.0):
    """cos and sin tables, each (length, head_dim // 2). Built once per length, width and device
    rather than in every attention layer of every forward pass (a visible share of a small
    model's step); not kept when made under inference_mode, whose tensors autograd refuses, or
    while torch.compile traces."""
    key = (length, head_dim, str(device), base)
    if key in ROTARY_TABLES:
        return ROTARY_TABLES[key]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    tables = angles.cos(), angles.sin()
    if not (torch.is_inference_mode_enabled() or torch.compiler.is_compiling()):  # a compiled graph keeps its own
        if len(ROTARY_TABLES) >= 512:  # data-dependent lengths (chunks) make many keys; keep it bounded
            ROTARY_TABLES.clear()
        ROTARY_TABLES[key] = tables
    return tables


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) of x (B, nh, T, hd)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


def sliding_window_attention(q, k, v, window: int) -> torch.Tensor:
    """Causal attention where query t sees keys t-window+1..t, at O(T * window) cost.

    The sequence is cut into blocks of `window` positions; each block's queries
    attend to the keys of their own block and the previous one (2 * window keys)
    under a band mask. q, k, v: (B, nh, T, hd). Returns (B, nh, T, hd).
    """
    B, nh, T, hd = q.shape
    n_blocks = math.ceil(T / window)
    pad = n_blocks * window - T
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    # keys/values of [previous block, this block] for every block: (B, nh, nb, 2w, hd)
    k_blocks = k.view(B, nh, n_blocks, window, hd)
    v_blocks = v.view(B, nh, n_blocks, window, hd)
    k_prev = F.pad(k_blocks, (0, 0, 0, 0, 1, 0))[:, :, :-1]
    v_prev = F.pad(v_blocks, (0, 0, 0, 0, 1, 0))[:, :, :-1]
    k_pair = torch.cat((k_prev, k_blocks), dim=3)
    v_pair = torch.cat((v_prev, v_blocks), dim=3)
    q_blocks = q.view(B, nh, n_blocks, window, hd)
    # band mask: key offset j in [0, 2w) sits at relative position j - w from the block start
    query_pos = torch.arange(window, device=q.device)[:, None] + window
    key_pos = torch.arange(2 * window, device=q.device)[None, :]
    band = (key_pos <= query_pos) & (query_pos - key_pos < window)
    mask = band.expand(n_blocks, window, 2 * window).clone()
    mask[0, :, :window] = False  # block 0 has no previous block
    out = F.scaled_dot_product_attention(q_blocks, k_pair, v_pair, attn_mask=mask)
    return out.reshape(B, nh, n_blocks * window, hd)[:, :, :T]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE; `window` > 0 limits it to a sliding window."""

    def __init__(self, dim: int, n_heads: int, window: int = 0):
        super().__init__()
        if dim % n_heads or (dim // n_heads) % 2:
            raise ValueError(f"width {dim} does not split into {n_heads} heads of even width (RoPE rotates pairs)")
        self.n_heads = n_heads
        self.window = window
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        cos, sin = rotary_tables(T, C // self.n_heads, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.window and self.window < T:
            y = sliding_window_attention(q, k, v, self.window)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class CrossAttention(nn.Module):
    """Attention from queries (B, Tq, dim) to a memory (B, Tk, dim) under a boolean mask
    (True = may attend), broadcastable to (B, 1, Tq, Tk). Rows with no allowed key return 0."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"width {dim} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, Tq, C = x.shape
        Tk = memory.shape[1]
        hd = C // self.n_heads
        q = self.q(x).view(B, Tq, self.n_heads, hd).transpose(1, 2)
        k, v = self.kv(memory).split(C, dim=2)
        k = k.view(B, Tk, self.n_heads, hd).transpose(1, 2)
        v = v.view(B, Tk, self.n_heads, hd).transpose(1, 2)
        has_key = mask.any(-1, keepdim=True)
        # a fully masked row would give NaN; let it attend everywhere, then zero it
        safe_mask = mask | ~has_key
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask)
        y = y * has_key
        return self.out(y.transpose(1, 2).reshape(B, Tq, C))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class CausalConv(nn.Module):
    """Depthwise causal convolution over time, added residually ("Canon" layer):
    y_t = x_t + sum_k w_k * x_{t-k}, k < kernel."""

    def __init__(self, dim: int, kernel: int = 4):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim, bias=False)
        nn.init.zeros_(self.conv.weight)  # starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, C)
        h = F.pad(x.transpose(1, 2), (self.kernel - 1, 0))
        return x + self.conv(h).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x)).
    With `canon`, a causal depthwise convolution follows each residual add."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 8 / 3, window: int = 0, canon: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = CausalSelfAttention(dim, n_heads, window)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden(dim, mlp_ratio))
        self.canon_attn = CausalConv(dim) if canon else nn.Identity()
        self.canon_mlp = CausalConv(dim) if canon else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.canon_attn(x + self.attn(self.attn_norm(x)))
        return self.canon_mlp(x + self.mlp(self.mlp_norm(x)))


def mlp_hidden(dim: int, ratio: float) -> int:
    """SwiGLU hidden width, rounded up to a multiple of 8."""
    return int(math.ceil(dim * ratio / 8) * 8)


class Transformer(nn.Module):
    """A stack of blocks with a final norm; no embedding and no head (adapters own those)."""

    def __init__(self, dim: int, n_layers: int, n_heads: int, mlp_ratio: float = 8 / 3, window: int = 0, canon: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, n_heads, mlp_ratio, window, canon) for _ in range(n_layers))
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 style initialisation for linear and embedding weights."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
