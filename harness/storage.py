"""Files the harness and adapters write: the per-user cache folder shared by everything the
harness caches (trained tokenizers, reference compressors; $HARNESS_CACHE_DIR if set, else
($XDG_CACHE_HOME or ~/.cache)/tokenizer-harness), and JSON written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """The cache folder for one kind of entry, e.g. cache_dir("tokenizers"); not created here."""
    if os.environ.get("HARNESS_CACHE_DIR"):
        return Path(os.environ["HARNESS_CACHE_DIR"]) / kind
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tokenizer-harness" / kind


def file_mode() -> int:
    """The mode a new file gets from open(): 0o666 less the umask (0o644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0o600; records are read like any other file
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
