"""The part the tokenizer baselines share: a decoder-only Transformer over token ids
(the shared harness.modeling.nn blocks), lossless byte <-> token accounting, the tokenizer
cache and the tokenizer metrics. `bpe` and `sentencepiece` subclass TokenLM and
differ only in how they train and load their tokenizer.

Bytes to tokens, losslessly (docs/protocols.md, "1. Bytes and bits per byte"). Tokenizer libraries take text,
the harness has arbitrary bytes. A window is split into maximal runs of valid
UTF-8 text, handed to the library, and "escaped" bytes, each written as the
library's one-byte token (byte-level BPE: the byte's alphabet symbol;
SentencePiece: its <0xXX> byte-fallback piece). Escaped bytes are the bytes of
invalid UTF-8 sequences (a character cut at a window edge, Latin-1 bytes, ...)
and the UTF-8 bytes of the few characters a library would not give back exactly
(`Vocabulary.reserved`: SentencePiece's whitespace symbol U+2581). Valid text
without reserved characters, the usual case, is one run: exactly the library's
own tokenization. Every token id maps to fixed bytes (`Vocabulary.pieces`), so
decoding is concatenation, and a token's byte length is known.

Scoring a window: its tokens t_1..t_n are predicted from BOS, t_1..t_{n-1} (n
positions); each token's NLL sits on its last byte, 0 on the others, so the
evaluator's per-byte sum and byte denominator are unchanged. Windows of a batch
have different token counts and are padded; padding is never scored.

FLOPs: a window of W bytes runs n(W) positions through the Transformer and the
head. n(W) = W / bytes_per_token + edge_tokens, both measured on the training
split in prepare(): bytes_per_token is the tokenizer's rate on long text (8 KiB
chunks), edge_tokens the extra tokens a window gets because its edges cut words
(from the token counts of 64-byte and 8 KiB windows, n linear in W). Padding to
the longest window of a batch is not counted (a packed implementation would not
run it); tests compare the formula with FlopCounterMode at the padded length
actually run.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harness.modeling import flops
from harness.errors import HarnessError
from harness.modeling.nn import Transformer, init_weights
from harness.api import MAX_VOCAB, MAX_WIDTH, Adapter, AdapterConfig, Preparation, RunContext, SizingFields, read_cache_entry, write_json_atomic
from harness.api import cache_dir as shared_cache_dir

CACHE_FORMAT = 1
TRAINING_CHUNK = 4096  # bytes of the training split per training text
LONG_CHUNK = 8192  # "long text" for bytes per token
SHORT_WINDOW = 64  # short windows for the edge effect
MEASURE_BYTES = 1 << 19  # training bytes tokenized for those two measurements
WINDOW_CACHE = 1 << 16  # tokenized windows a Vocabulary keeps (a 16 MB split in windows of 256 bytes)


class TokenLMConfig(AdapterConfig):
    vocab_size: int = Field(512, le=MAX_VOCAB, description="tokenizer vocabulary, including the 256 one-byte tokens and special tokens")
    d_model: int = Field(64, ge=8, le=MAX_WIDTH, description="width")
    n_layers: int = Field(2, ge=1, description="number of blocks")
    n_heads: int = Field(4, ge=1, description="attention heads")
    mlp_ratio: float = Field(8 / 3, gt=0, description="SwiGLU hidden width / d_model")
    attn_window: int = Field(0, ge=0, description="sliding attention window in tokens (0 = full causal)")
    renamed = {"window": "attn_window"}  # the eval window is the suite\'s eval.window
    tokenizer_bytes: int | None = Field(
        None, gt=0, description="train the tokenizer on the first N bytes of the training split (none: all of it; "
                                "a 12 GB split would take hours, and SentencePiece far more memory)")


def split_text(data: bytes, reserved: str = "") -> list[str | int]:
    """`data` as runs of valid UTF-8 text without `reserved` characters (str) and
    escaped bytes (int): invalid UTF-8 and the bytes of reserved characters."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", "surrogateescape")  # invalid bytes -> U+DC80..U+DCFF
    out: list[str | int] = []
    position = 0
    for match in re.finditer("[\udc80-\udcff" + re.escape(reserved) + "]+", text):
        if match.start() > position:
            out.append(text[position:match.start()])
        out.extend(match.group().encode("utf-8", "surrogateescape"))
        position = match.end()
    if position < len(text):
        out.append(text[position:])
    return out


@dataclass
class Vocabulary:
    """What the harness needs from a trained tokenizer."""

    encode_texts: Callable[[list[str]], list[list[int]]]  # the library's ids for valid text, no special tokens
    pieces: list[bytes]  # the bytes every id stands for (b"" for special tokens)
    byte_ids: list[int]  # the one-byte token of each byte value 0..255
    bos_id: int
    reserved: str = ""  # characters never handed to the library (written byte by byte)
    lengths: np.ndarray = field(init=False)  # (V,) bytes per id
    known: dict[bytes, list[int]] = field(init=False, repr=False)  # windows tokenized before (encode_windows)

    def __post_init__(self):
        self.lengths = np.array([len(p) for p in self.pieces], dtype=np.int64)
        self.known = {}

    def encode_windows(self, windows: list[bytes]) -> list[list[int]]:
        """encode(), remembering each window: training draws the same windows of the training
        split epoch after epoch, so each is tokenized once per tokenizer, not in every step."""
        new = list(dict.fromkeys(w for w in windows if w not in self.known))
        if new:
            if len(self.known) + len(new) > WINDOW_CACHE:  # bounded: evaluation brings windows of its own
                self.known.clear()
            self.known.update(zip(new, self.encode(new)))
        return [self.known[w] for w in windows]

    def encode(self, windows: list[bytes]) -> list[list[int]]:
        """Token ids of each byte string, each tokenized on its own; one library call for all."""
        parts = [split_text(w, self.reserved) for w in windows]
        texts = [s for p in parts for s in p if isinstance(s, str)]
        encoded = iter(self.encode_texts(texts) if texts else [])
        out = []
        for p in parts:
            ids: list[int] = []
            for s in p:
                if isinstance(s, str):
                    ids.extend(next(encoded))
                else:
                    ids.append(self.byte_ids[s])
            out.append(ids)
        return out

    def decode(self, ids: list[int]) -> bytes:
        return b"".join(self.pieces[i] for i in ids)

    @property
    def size(self) -> int:
        return len(self.pieces)


def cache_dir() -> Path:
    """Where trained tokenizers are kept: $HARNESS_CACHE_DIR/tokenizers if set, else the user's
    cache folder ($XDG_CACHE_HOME or ~/.cache)/tokenizer-harness/tokenizers (harness.storage)."""
    return shared_cache_dir("tokenizers")


class TokenLM(Adapter):
    """Decoder-only Transformer over the ids of a tokenizer trained in prepare()."""

    min_vocab: int  # the 256 one-byte tokens plus the special tokens
    sizing = SizingFields(width="d_model", depth="n_layers", heads="n_heads")
    byte_level = False  # scores tokens: a token's NLL sits on its last byte
    cached_preparation = True  # the tokenizer cache

    def __init__(self, config: TokenLMConfig):
        super().__init__(config)
        c = config
        if c.vocab_size < self.min_vocab:
            raise HarnessError(f"vocab_size {c.vocab_size} is smaller than the byte alphabet: "
                               f"{self.name} needs at least {self.min_vocab} (256 bytes + special tokens)")
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.body = Transformer(c.d_model, c.n_layers, c.n_heads, c.mlp_ratio, c.attn_window)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        init_weights(self)
        self.vocab: Vocabulary | None = None
        self.tokenizer_state: dict = {}

    # --- what a tokenizer baseline provides ------------------------------------------
    @abstractmethod
    def tokenizer_settings(self) -> dict:
        """Everything that determines the trained tokenizer besides the data (cache key)."""

    @abstractmethod
    def fit_tokenizer(self, texts: list[str]) -> str:
        """Train on the training split's texts; return the tokenizer serialized as a string."""

    @abstractmethod
    def load_tokenizer(self, serialized: str) -> Vocabulary:
        """Rebuild a Vocabulary from fit_tokenizer's string."""

    # --- preparation: train (or load from the cache) and measure -------------------
    def prepare(self, train: bytes, ctx: RunContext) -> Preparation:
        """Train the tokenizer on the training split, or load it from the cache: the key is
        the sha256 of the split and the settings, so every budget and seed shares one
        tokenizer (the seed is not used). Measures bytes per token on the split."""
        started = time.perf_counter()
        if not train:
            raise HarnessError(f"{self.name}: the training split is empty; a tokenizer cannot be trained")
        settings = self.tokenizer_settings()
        if self.config.tokenizer_bytes is not None:  # absent otherwise, so earlier cache entries still match
            settings["tokenizer_bytes"] = self.config.tokenizer_bytes
        sample = train[:self.config.tokenizer_bytes] if self.config.tokenizer_bytes else train
        corpus_sha256 = hashlib.sha256(sample).hexdigest()
        key = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "adapter": self.name, "corpus_sha256": corpus_sha256,
                                         "settings": settings}, sort_keys=True).encode()).hexdigest()[:24]
        path = cache_dir() / f"{self.name}-{key}.json"
        entry = _read_cache(path)
        cache_hit = entry is not None
        if entry is None:
            fit_started = time.perf_counter()
            serialized = self.fit_tokenizer(self._training_texts(sample))
            fit_seconds = time.perf_counter() - fit_started
            vocab = self.load_tokenizer(serialized)
            entry = {"tokenizer": serialized, "train_seconds": fit_seconds, "corpus_sha256": corpus_sha256,
                     "settings": settings, **_measure_rate(vocab, train)}
            try:
                write_json_atomic(path, entry, hashed=True)
            except OSError as e:
                raise HarnessError(f"cannot write the tokenizer cache {path} ({e.strerror}); set HARNESS_CACHE_DIR "
                                   "to a writable folder") from None
        self.set_extra_state(entry)
        return Preparation(seconds=time.perf_counter() - started, facts={
            "tokenizer_train_seconds": entry["train_seconds"],
            "tokenizer_cache_hit": cache_hit,
            "tokenizer_cache_file": str(path),
            "tokenizer_settings": settings,
            "vocab_size_trained": self.vocab.size,
            "bytes_per_token_train": entry["bytes_per_token"],
            "edge_tokens_per_window": entry["edge_tokens"],
        })

    def carry_preparation(self, prepared: "TokenLM") -> None:
        self.set_extra_state(prepared.get_extra_state())

    def _training_texts(self, train: bytes) -> list[str]:
        chunks = (train[i:i + TRAINING_CHUNK] for i in range(0, len(train), TRAINING_CHUNK))
        return [s for chunk in chunks for s in split_text(chunk, self.reserved_characters()) if isinstance(s, str)]

    def reserved_characters(self) -> str:
        """Characters the library would not give back exactly (see the module note)."""
        return ""

    def get_extra_state(self) -> dict:
        return self.tokenizer_state

    def set_extra_state(self, state: dict) -> None:
        self.tokenizer_state = dict(state)
        self.vocab = self.load_tokenizer(state["tokenizer"]) if state else None

    def vocabulary(self) -> Vocabulary:
        if self.vocab is None:
            raise HarnessError(f"{self.name}: no tokenizer yet; call prepare() on the training split (or load a checkpoint)")
        return self.vocab

    def units_per_byte(self) -> float:
        """Tokens per byte of the training split (long text); 1 before prepare()."""
        return 1.0 / self.tokenizer_state.get("bytes_per_token", 1.0)

    # --- the model -------------------------------------------------------------------
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs: (B, T) token ids (BOS first). Returns (B, T, vocab_size) next-token logits."""
        return self.head(self.body(self.embed(inputs)))

    def tokenize(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """windows (B, W) bytes -> ids (B, T) padded with BOS, mask (B, T) of real tokens,
        ends (B, T): the byte position each token ends at (padding: W - 1)."""
        vocab = self.vocabulary()
        rows = windows.to("cpu", torch.uint8).numpy()
        width = rows.shape[1]
        encoded = vocab.encode_windows([row.tobytes() for row in rows])
        length = max(len(ids) for ids in encoded)
        ids = np.full((len(encoded), length), vocab.bos_id, dtype=np.int64)
        for i, row_ids in enumerate(encoded):
            ids[i, :len(row_ids)] = row_ids
        mask = np.arange(length)[None, :] < np.array([len(r) for r in encoded])[:, None]
        ends = np.cumsum(vocab.lengths[ids] * mask, axis=1) - 1
        if not (ends[:, -1] == width - 1).all():
            raise RuntimeError(f"{self.name}: a window's tokens do not cover its {width} bytes (tokenization is not lossless)")
        device = windows.device
        return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device), torch.from_numpy(ends).to(device)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, W) bytes -> (B, W) NLL in nats: each token's NLL on its last byte, 0 elsewhere."""
        ids, mask, ends = self.tokenize(windows)
        inputs = F.pad(ids[:, :-1], (1, 0), value=self.vocabulary().bos_id)  # (B, T): BOS, t_1 .. t_{T-1}
        logits = self.logits(inputs)  # (B, T, V)
        nll = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none") * mask  # (B, T)
        return torch.zeros(windows.shape, dtype=nll.dtype, device=nll.device).scatter_add_(1, ends, nll)

    def audit_stable_prefix(self, original: bytes, perturbed: bytes) -> int:
        """Bytes covered by the tokens before the first token that differs between the two
        tokenizations: their predictions see identical inputs (BOS + the same tokens)."""
        vocab = self.vocabulary()
        a, b = vocab.encode([original, perturbed])
        stable = 0
        for x, y in zip(a, b):
            if x != y:
                break
            stable += int(vocab.lengths[x])
        return stable

    # --- FLOPs -----------------------------------------------------------------------
    def sequence_flops(self, tokens: float) -> dict[str, float]:
        """Forward FLOPs of one sequence of `tokens` positions: Transformer and head."""
        c = self.config
        body = flops.transformer(tokens, c.d_model, c.n_layers, c.mlp_ratio, c.attn_window)
        head = flops.linear(tokens, c.d_model, c.vocab_size)
        return {"transformer": body, "head": head, "total": body + head}

    def tokens_per_window(self, window: int) -> float:
        """Expected positions run for a window of `window` bytes (see the module note);
        before prepare(), one per byte (the upper bound)."""
        state = self.tokenizer_state
        if not state:
            return float(window)
        return min(float(window), window / state["bytes_per_token"] + state["edge_tokens"])

    def flops_per_byte(self, window: int) -> dict[str, float]:
        per_sequence = self.sequence_flops(self.tokens_per_window(window))
        return {key: value / window for key, value in per_sequence.items()}

    # --- metrics for the report's tokenizer table ----------------------------------
    def tokenizer_metrics(self, test: bytes, window: int | None = None) -> dict:
        return tokenizer_metrics(self, test, window)


def _read_cache(path: Path) -> dict | None:
    """The cached tokenizer at `path`, or None to train it again (none, or damaged: read_cache_entry)."""
    entry = read_cache_entry(path)
    return entry if entry is not None and "tokenizer" in entry else None


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data) - size + 1, size)]


def _measure_rate(vocab: Vocabulary, train: bytes) -> dict:
    """bytes_per_token on long text and edge_tokens per window, from the token counts of
    windows of 64 bytes and of 8 KiB on (up to 512 KiB of) the training split:
    tokens(W) = W / bytes_per_token + edge_tokens."""
    sample = train[:MEASURE_BYTES]
    counts = {}
    for size in (SHORT_WINDOW, LONG_CHUNK):
        windows = _chunks(sample, size) or [sample]
        counts[size] = (sum(len(ids) for ids in vocab.encode(windows)) / len(windows), len(windows[0]))
    (short, short_len), (long, long_len) = counts[SHORT_WINDOW], counts[LONG_CHUNK]
    if long_len > short_len:
        per_byte = (long - short) / (long_len - short_len)
        edge = short - short_len * per_byte
    else:  # a split shorter than one short window
        per_byte, edge = short / short_len, 0.0
    per_byte = max(per_byte, 1e-6)
    return {"bytes_per_token": 1.0 / per_byte, "edge_tokens": max(edge, 0.0)}


RENYI_ALPHA = 2.5  # the order Zouhar et al. (2023), "Tokenization and the noiseless channel", found to track BLEU


def renyi_efficiency(counts: np.ndarray, vocab_size: int, alpha: float = RENYI_ALPHA) -> float:
    """Rényi entropy of order `alpha` of the token frequencies over log |V| (Zouhar et al. 2023), |V| the
    tokenizer's vocabulary: 1 when every entry is used equally often, lower as a few tokens dominate."""
    p = counts[counts > 0] / counts.sum()
    return float(np.log((p ** alpha).sum()) / (1 - alpha) / np.log(vocab_size))


def tokenizer_metrics(model: TokenLM, test: bytes, window: int | None = None, chunk: int = 65536) -> dict:
    """The tokenizer table's figures on the test split: vocabulary size, tokens and bytes per
    token (the split in `chunk`-byte pieces; also in `window`-byte windows, as scored, when
    given), the share of the vocabulary used, its Rényi efficiency, tokenizer training time and
    encoding throughput (best of 3 encodings of the split, harness byte handling included)."""
    vocab = model.vocabulary()
    pieces = [test[i:i + chunk] for i in range(0, len(test), chunk)]
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        encoded = vocab.encode(pieces)
        best = min(best, time.perf_counter() - started)
    tokens = sum(len(ids) for ids in encoded)
    used = len({i for ids in encoded for i in ids})
    metrics = {
        "tokenizer": model.name,
        "vocab_size": vocab.size,
        "tokens_test": tokens,
        "bytes_per_token_test": len(test) / max(tokens, 1),
        "vocab_used_test": used / vocab.size,
        "renyi_efficiency_test": renyi_efficiency(np.bincount([i for ids in encoded for i in ids], minlength=vocab.size),
                                                  vocab.size) if tokens else None,
        "tokenizer_train_seconds": model.tokenizer_state.get("train_seconds", 0.0),
        "encode_mb_per_s": len(test) / best / 1e6,
    }
    if window:
        windows = _chunks(test, window)
        if windows:
            metrics["bytes_per_token_test_windows"] = len(windows) * window / sum(len(ids) for ids in vocab.encode(windows))
    return metrics
