"""`harness segment RUN_DIR (--text FILE_OR_STRING | --split SPLIT)`: where a trained model
with units (ByteFlow, the patchers, MegaByte, SpaceByte, H-Net) cuts a text: the text with
boundaries marked, and PNGs of the boundary scores and the unit lengths (harness.analysis.segment)."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import HarnessError

if TYPE_CHECKING:  # the modules below import torch and numpy: loaded when the command runs, not for --help
    from harness.analysis.segment import Segmentation
    from harness.run.records import RunRecord


def _split_text(run_dir: Path, record: RunRecord, split: str) -> bytes:
    """The val/test/train split of the run's corpus, from the suite.json beside runs/."""
    from harness.run.records import read_hashed_json
    from harness.run.spec import Suite, load_corpus

    suite_path = run_dir.parent.parent / "suite.json"
    if not suite_path.is_file():
        raise HarnessError(f"{suite_path}: not found; --split needs the suite results folder around the run")
    remedy = "run the suite again to rewrite it"
    try:
        suite = Suite(**read_hashed_json(suite_path, remedy)["suite"])
    except (ValueError, TypeError, KeyError):  # ValueError: also bad JSON and pydantic's ValidationError
        raise HarnessError(f"{suite_path}: not a valid suite summary ({remedy})") from None
    splits = load_corpus(suite, record.corpus.label)
    if splits.sha256 != record.corpus.sha256:
        raise HarnessError(f"{run_dir}: the corpus has changed since the run (sha256 {splits.sha256[:12]}, "
                           f"record {record.corpus.sha256[:12]})")
    return getattr(splits, split)


def run_segment(run_dir: str | Path, text: str | None = None, split: str | None = None, offset: int = 0,
                max_bytes: int = 1024, variant: str | None = None, window: int | None = None,
                output: str | Path | None = None, marker: str = "|") -> tuple[Segmentation, Path, Path]:
    from harness.analysis.segment import plot_lengths, plot_segmentation, segment_bytes, segmentation_threshold
    from harness.run.checkpoint import load_checkpoint
    from harness.run.records import read_record

    run_dir = Path(run_dir)
    record = read_record(run_dir / "record.json")
    if (text is None) == (split is None):
        raise HarnessError("segment: give exactly one of --text and --split")
    if offset < 0 or max_bytes < 1 or (window is not None and window < 1):
        raise HarnessError("segment: --offset must be >= 0, --max-bytes and --window >= 1")
    if split is not None:
        source, raw = split, _split_text(run_dir, record, split)[offset : offset + max_bytes]
    elif _names_a_file(text):
        source, raw = Path(text).stem, Path(text).read_bytes()[offset : offset + max_bytes]
    else:  # the bytes as given: argv that is not UTF-8 arrives as surrogates, which os.fsencode turns back
        given = os.fsencode(text)
        source = "text-" + hashlib.sha256(given).hexdigest()[:8]
        raw = given[offset : offset + max_bytes]
    model = load_checkpoint(run_dir)
    if variant is not None:
        model.set_eval_variant(variant)
    seg = segment_bytes(model, raw, window or record.eval.window)
    if seg is None:
        raise HarnessError(f"{run_dir}: adapter {record.model.adapter!r} does not cut bytes into units "
                           "(token models have no byte boundaries to show)")
    picture = Path(output) if output else run_dir / default_picture(source, offset, len(raw), variant, window)
    picture.parent.mkdir(parents=True, exist_ok=True)
    histogram = picture.with_name(picture.stem + "_chunk_lengths.png")
    rule = f", variant {variant}" if variant else ""
    title = f"{record.run_id} ({record.model.adapter}{rule})"
    threshold = segmentation_threshold(record) if variant is None and seg.scores is not None else None
    plot_segmentation(seg, picture, title, threshold=threshold)
    plot_lengths(seg, histogram, title)
    return seg, picture, histogram


def _names_a_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a long text is too long a file name; a NUL is none at all
        return False


def default_picture(source: str, offset: int, length: int, variant: str | None, window: int | None) -> str:
    """A PNG name that says what was segmented, so segmenting other text does not overwrite it, e.g.
    segment_test_0-1024.png, segment_notes_0-1024_topk_w64.png, segment_text-1a2b3c4d_0-52.png."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", source).strip("-") or "text"
    return (f"segment_{name}_{offset}-{offset + length}" + (f"_{variant}" if variant else "")
            + (f"_w{window}" if window else "") + ".png")


def cmd_segment(args: argparse.Namespace) -> None:
    import numpy as np

    from harness.analysis.segment import marked_text

    seg, picture, histogram = run_segment(args.run_dir, args.text, args.split, args.offset, args.max_bytes,
                                          args.variant, args.window, args.output, args.marker)
    lengths = seg.lengths()
    print(marked_text(seg, args.marker))
    print(f"\n{len(seg.text)} bytes, {len(lengths)} chunks, mean {lengths.mean():.2f} bytes, median "
          f"{np.median(lengths):.0f}, longest {lengths.max()} (windows of {seg.window} bytes)")
    print(f"wrote {picture} and {histogram}")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `segment` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "segment", help="show where a trained chunking model (ByteFlow, patchers) cuts a text",
        description="Print a text with the chunk boundaries of a trained run marked, and write a PNG with the "
                    "boundary scores as a line over the bytes and the boundaries as ticks (red), plus a chunk-length "
                    "histogram. The text is cut into windows of the run's evaluation length, each segmented from an "
                    "empty context with the model's evaluation rule.")
    p.add_argument("run_dir", help="a run folder holding record.json and model.safetensors, e.g. results/smoke/runs/RUN_ID")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="a file to read, or else the text itself")
    source.add_argument("--split", choices=("train", "val", "test"), help="take the text from this split of the run's corpus")
    p.add_argument("--offset", type=int, default=0, help="first byte of the text or split to use (default 0)")
    p.add_argument("--max-bytes", type=int, default=1024, help="bytes to segment (default 1024)")
    p.add_argument("--variant", help="an evaluation variant of the adapter, e.g. topk for ByteFlow")
    p.add_argument("--window", type=int, help="bytes per window (default: the run's evaluation window)")
    p.add_argument("-o", "--output", metavar="FILE.png",
                   help="where the picture goes; the histogram goes beside it as FILE_chunk_lengths.png (default: "
                        "RUN_DIR/segment_SOURCE_START-END.png, SOURCE the split, the file's name or text-HASH, with "
                        "_VARIANT and _wWINDOW when given, so another text or range does not overwrite it)")
    p.add_argument("--marker", default="|", help="boundary mark in the printed text (default |)")
    p.set_defaults(func=cmd_segment)
    return p
