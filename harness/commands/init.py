"""`harness init TEXT_FILE [-o SUITE.yaml]`: write a commented minimal suite for one text file:
raw bytes against BPE, the split sized to the file, a budget that trains in about a minute on
2 CPU cores. Every key a suite needs is in it, each with a comment."""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
from pathlib import Path

from harness.errors import HarnessError

WINDOW = 128  # bytes per training and evaluation window, as in suites/smoke.yaml
BATCH_WINDOWS = 16
MIN_BYTES = 16_384  # below this the held-out splits hold too few windows to score
MAX_HELD_OUT = 16_384  # bytes of val and of test: 128 windows each, at most 64 of them scored
MAX_TRAIN = 1_000_000  # more only slows the tokenizer and the primed compressors, not the budget
BUDGET = 5e11  # training FLOPs per run: the whole suite in about a minute on 2 CPU cores

TEMPLATE = """\
# A minimal suite written by `harness init {source}` for {file_bytes:,} bytes of text.
# Run it with `harness run {suite_path}`, then `harness report results/{name}`.
# Every key below is required unless its comment says "optional"; the README ("Suites") shows the others.

# the results folder's name (results/{name}/) and the suite's title in the report
name: {name}
# optional: one line for the report
description: Raw bytes against BPE on {source_name}, tiny models, one budget, one seed.
# the text: a file or a glob of .txt / .jsonl files, relative to this suite file
corpus: {{files: {files}}}
# bytes of the text for training, validation and test, taken in that order from its start;
# together at most the file's {file_bytes:,} bytes
split: {{train_bytes: {train}, val_bytes: {held_out}, test_bytes: {held_out}}}
# window: bytes per training and test window, each scored from an empty context;
# max_windows (optional): test and validation windows scored; batch_windows (optional): windows per forward pass
eval: {{window: {window}, max_windows: 64, batch_windows: 32}}
# training FLOPs per run, the same for every model (a multiply-add is 2; training = 3 x forward).
# At {budget:.2g} the whole suite runs in about a minute on 2 free CPU cores (longer on cores other jobs share);
# training time grows with the budget, and a budget that sees more bytes than train_bytes repeats them (a warning says so)
budgets: [{budget:.2e}]
# optional: one run per seed (default [0]); several seeds give the report its intervals
seeds: [0]
# optional: the optimizer (AdamW, cosine schedule); batch_windows windows of {window} bytes per step
trainer: {{batch_windows: {batch_windows}, lr: 3.0e-3, warmup_fraction: 0.05, log_every: 5}}
# the models: a name for the tables, an adapter (`harness list` shows them with their config fields) and its config
models:
  - name: bytes
    adapter: bytes
    config: {{d_model: 64, n_layers: 2, n_heads: 4}}
  - name: bpe
    adapter: bpe
    config: {{vocab_size: 512, d_model: 64, n_layers: 2, n_heads: 4}}
"""


def split_sizes(file_bytes: int) -> tuple[int, int]:
    """(train bytes, val = test bytes) for a file of this size: a tenth of it held out twice, in whole
    windows, up to MAX_HELD_OUT each; the rest for training, up to MAX_TRAIN."""
    held_out = min(MAX_HELD_OUT, file_bytes // 10) // WINDOW * WINDOW
    return min(file_bytes - 2 * held_out, MAX_TRAIN), held_out


def suite_name(text_file: Path) -> str:
    """The file's stem as a suite name (letters, digits, '.', '_' and '-'; not starting with '.' or '-')."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text_file.stem).strip("-.")
    return name or "my-text"


def write_suite(text_file: str | Path, output: str | Path | None = None, force: bool = False) -> Path:
    """Write the suite for text_file to `output` (default NAME.yaml in the current folder); returns its path."""
    text_file = Path(text_file)
    if not text_file.is_file():
        raise HarnessError(f"{text_file}: no such file")
    if text_file.suffix == ".jsonl":
        raise HarnessError(f"{text_file}: init takes a plain text file; for JSON lines write the suite's "
                           "`corpus: {files: ..., field: NAME}` by hand")
    size = text_file.stat().st_size
    if size < MIN_BYTES:
        raise HarnessError(f"{text_file}: {size:,} bytes is too small; init needs at least {MIN_BYTES:,} bytes of text")
    name = suite_name(text_file)
    out = Path(output) if output else Path(f"{name}.yaml")
    if out.exists() and not force:
        raise HarnessError(f"{out}: exists; pass --force to overwrite it, or -o to write elsewhere")
    train, held_out = split_sizes(size)
    files = glob.escape(  # the corpus is a glob; written as a JSON string, which YAML reads as a quoted one
        os.path.relpath(text_file.resolve(), out.resolve().parent))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(TEMPLATE.format(
        source=text_file, source_name=text_file.name, suite_path=out, name=name, file_bytes=size,
        files=json.dumps(files), train=train, held_out=held_out, window=WINDOW, budget=BUDGET,
        batch_windows=BATCH_WINDOWS))
    return out


def cmd_init(args: argparse.Namespace) -> None:
    out = write_suite(args.text_file, args.output, args.force)
    print(f"wrote {out}; next: harness run {out}")


def add_parser(subparsers) -> argparse.ArgumentParser:
    init = subparsers.add_parser(
        "init", help="write a commented minimal suite (bytes and BPE) for a text file",
        description="Write a suite file that compares raw bytes with BPE on TEXT_FILE: a `files:` corpus pointing at "
                    "it (relative to the suite file), a train / val / test split that fits its size, tiny models and "
                    "one budget that trains in about a minute on 2 CPU cores. Every required key is there, each with "
                    "a comment; edit it, then `harness run` it.",
        epilog="example: harness init notes.txt -o notes.yaml && harness run notes.yaml")
    init.add_argument("text_file", help=f"a text file of at least {MIN_BYTES:,} bytes (read as raw bytes)")
    init.add_argument("-o", "--output", metavar="SUITE.yaml",
                      help="where to write the suite (default: NAME.yaml here, NAME from the text file's name)")
    init.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    init.set_defaults(func=cmd_init)
    return init
