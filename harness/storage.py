"""Files the harness and adapters write: the per-user cache folder shared by everything the
harness caches (trained tokenizers, reference compressors; $HARNESS_CACHE_DIR if set, else
($XDG_CACHE_HOME or ~/.cache)/tokenizer-harness), JSON written atomically, and content hashes.

A file the harness writes and later reads gets its sha256 beside it, NAME.sha256, in the form
`sha256sum` writes (so `sha256sum -c NAME.sha256` checks it by hand too), written after the file;
before use, file_damage() compares the two. A crash between the two writes leaves a mismatch, never
a file taken for another one: what it guards then fails safe (rebuilt, or refused)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable


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


def write_json_atomic(path: Path, payload: dict, hashed: bool = False) -> None:
    """`payload` as JSON at `path`, all or nothing; with `hashed`, its sha256 beside it (record_hash)."""
    write_text_atomic(path, json.dumps(payload, indent=1, sort_keys=False))
    if hashed:
        record_hash(path)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0o600; records are read like any other file
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ---- content hashes ------------------------------------------------------------------------------

def hash_path(path: Path) -> Path:
    """Where the sha256 of `path` is kept: NAME.sha256 beside it."""
    return path.with_name(path.name + ".sha256")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_hash(path: Path) -> None:
    """Write the sha256 of the file just written at `path` beside it (NAME.sha256)."""
    write_text_atomic(hash_path(path), f"{file_sha256(path)}  {path.name}\n")


def file_damage(path: Path) -> str | None:
    """Why the file at `path` is not the one the harness wrote, in words, or None: its sha256
    differs from the one recorded beside it, or that record is unreadable. A file without a
    recorded hash (written before the harness kept them) passes; note_unhashed says so once used."""
    if not path.is_file():
        return None  # nothing to compare; reading it says what is missing
    try:
        recorded = hash_path(path).read_text().split()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        return f"its hash {hash_path(path).name} cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})"
    if not recorded or len(recorded[0]) != 64:
        return f"its hash {hash_path(path).name} is not a sha256"
    actual = file_sha256(path)
    if actual != recorded[0].lower():
        return (f"its sha256 {actual[:12]} is not the {recorded[0][:12]} recorded in {hash_path(path).name} "
                "when it was written (the file was changed or damaged since)")
    return None


_unhashed_noted = False


def note_unhashed(path: Path) -> None:
    """For a file just used: if it has no recorded hash, say so on stderr, once per process."""
    global _unhashed_noted
    if not _unhashed_noted and not hash_path(path).exists():
        _unhashed_noted = True
        print(f"harness: note: {path} has no {hash_path(path).name} beside it (written before the harness kept "
              "hashes); it and any others like it are used unchecked", file=sys.stderr)


def remove_hashed(path: Path) -> None:
    """Delete a file and its recorded hash."""
    path.unlink(missing_ok=True)
    hash_path(path).unlink(missing_ok=True)


def read_cache_entry(path: Path, log: Callable[[str], None] | None = None) -> dict | None:
    """The JSON object cached at `path` (written with write_json_atomic(..., hashed=True)), or None
    to rebuild it: when there is none, or it is not the file that was written (its hash differs)
    or not a JSON object; those two are said in one warning line (to `log`, else stderr), and the
    rebuilt entry overwrites the file."""
    if not path.is_file():
        return None
    entry, problem = json_object(path)
    if problem is not None:
        (log or _warn)(f"warning: {path}: {problem}; rebuilding it")
    else:
        note_unhashed(path)
    return entry


def json_object(path: Path) -> tuple[dict | None, str | None]:
    """(the JSON object at `path`, None), or (None, what is wrong with the file): its hash differs
    from the one recorded beside it, it cannot be read, or it is not a JSON object."""
    problem = file_damage(path)
    if problem is not None:
        return None, problem
    try:
        entry = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None, "not found"
    except OSError as e:
        return None, f"cannot be read ({e.strerror})"
    except ValueError:  # also UnicodeDecodeError
        return None, "not valid JSON"
    return (entry, None) if isinstance(entry, dict) else (None, "not a JSON object")


def _warn(line: str) -> None:
    print(f"harness: {line}", file=sys.stderr)
