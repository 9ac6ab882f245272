"""Reference rows: classical compressors and the order-0 entropy on the same test
windows the models score.

Three codings of the windows, each reported in bits per scored byte:

- primed: each window coded after the training split, as the extra bytes
  C(train + window) - C(train). The compressor has seen what a model trains on
  and codes the window with that context, so this is the fair counterpart of a
  trained model (docs/protocols.md, "6. Fairness"). A suite may cap the priming at the last
  `prime_bytes` bytes of the split (`references: {prime_bytes: N}`): each of the
  primed codings reads the priming text twice per window, which at a split of
  many GB takes days; the entry then records the cap.
- whole split: all scored windows concatenated and compressed at once, comparable
  with published whole-file figures.
- each window alone: every window compressed on its own, container (headers,
  checksums, tables) included. At 256 bytes a window is mostly overhead.

`cached_references` computes all of them once per (training split, priming cap, scored
windows, window, format) and keeps the answer in a per-user cache (see `cache_dir`).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import lzma
import os
import platform
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from harness.api.storage import cache_dir as shared_cache_dir
from harness.modeling.entropy import order0_entropy

# Version of the cached entry (and of the "references" entry of suite.json that it fills);
# bump it when a compressor's settings or the way a figure is computed changes.
REFERENCES_FORMAT = 2

# PPMd variant I (PPMd8). The order was chosen on validation windows (the first 32 of 256
# bytes, primed, matched_flops split) among 4..32: 16 is best on both embedded corpora
# (pydoc 1.896 bpb against 1.923 at order 8; stdlib 1.524 against 1.594), higher orders
# tie. The model memory is far more than a 380 kB split needs, so the model never restarts.
PPMD_ORDER = 16
PPMD_MEMORY = 256 << 20

XZ_MIN_DICT = 4096  # liblzma's smallest LZMA2 dictionary


@dataclass(frozen=True)
class Compressor:
    """A row of the reference table. `compress(data, size)` codes `data` with settings
    that fit an input of `size` bytes (default: len(data))."""

    name: str
    settings: str
    compress: Callable[..., bytes]
    primed: bool  # also coded after the training split (not gzip/bz2, see compressors())


def xz_dict_size(size: int) -> int:
    """An LZMA2 dictionary that holds an input of `size` bytes: the next power of two, at
    least 4 KiB (preset 9's 64 MiB would be allocated for every 256-byte window)."""
    return max(XZ_MIN_DICT, 1 << max(size - 1, 1).bit_length())


def xz_compress(data: bytes, size: int | None = None) -> bytes:
    """xz container, LZMA2 preset 9e, with a dictionary sized to the input."""
    dict_size = xz_dict_size(len(data) if size is None else size)
    return lzma.compress(data, format=lzma.FORMAT_XZ, filters=[
        {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size}])


def _zstd():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def _ppmd():
    try:
        import pyppmd
    except ImportError:
        return None
    return pyppmd


def ppmd_compress(data: bytes, size: int | None = None) -> bytes:
    """PPMd var. I at PPMD_ORDER with PPMD_MEMORY, end mark and range-coder flush included
    (`pyppmd.decompress(out, max_order=PPMD_ORDER, mem_size=PPMD_MEMORY)` gives `data` back)."""
    encoder = _ppmd().Ppmd8Encoder(PPMD_ORDER, PPMD_MEMORY)
    return encoder.encode(data) + encoder.flush()


def compressors() -> dict[str, Compressor]:
    """The reference compressors, by row name. gzip and bz2 get no primed row: deflate sees
    only the last 32 kB of the training split, and bz2 recomputes its block's sort and
    Huffman tables with the window in it, so their extra bytes say little about the window."""
    table = [
        Compressor("gzip -9", "gzip container, deflate level 9, mtime 0",
                   lambda b, size=None: gzip.compress(b, compresslevel=9, mtime=0), primed=False),
        Compressor("bz2 -9", "bzip2 level 9 (900 kB blocks)", lambda b, size=None: bz2.compress(b, compresslevel=9),
                   primed=False),
        Compressor("xz -9e", "xz container, LZMA2 preset 9e, dictionary sized to the input (power of two, >= 4 KiB)",
                   xz_compress, primed=True),
    ]
    zstandard = _zstd()
    if zstandard is not None:
        compressor = zstandard.ZstdCompressor(level=19)
        table.append(Compressor("zstd -19", "zstd frame, level 19", lambda b, size=None: compressor.compress(b),
                                primed=True))
    if _ppmd() is not None:
        table.append(Compressor(f"PPMd order {PPMD_ORDER}",
                                f"PPMd var. I (pyppmd), order {PPMD_ORDER}, {PPMD_MEMORY >> 20} MiB model memory, "
                                "end mark and flush included", ppmd_compress, primed=True))
    return {c.name: c for c in table}


def compressor_versions() -> dict:
    zstandard, pyppmd = _zstd(), _ppmd()
    return {"python": platform.python_version(), "zlib": zlib.ZLIB_RUNTIME_VERSION,
            "zstandard": getattr(zstandard, "__version__", None), "pyppmd": getattr(pyppmd, "__version__", None)}


def window_bytes(windows: torch.Tensor) -> list[bytes]:
    return [bytes(w.to(torch.uint8).tolist()) for w in windows]


def reference_rows(windows: torch.Tensor) -> dict:
    """Each window alone only (the rows of records before primed references): bits per byte
    of each compressor over the windows, and the order-0 entropy of their bytes."""
    chunks = window_bytes(windows)
    total = sum(len(c) for c in chunks)
    rows = {name: 8.0 * sum(len(c.compress(w)) for w in chunks) / total for name, c in compressors().items()}
    return {"compressors_bpb": rows, "order0_entropy_bpb": order0_entropy(b"".join(chunks))}


def primed_extra_bytes(compressor: Compressor, train: bytes, chunks: list[bytes],
                       progress: Callable[[int], None] = lambda done: None) -> list[int]:
    """Per window: C(train + window) - C(train), the bytes the window adds to the compressed
    training split (settings fitted to the longest input, so both sides use the same)."""
    size = len(train) + max(len(c) for c in chunks)
    base = len(compressor.compress(train, size))
    extra = []
    for i, chunk in enumerate(chunks, 1):
        extra.append(len(compressor.compress(train + chunk, size)) - base)
        progress(i)
    return extra


def priming(train: bytes, prime_bytes: int | None) -> bytes:
    """What the compressors are primed with: the whole training split, or its last `prime_bytes`
    bytes (the text nearest the test split, which follows it)."""
    return train if prime_bytes is None else train[-prime_bytes:]


def primed_with(prime_bytes: int | None) -> str:
    """How the primed rows were primed, in words (log lines and the report)."""
    return "primed with the training split" if prime_bytes is None else \
        f"primed with the last {prime_bytes:,} bytes of the training split"


def compute_references(train: bytes, windows: torch.Tensor, label: str = "",
                       log: Callable[[str], None] = print, log_every_s: float = 10.0,
                       prime_bytes: int | None = None) -> dict:
    """The "references" entry of suite.json for one corpus (uncached; see cached_references).
    With `prime_bytes`, the primed rows are primed with the last `prime_bytes` bytes of `train`."""
    chunks = window_bytes(windows)
    total = sum(len(c) for c in chunks)
    table = compressors()
    prefix = f"references for {label}: " if label else "references: "
    started = time.perf_counter()
    primer = priming(train, prime_bytes)
    primed = {}
    for name, c in table.items():
        if not c.primed:
            continue
        last = [time.perf_counter()]
        what = f"{prefix}{name} {primed_with(prime_bytes)} ..."

        def progress(done: int, what=what, last=last) -> None:
            now = time.perf_counter()
            if done == len(chunks) or now - last[0] >= log_every_s:
                log(f"{what} {done}/{len(chunks)} windows")
                last[0] = now

        log(f"{what} 0/{len(chunks)} windows")
        primed[name] = 8.0 * sum(primed_extra_bytes(c, primer, chunks, progress)) / total
    log(f"{prefix}whole test split and each window alone ...")
    whole = b"".join(chunks)
    whole_split = {name: 8.0 * len(c.compress(whole)) / total for name, c in table.items()}
    alone = {name: 8.0 * sum(len(c.compress(w)) for w in chunks) / total for name, c in table.items()}
    seconds = time.perf_counter() - started
    log(f"{prefix}done in {seconds:.1f}s")
    cap = {} if prime_bytes is None else {"prime_bytes": prime_bytes}  # absent uncapped, as in entries before the cap
    return {
        "format": REFERENCES_FORMAT,
        "test": {
            "primed_bpb": primed,
            "whole_split_bpb": whole_split,
            "compressors_bpb": alone,  # each window alone, as in records before format 2
            "order0_entropy_bpb": order0_entropy(whole),
        },
        "windows": len(chunks),
        "window": int(windows.shape[1]),
        "train_bytes": len(train),
        **cap,
        "compressors": {name: c.settings for name, c in table.items()},
        "versions": compressor_versions(),
        "compute_seconds": seconds,
    }


def cache_dir() -> Path:
    """Where references are kept: $HARNESS_CACHE_DIR/references if set, else the user's
    cache folder ($XDG_CACHE_HOME or ~/.cache)/tokenizer-harness/references (harness.api.storage)."""
    return shared_cache_dir("references")


def cache_key(train: bytes, windows: torch.Tensor, prime_bytes: int | None = None) -> dict:
    """The whole split's hash and, when capped, the cap: a capped entry is never read for an
    uncapped suite or the other way round (the entry's train_bytes is the whole split's in both)."""
    cap = {} if prime_bytes is None else {"prime_bytes": prime_bytes}  # absent uncapped: older keys still match
    return {"format": REFERENCES_FORMAT, "train_sha256": hashlib.sha256(train).hexdigest(),
            "test_windows_sha256": hashlib.sha256(b"".join(window_bytes(windows))).hexdigest(),
            "window": int(windows.shape[1]), "versions": compressor_versions(), **cap}


def cached_references(train: bytes, windows: torch.Tensor, label: str = "", log: Callable[[str], None] = print,
                      prime_bytes: int | None = None) -> dict:
    """compute_references, cached by (sha256 of the training split, the priming cap, sha256 of
    the scored windows' bytes, window, format, compressor versions) in cache_dir(). A cache that
    cannot be read is recomputed; one that cannot be written is skipped with a line in the log."""
    key = cache_key(train, windows, prime_bytes)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_dir() / f"{name}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            log(f"references for {label}: from the cache {path}" if label else f"references: from the cache {path}")
            return cached["entry"]
    except (OSError, ValueError, AttributeError):
        pass
    entry = compute_references(train, windows, label, log, prime_bytes=prime_bytes)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps({"key": key, "entry": entry}, indent=1))
        os.replace(temporary, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)  # a full disk leaves half a file
        log(f"warning: cannot write the reference cache {path} ({e.strerror}); set HARNESS_CACHE_DIR to cache them")
    return entry


def raw_byte_metrics(test: bytes) -> dict:
    """The raw-bytes row of the report's tokenizer table: one token per byte, no training."""
    return {"tokenizer": "raw bytes", "vocab_size": 256, "bytes_per_token_test": 1.0,
            "vocab_used_test": len(set(test)) / 256, "tokenizer_train_seconds": 0.0}
