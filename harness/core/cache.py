"""The per-user cache folder shared by everything the harness caches (trained tokenizers,
reference compressors): $HARNESS_CACHE_DIR if set, else ($XDG_CACHE_HOME or ~/.cache)/tokenizer-harness."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """The cache folder for one kind of entry, e.g. cache_dir("tokenizers"); not created here."""
    if os.environ.get("HARNESS_CACHE_DIR"):
        return Path(os.environ["HARNESS_CACHE_DIR"]) / kind
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tokenizer-harness" / kind
