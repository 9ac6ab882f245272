"""Files the harness and adapters write: the per-user cache folder shared by everything the
harness caches (trained tokenizers, reference compressors; $HARNESS_CACHE_DIR if set, else
($XDG_CACHE_HOME or ~/.cache)/tokenizer-harness), JSON written atomically, and content hashes.

A file the harness writes and later reads gets its sha256 beside it, NAME.sha256, in the form
`sha256sum` writes (so `sha256sum -c NAME.sha256` checks it by hand too); before use,
file_damage() compares the two. The file is renamed into place between two writes of NAME.sha256:
the first lists the new hash next to the old one, the second the new one alone, so a process
killed at any moment leaves a file that matches its hash (a resumable state is never lost to a
kill -9 between the two files), while a file changed afterwards does not."""

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
    """`payload` as JSON at `path`, all or nothing; with `hashed`, its sha256 beside it."""
    write_text_atomic(path, json.dumps(payload, indent=1, sort_keys=False), hashed)


def write_text_atomic(path: Path, text: str, hashed: bool = False) -> None:
    """`text` at `path`, all or nothing; with `hashed`, its sha256 beside it."""
    temporary = _write_temporary(path, text)
    try:
        if hashed:
            replace_hashed(temporary, path)
        else:
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_temporary(path: Path, text: str) -> Path:
    """`text` in a new temporary file beside `path` (`.NAME.XXXX.tmp`), synced to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0o600; records are read like any other file
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return Path(temporary)


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


def replace_hashed(temporary: Path, path: Path) -> None:
    """Rename the finished file `temporary` to `path` and record its sha256 beside it; at every
    moment in between, the file at `path` matches a hash that NAME.sha256 lists."""
    new = file_sha256(temporary)
    _write_hashes(path, [new, *recorded_hashes(path)[:1]])
    os.replace(temporary, path)
    _write_hashes(path, [new])


def _write_hashes(path: Path, hashes: list[str]) -> None:
    listing = _write_temporary(hash_path(path), "".join(f"{h}  {path.name}\n" for h in hashes))
    os.replace(listing, hash_path(path))


def recorded_hashes(path: Path) -> list[str]:
    """The sha256 values NAME.sha256 lists for `path` (none if there is no such file)."""
    try:
        return [line.split()[0].lower() for line in hash_path(path).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def file_damage(path: Path) -> str | None:
    """Why the file at `path` is not the one the harness wrote, in words, or None: its sha256 is
    not one that NAME.sha256 lists, or that listing is unreadable. A file without a recorded hash
    (written before the harness kept them) passes; note_unhashed says so once it is used."""
    if not path.is_file() or not hash_path(path).exists():
        return None  # a missing file: reading it says so
    try:
        recorded = recorded_hashes(path)
    except (OSError, UnicodeDecodeError) as e:
        return f"its hash {hash_path(path).name} cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})"
    if not recorded or any(len(h) != 64 for h in recorded):
        return f"its hash {hash_path(path).name} is not a sha256"
    actual = file_sha256(path)
    if actual not in recorded:
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
