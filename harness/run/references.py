"""Reference rows: classical compressors and the order-0 entropy on the same test
windows the models score.

Three codings of the windows, each reported in bits per scored byte:

- primed: each window coded after the training split, as the extra bytes
  C(train + window) - C(train). The compressor has seen what a model trains on
  and codes the window with that context, so this is the fair counterpart of a
  trained model (docs/protocols.md, "6. Fairness"). Each compressor codes the training split
  once; every window then continues a forked copy of that primed coder (see
  primed_extra_bytes), so the figures are those of coding train + window whole.
  A suite may cap the priming at the last
  `prime_bytes` bytes of the split (`references: {prime_bytes: N}`): each primed
  coding still reads the priming text twice, which at a split of many GB takes
  hours; the entry then records the cap.
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
import pickle
import platform
import subprocess
import sys
import time
import traceback
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from harness.storage import cache_dir as shared_cache_dir
from harness.storage import read_cache_entry, write_json_atomic
from harness.modeling.entropy import order0_entropy

if TYPE_CHECKING:  # not imported: the primed coder's process does without torch
    import torch

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
PRIMING_PIECE = 1 << 14  # see primed_coder


class Stream(Protocol):
    """A coder fed in pieces: compress(piece) returns the bytes coded so far, flush() ends the stream."""

    def compress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


def coded(stream: Stream, data: bytes) -> bytes:
    """`data` coded by `stream` as one whole stream."""
    return stream.compress(data) + stream.flush()


@dataclass(frozen=True)
class Compressor:
    """A row of the reference table. `compress(data, size)` codes `data` with settings
    that fit an input of `size` bytes (default: len(data)). `stream(size)` is the same coder
    fed in pieces, for an input of exactly `size` bytes; compressors without one get no primed
    row (gzip and bz2, see compressors())."""

    name: str
    settings: str
    compress: Callable[..., bytes]
    stream: Callable[[int], Stream] | None = None

    @property
    def primed(self) -> bool:
        return self.stream is not None


def xz_dict_size(size: int) -> int:
    """An LZMA2 dictionary that holds an input of `size` bytes: the next power of two, at
    least 4 KiB (preset 9's 64 MiB would be allocated for every 256-byte window)."""
    return max(XZ_MIN_DICT, 1 << max(size - 1, 1).bit_length())


def xz_stream(size: int) -> lzma.LZMACompressor:
    """xz container, LZMA2 preset 9e, with a dictionary sized to an input of `size` bytes."""
    return lzma.LZMACompressor(format=lzma.FORMAT_XZ, filters=[
        {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": xz_dict_size(size)}])


def xz_compress(data: bytes, size: int | None = None) -> bytes:
    """lzma.compress with xz_stream's settings (lzma.compress is this same compress + flush)."""
    return coded(xz_stream(len(data) if size is None else size), data)


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


class PpmdStream:
    """PPMd var. I at PPMD_ORDER with PPMD_MEMORY as a Stream; flush() writes the end mark."""

    def __init__(self, size: int | None = None):  # the model does not depend on the input's size
        self.encoder = _ppmd().Ppmd8Encoder(PPMD_ORDER, PPMD_MEMORY)

    def compress(self, data: bytes) -> bytes:
        return self.encoder.encode(data)

    def flush(self) -> bytes:
        return self.encoder.flush()


def ppmd_compress(data: bytes, size: int | None = None) -> bytes:
    """PPMd var. I at PPMD_ORDER with PPMD_MEMORY, end mark and range-coder flush included
    (`pyppmd.decompress(out, max_order=PPMD_ORDER, mem_size=PPMD_MEMORY)` gives `data` back)."""
    return coded(PpmdStream(), data)


def compressors() -> dict[str, Compressor]:
    """The reference compressors, by row name. gzip and bz2 get no primed row: deflate sees
    only the last 32 kB of the training split, and bz2 recomputes its block's sort and
    Huffman tables with the window in it, so their extra bytes say little about the window."""
    table = [
        Compressor("gzip -9", "gzip container, deflate level 9, mtime 0",
                   lambda b, size=None: gzip.compress(b, compresslevel=9, mtime=0)),
        Compressor("bz2 -9", "bzip2 level 9 (900 kB blocks)", lambda b, size=None: bz2.compress(b, compresslevel=9)),
        Compressor("xz -9e", "xz container, LZMA2 preset 9e, dictionary sized to the input (power of two, >= 4 KiB)",
                   xz_compress, xz_stream),
    ]
    zstandard = _zstd()
    if zstandard is not None:
        compressor = zstandard.ZstdCompressor(level=19)
        # the stream pledges its input's size, as the one-shot compress does, so both write the same frame;
        # it has a compressor of its own (a compressobj works in its compressor's context)
        table.append(Compressor("zstd -19", "zstd frame, level 19", lambda b, size=None: compressor.compress(b),
                                lambda size: zstandard.ZstdCompressor(level=19).compressobj(size=size)))
    if _ppmd() is not None:
        table.append(Compressor(f"PPMd order {PPMD_ORDER}",
                                f"PPMd var. I (pyppmd), order {PPMD_ORDER}, {PPMD_MEMORY >> 20} MiB model memory, "
                                "end mark and flush included", ppmd_compress, PpmdStream))
    return {c.name: c for c in table}


def compressor_versions() -> dict:
    zstandard, pyppmd = _zstd(), _ppmd()
    return {"python": platform.python_version(), "zlib": zlib.ZLIB_RUNTIME_VERSION,
            "zstandard": getattr(zstandard, "__version__", None), "pyppmd": getattr(pyppmd, "__version__", None)}


def window_bytes(windows: torch.Tensor) -> list[bytes]:
    return [bytes(w.tolist()) for w in windows]  # the values are bytes, 0..255


def reference_rows(windows: torch.Tensor) -> dict:
    """Each window alone only (the rows of records before primed references): bits per byte
    of each compressor over the windows, and the order-0 entropy of their bytes."""
    chunks = window_bytes(windows)
    total = sum(len(c) for c in chunks)
    rows = {name: 8.0 * sum(len(c.compress(w)) for w in chunks) / total for name, c in compressors().items()}
    return {"compressors_bpb": rows, "order0_entropy_bpb": order0_entropy(b"".join(chunks))}


def primed_extra_bytes(compressor: Compressor, train: bytes, chunks: list[bytes],
                       progress: Callable[[int], None] = lambda done: None) -> list[int]:
    """Per window (all of one length): C(train + window) - C(train), the bytes the window adds
    to the compressed training split (settings fitted to train + window on both sides).
    Computed by primed_coder in a fresh Python process, which forks at a small fraction of the
    cost of this one (torch, the corpus) and leaves this one's memory alone."""
    harness_root = str(Path(__file__).resolve().parents[2])  # so that the process imports this harness
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [harness_root, os.environ.get("PYTHONPATH")]))}
    extra = []
    with subprocess.Popen([sys.executable, "-m", "harness.run.references"], env=env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as process:
        with contextlib.suppress(BrokenPipeError):  # a process that failed says why on stderr
            pickle.dump((compressor.name, train, chunks), process.stdin)
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        for line in process.stdout:
            extra.append(int(line))
            progress(len(extra))
    if process.returncode != 0 or len(extra) != len(chunks):
        raise RuntimeError(f"the primed {compressor.name} coder stopped (exit status {process.returncode}); "
                           "its traceback is above")
    return extra


def primed_coder(compressor: Compressor, train: bytes, chunks: list[bytes]) -> Iterator[int]:
    """primed_extra_bytes in this process, window by window. The coder reads the training split
    once, and each window continues a forked copy of it: none of the coders can copy its state,
    and a stream's output does not depend on how its input is cut into pieces
    (tests/test_references.py checks both against coding train + window whole)."""
    if len({len(c) for c in chunks}) != 1:
        raise ValueError(f"windows of one length expected, got lengths {sorted({len(c) for c in chunks})}")
    size = len(train) + len(chunks[0])
    base = Forked(lambda: len(compressor.compress(train, size)))  # C(train), beside the priming
    primed = compressor.stream(size)
    # in pieces: given all at once, liblzma takes the split into its buffer and codes it at the next
    # call, which would be in every window's copy
    head = sum(len(primed.compress(train[i:i + PRIMING_PIECE])) for i in range(0, len(train), PRIMING_PIECE))
    for tail in forked_map(lambda chunk: len(coded(primed, chunk)), chunks):
        yield head + tail - base.result()


class Forked:
    """work() running in a forked copy of this process, so that what it does to the coders in
    memory is lost with the copy; result() waits for its answer, which comes through a pipe."""

    def __init__(self, work: Callable[[], int]):
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            status = 1
            try:
                os.close(read)
                os.write(write, str(work()).encode())
                status = 0
            except BaseException:  # noqa: BLE001 - said on stderr; the copy must never return to the caller
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(status)
        os.close(write)
        self.pipe = os.fdopen(read, "rb")
        self.answer: int | None = None

    def result(self) -> int:
        if self.answer is None:
            with self.pipe:
                answer = self.pipe.read()
            _, status = os.waitpid(self.pid, 0)
            if status != 0:
                raise RuntimeError(f"a coder in a forked process failed (wait status {status}); its traceback is above")
            self.answer = int(answer)
        return self.answer


def forked_map(work: Callable[[bytes], int], items: list[bytes]) -> Iterator[int]:
    """work(item) for each item in order, each in its own Forked copy, as many at once as this
    process has cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    running = deque()
    try:
        for i, item in enumerate(items):
            running.append(Forked(lambda item=item: work(item)))
            while len(running) >= cores or (running and i == len(items) - 1):
                yield running.popleft().result()
    finally:
        for forked in running:  # after a failure: the others are reaped, not left as zombies
            with contextlib.suppress(RuntimeError, ValueError):
                forked.result()


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
    cache folder ($XDG_CACHE_HOME or ~/.cache)/tokenizer-harness/references (harness.storage)."""
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
    cached = read_cache_entry(path, log)
    if cached is not None and cached.get("key") == key and isinstance(cached.get("entry"), dict):
        log(f"references for {label}: from the cache {path}" if label else f"references: from the cache {path}")
        return cached["entry"]
    entry = compute_references(train, windows, label, log, prime_bytes=prime_bytes)
    try:
        write_json_atomic(path, {"key": key, "entry": entry}, hashed=True)
    except OSError as e:
        log(f"warning: cannot write the reference cache {path} ({e.strerror}); set HARNESS_CACHE_DIR to cache them")
    return entry


def raw_byte_metrics(test: bytes) -> dict:
    """The raw-bytes row of the report's tokenizer table: one token per byte, no training."""
    return {"tokenizer": "raw bytes", "vocab_size": 256, "bytes_per_token_test": 1.0,
            "vocab_used_test": len(set(test)) / 256, "tokenizer_train_seconds": 0.0}


if __name__ == "__main__":  # primed_extra_bytes's process: its arguments pickled on stdin, one answer a line out
    name, train, chunks = pickle.load(sys.stdin.buffer)
    for extra in primed_coder(compressors()[name], train, chunks):
        print(extra, flush=True)
