"""Reference rows: classical compressors and the order-0 entropy on the same test
windows the models score, each window compressed on its own (an empty context,
like the models)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
from collections import Counter

import torch


def _zstd_compress():
    try:
        import zstandard
    except ImportError:
        return None
    compressor = zstandard.ZstdCompressor(level=19)
    return compressor.compress


def compressors() -> dict:
    table = {
        "gzip -9": lambda b: gzip.compress(b, compresslevel=9, mtime=0),
        "bz2 -9": lambda b: bz2.compress(b, compresslevel=9),
        "xz -9e": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
    }
    zstd = _zstd_compress()
    if zstd is not None:
        table["zstd -19"] = zstd
    return table


def order0_entropy(data: bytes) -> float:
    """Empirical unigram byte entropy in bits per byte."""
    counts = Counter(data)
    n = len(data)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def reference_rows(windows: torch.Tensor) -> dict:
    """bits per byte of each compressor over the windows, and the order-0 entropy of their bytes."""
    chunks = [bytes(w.to(torch.uint8).tolist()) for w in windows]
    total = sum(len(c) for c in chunks)
    rows = {name: 8.0 * sum(len(fn(c)) for c in chunks) / total for name, fn in compressors().items()}
    return {"compressors_bpb": rows, "order0_entropy_bpb": order0_entropy(b"".join(chunks))}


def raw_byte_metrics(test: bytes) -> dict:
    """The raw-bytes row of the report's tokenizer table: one token per byte, no training."""
    return {"tokenizer": "raw bytes", "vocab_size": 256, "bytes_per_token_test": 1.0,
            "vocab_used_test": len(set(test)) / 256, "tokenizer_train_seconds": 0.0}
