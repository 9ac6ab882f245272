"""Corpora, splits and windows. Bytes in, bytes out: nothing is decoded or normalised.

Corpus sources:
- embedded: text that ships with every Python installation, no download.
    `pydoc-topics`: the pydoc topic help texts (English prose, about 460 kB),
    `stdlib-code`: the standard library's .py files (Python source, tens of MB),
    `stdlib-docstrings`: the docstrings of those files (English prose, about 1.8 MB);
- local files: a path or glob of `.txt` (raw bytes) or `.jsonl` (one JSON object
  per line; the `field` string of each, UTF-8 encoded) files, documents joined
  by a blank line, in sorted path order;
- a URL with a pinned sha256, cached in a directory (optionally one member of a
  zip archive); `enwik8` and `text8` are presets of this kind;
- a Hugging Face dataset (`hf_corpus`): a Hub name or a local folder / data file, one split,
  the `field` column of each row (UTF-8 encoded) as a document, read streaming and only as
  far as the split sizes need; a Hub dataset's revision is resolved to its commit, which
  the corpus id records;
- a parallel corpus: the same messages in several languages, from the translation catalogues
  of the `django` package (harness/run/parallel.py), split by message rather than by bytes.

A corpus is identified by its name plus the sha256 of the bytes used. Other splits are
contiguous and by bytes: train = the first train_bytes, then val, then test.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import io
import json
import os
import sysconfig
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.errors import HarnessError
from harness.modeling.windows import byte_windows, to_tensor, windows  # noqa: F401  (the run floor's windows)

EMBEDDED = ("pydoc-topics", "stdlib-code", "stdlib-docstrings")
DOCUMENT_SEPARATOR = b"\n\n"

# Preset downloads: the sha256 pins the extracted member, which is what is used.
PRESETS = {
    "enwik8": {"url": "http://mattmahoney.net/dc/enwik8.zip", "member": "enwik8", "sha256": "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"},
    "text8": {"url": "http://mattmahoney.net/dc/text8.zip", "member": "text8", "sha256": "6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7"},
}


class CorpusError(HarnessError):
    """A corpus that cannot be read; `key` is the corpus key at fault (files, field, url, sha256,
    member), so that the suite can name it (harness.run.spec.load_corpus)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Splits:
    corpus_id: str
    sha256: str  # of train + val + test, in that order
    train: bytes
    val: bytes
    test: bytes
    # a parallel corpus's test messages in each language (harness/run/parallel.py); else empty
    test_languages: dict[str, bytes] = field(default_factory=dict)


def embedded_corpus(name: str, limit: int) -> bytes:
    """The first `limit` bytes of an embedded corpus (all of it if shorter)."""
    if name == "pydoc-topics":
        from pydoc_data.topics import topics

        text = DOCUMENT_SEPARATOR.join(topics[key].encode("utf-8") for key in sorted(topics))
        return text[:limit]
    if name in ("stdlib-code", "stdlib-docstrings"):
        pieces, size = [], 0
        for data in (_stdlib_sources() if name == "stdlib-code" else _stdlib_docstrings()):
            pieces.append(data)
            size += len(data) + len(DOCUMENT_SEPARATOR)
            if size >= limit:
                break
        return DOCUMENT_SEPARATOR.join(pieces)[:limit]
    raise HarnessError(f"unknown embedded corpus {name!r} (known: {', '.join(EMBEDDED)})")



def _stdlib_sources():
    """The standard library's .py files (tests and site-packages left out), in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        if "site-packages" not in path.parts and "test" not in path.relative_to(root).parts[:1]:
            yield path.read_bytes()


def _stdlib_docstrings():
    """The docstrings of those files (module, class, function; indentation cleaned), file by file
    in source order: prose written by many hands, several times the pydoc topics."""
    for source in _stdlib_sources():
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):  # a file this Python cannot parse (none today) is left out
            continue
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in sorted(nodes, key=lambda n: getattr(n, "lineno", 0)):
            text = ast.get_docstring(node, clean=True)
            if text:
                yield text.encode("utf-8", "surrogateescape")

def files_corpus(pattern: str, field: str, limit: int) -> bytes:
    matches = sorted(glob.glob(pattern, recursive=True))
    paths = [p for p in matches if not os.path.isdir(p)]
    if not paths and matches:
        raise CorpusError("files", f"{pattern!r} matches only folders; name the files, e.g. "
                                   f"'{os.path.join(matches[0], '*.txt')}'")
    if not paths:
        raise CorpusError("files", f"no file matches {pattern!r}")
    documents, size = [], 0
    for path in paths:
        for doc in _read_documents(Path(path), field):
            documents.append(doc)
            size += len(doc) + len(DOCUMENT_SEPARATOR)
        if size >= limit:
            break
    return DOCUMENT_SEPARATOR.join(documents)[:limit]


def _read_documents(path: Path, field: str) -> list[bytes]:
    try:
        content = path.read_bytes()
    except OSError as e:
        raise CorpusError("files", f"{path}: cannot be read ({e.strerror})") from None
    if path.suffix == ".jsonl":
        docs = []
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError("files", f"{path}:{number}: not valid JSON ({e.msg})") from None
            except UnicodeDecodeError as e:  # JSON is text; the raw bytes of a .txt file need not be
                raise CorpusError("files", f"{path}:{number}: not UTF-8 (byte 0x{line[e.start]:02x}); JSON lines must "
                                           "be UTF-8 text (a .txt file is read as raw bytes)") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise CorpusError("field", f"{path}:{number}: no string field {field!r}")
            try:
                docs.append(obj[field].encode("utf-8"))
            except UnicodeEncodeError:  # a lone surrogate written as a \ud800 escape
                raise CorpusError("files", f"{path}:{number}: field {field!r} holds an unpaired surrogate escape, "
                                           "which is no text") from None
        return docs
    return [content]


def url_corpus(url: str, sha256: str, member: str | None, cache_dir: Path, limit: int) -> bytes:
    """Download once into cache_dir, check the pinned sha256 (of the member if given), return bytes."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{sha256}.bin"
    if not target.exists():
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                payload = response.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise CorpusError("url", f"{url}: download failed ({getattr(e, 'reason', None) or e})") from None
        if member is not None:
            try:
                payload = zipfile.ZipFile(io.BytesIO(payload)).read(member)
            except (zipfile.BadZipFile, KeyError) as e:
                reason = e.args[0] if isinstance(e, KeyError) and e.args else e
                raise CorpusError("member", f"cannot read {member!r} from {url} ({reason})") from None
        digest = hashlib.sha256(payload).hexdigest()
        if digest != sha256:
            raise CorpusError("sha256", f"{url}{f' member {member}' if member else ''} has sha256 {digest}, "
                                        f"not {sha256}")
        temporary = target.with_suffix(f".tmp{os.getpid()}")
        try:
            temporary.write_bytes(payload)
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    with open(target, "rb") as f:
        return f.read(limit)


HF_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}


def hf_corpus(name: str, config: str | None, split_name: str, revision: str | None, field: str,
              limit: int) -> tuple[str, bytes]:
    """(corpus id, the first `limit` bytes) of a Hugging Face dataset read through `datasets`, streaming:
    rows' `field` strings joined by a blank line. `name` is a Hub dataset or a local folder / data file
    (.parquet, .json, .jsonl, .csv, .txt). For a Hub dataset the revision (default: the main branch)
    is resolved to a commit, loaded pinned to it, and named in the id: hf:NAME@COMMIT[/CONFIG]:SPLIT.FIELD."""
    try:
        import datasets
    except ImportError:
        raise HarnessError("corpus hf: the `datasets` package is not installed (pip install datasets)") from None
    path = Path(name).expanduser()
    if path.is_file():
        builder = HF_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise HarnessError(f"corpus hf {name}: cannot read {path.suffix or 'this'} files "
                               f"(known: {', '.join(HF_FILE_BUILDERS)})")
        arguments, pinned = {"path": builder, "data_files": {split_name: str(path)}}, None
    elif path.is_dir():
        arguments, pinned = {"path": str(path), "name": config}, None
    else:
        pinned = _hub_commit(name, revision)
        arguments = {"path": name, "name": config, "revision": pinned}
    where = f"{name}@{pinned}" if pinned else name
    corpus_id = f"hf:{where}{f'/{config}' if config else ''}:{split_name}.{field}"
    try:
        rows = datasets.load_dataset(**arguments, split=split_name, streaming=True)
        # documents joined by the separator as they arrive, not kept in a list and joined at the end:
        # at a split of many GB that holds the text twice at most (here, then as bytes), not three times
        joined = bytearray()
        for number, row in enumerate(rows):
            text = row.get(field)
            if not isinstance(text, str):
                raise HarnessError(f"corpus {corpus_id}: row {number} has no string field {field!r} "
                                   f"(fields: {', '.join(map(str, row))})")
            if number:
                joined += DOCUMENT_SEPARATOR
            joined += text.encode("utf-8")
            if len(joined) + len(DOCUMENT_SEPARATOR) >= limit:
                break
    except HarnessError:
        raise
    except Exception as e:  # datasets raises many kinds (missing split, no network, bad files)
        raise HarnessError(f"corpus {corpus_id}: cannot load it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    del joined[limit:]
    return corpus_id, bytes(joined)


def _hub_commit(name: str, revision: str | None) -> str:
    """The commit a Hub dataset's revision (None: the main branch) points at."""
    if revision is not None and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name, revision=revision).sha
    except Exception as e:
        raise HarnessError(f"corpus hf {name}: not a local path, and the Hub cannot resolve revision "
                           f"{revision or 'main'} ({type(e).__name__}); pass a commit as `revision:` to load a "
                           "cached copy offline") from None


def split(corpus_id: str, data: bytes, train_bytes: int, val_bytes: int, test_bytes: int) -> Splits:
    need = train_bytes + val_bytes + test_bytes
    if len(data) < need:
        raise HarnessError(f"corpus {corpus_id} has {len(data)} bytes; the split asks for {need}")
    data = data[:need]
    return Splits(
        corpus_id=corpus_id,
        sha256=hashlib.sha256(data).hexdigest(),
        train=data[:train_bytes],
        val=data[train_bytes : train_bytes + val_bytes],
        test=data[train_bytes + val_bytes :],
    )


class TrainStream:
    """Training batches, in one of two ways (TrainerSettings.sampling):
    - "windows": the train split cut into windows, shuffled anew each epoch with the seed;
    - "offsets": windows starting at random byte offsets, drawn with replacement (nanoGPT's
      sampler), so a window boundary falls anywhere and each step sees new contexts.
    The order depends only on (split, window, seed, sampling), so every model of a suite sees the
    same bytes in the same order."""

    def __init__(self, train: bytes, window: int, batch_windows: int, seed: int, sampling: str = "windows"):
        self.data = byte_windows(train, window)  # uint8: each batch is converted as it is drawn
        if len(self.data) < batch_windows:
            raise HarnessError(f"the train split holds {len(self.data)} windows of {window} bytes; a batch needs {batch_windows}")
        self.batch_windows, self.window, self.sampling = batch_windows, window, sampling
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        if sampling == "offsets":
            self._bytes = byte_windows(train, len(train))[0]  # the whole split as one uint8 row
            self._order = torch.zeros(0, dtype=torch.long)
        else:
            self._order = torch.randperm(len(self.data), generator=self.generator)
        self._cursor = 0

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self._order, "cursor": self._cursor, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._order, self._cursor, self.epoch = state["order"], state["cursor"], state["epoch"]

    @property
    def windows_per_epoch(self) -> int:
        return len(self.data)

    def next_batch(self) -> torch.Tensor:
        if self.sampling == "offsets":
            starts = torch.randint(len(self._bytes) - self.window + 1, (self.batch_windows,), generator=self.generator)
            return self._bytes[starts[:, None] + torch.arange(self.window)].long()
        if self._cursor + self.batch_windows > len(self._order):
            self.epoch += 1
            self._order = torch.randperm(len(self.data), generator=self.generator)
            self._cursor = 0
        index = self._order[self._cursor : self._cursor + self.batch_windows]
        self._cursor += self.batch_windows
        return self.data[index].long()
