"""`harness segment RUN_DIR --text FILE_OR_STRING`: where a trained chunking model cuts a text.

Prints the text with chunk boundaries marked and writes two PNGs: the model's boundary
scores as a line over the bytes with the boundaries as ticks, and the histogram of chunk
lengths. Works for any adapter with the hook

    segment(windows: LongTensor (B, W)) -> (scores: FloatTensor (B, W) | None, starts: BoolTensor (B, W))

where scores[b, t] is the score the model computed from bytes < t when deciding whether
byte t starts a chunk (None for rules without a score), and starts[b, t] says whether it
does (byte 0 of a window always does). The text is cut into consecutive windows of the
run's evaluation length (the tail is a shorter window), each segmented from an empty
context under the model's evaluation rule, exactly as the evaluator scores it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.errors import HarnessError

ROW_BYTES = 96  # bytes per row of the picture
PICTURE_BYTES = 16 * ROW_BYTES  # the picture shows the first bytes only; the histogram counts all


@dataclass
class Segmentation:
    text: bytes
    scores: np.ndarray | None  # (N,) float, or None
    starts: np.ndarray  # (N,) bool: byte i starts a chunk
    window: int

    def chunks(self) -> list[bytes]:
        cuts = np.flatnonzero(self.starts).tolist() + [len(self.text)]
        return [self.text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]

    def lengths(self) -> np.ndarray:
        return np.array([len(c) for c in self.chunks()])


def segment_bytes(model, text: bytes, window: int) -> Segmentation:
    """Run the adapter's segment hook over consecutive windows of `text`."""
    import torch

    hook = getattr(model, "segment", None)
    if hook is None:
        raise HarnessError(f"adapter {model.name!r} has no segment() hook (ByteFlow and the patchers have one)")
    if not text:
        raise HarnessError("segment: the text is empty")
    device = next(model.parameters()).device
    model.eval()
    scores, starts = [], []
    for begin in range(0, len(text), window):
        piece = torch.tensor(list(text[begin : begin + window]), dtype=torch.long, device=device)[None]
        s, b = hook(piece)
        starts.append(b[0].bool().cpu().numpy())
        scores.append(None if s is None else s[0].float().cpu().numpy())
    merged = None if any(s is None for s in scores) else np.concatenate(scores)
    return Segmentation(text=text, scores=merged, starts=np.concatenate(starts), window=window)


def marked_text(seg: Segmentation, marker: str = "|") -> str:
    """The text with `marker` before every chunk start but the first (invalid UTF-8 and
    characters cut by a boundary are shown as backslash escapes)."""
    return marker.join(c.decode("utf-8", errors="backslashreplace") for c in seg.chunks())


def _label(byte: int) -> str:
    if byte == 0x20:
        return "\u2423"  # open box for a space
    if byte == 0x0A:
        return "\u21b5"
    return chr(byte) if 0x21 <= byte < 0x7F else "\u00b7"


def plot_segmentation(seg: Segmentation, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(seg.text), PICTURE_BYTES)
    if n < len(seg.text):
        title = f"{title}: first {n} of {len(seg.text)} bytes"
    rows = (n + ROW_BYTES - 1) // ROW_BYTES
    fig, axes = plt.subplots(rows, 1, figsize=(14, 1.5 * rows + 0.6), squeeze=False)
    if seg.scores is not None:
        low, high = float(np.min(seg.scores)), float(np.max(seg.scores))
        pad = 0.05 * (high - low) or 1.0
        low, high = low - pad, high + pad
    else:
        low, high = 0.0, 1.0
    for r, ax in enumerate(axes[:, 0]):
        a, b = r * ROW_BYTES, min(n, (r + 1) * ROW_BYTES)
        x = np.arange(a, b)
        if seg.scores is not None:
            ax.plot(x, seg.scores[a:b], color="tab:blue", linewidth=1)
        starts = x[seg.starts[a:b]]
        ax.vlines(starts - 0.5, low, low + 0.25 * (high - low), color="tab:red", linewidth=1.2)
        windows = x[(x % seg.window) == 0]
        ax.vlines(windows - 0.5, low, high, color="0.6", linewidth=0.8, linestyles="dotted")
        ax.set_xlim(a - 0.5, a + ROW_BYTES - 0.5)
        ax.set_ylim(low, high)
        ax.set_xticks(x)
        ax.set_xticklabels([_label(v) for v in seg.text[a:b]], fontsize=6, family="monospace")
        ax.tick_params(axis="x", length=0, pad=1)
        ax.tick_params(axis="y", labelsize=6)
    axes[0, 0].set_title(title, fontsize=9)
    if seg.scores is not None:
        fig.supylabel("score", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lengths(seg: Segmentation, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = seg.lengths()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=np.arange(0.5, lengths.max() + 1.5), color="tab:blue", edgecolor="white")
    ax.set_xlabel("chunk length (bytes)")
    ax.set_ylabel("chunks")
    ax.set_title(f"{title}: {len(lengths)} chunks, mean {lengths.mean():.2f} bytes", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _split_text(run_dir: Path, record: dict, split: str) -> bytes:
    """The val/test/train split of the run's corpus, from the suite.json beside runs/."""
    from harness.core.suite import Suite, load_corpus

    suite_path = run_dir.parent.parent / "suite.json"
    if not suite_path.is_file():
        raise HarnessError(f"{suite_path}: not found; --split needs the suite results folder around the run")
    suite = Suite(**json.loads(suite_path.read_text())["suite"])
    splits = load_corpus(suite, record["corpus"]["label"])
    if splits.sha256 != record["corpus"]["sha256"]:
        raise HarnessError(f"{run_dir}: the corpus has changed since the run (sha256 {splits.sha256[:12]}, "
                           f"record {record['corpus']['sha256'][:12]})")
    return getattr(splits, split)


def run_segment(run_dir: str | Path, text: str | None = None, split: str | None = None, offset: int = 0,
                max_bytes: int = 1024, variant: str | None = None, window: int | None = None,
                output: str | Path | None = None, marker: str = "|") -> tuple[Segmentation, Path, Path]:
    from harness.core.records import read_record
    from harness.api.registry import load_checkpoint

    run_dir = Path(run_dir)
    record = read_record(run_dir / "record.json")
    if (text is None) == (split is None):
        raise HarnessError("segment: give exactly one of --text and --split")
    if offset < 0 or max_bytes < 1 or (window is not None and window < 1):
        raise HarnessError("segment: --offset must be >= 0, --max-bytes and --window >= 1")
    if split is not None:
        raw = _split_text(run_dir, record, split)[offset : offset + max_bytes]
    else:
        path = Path(text)
        raw = (path.read_bytes() if path.is_file() else text.encode("utf-8"))[offset : offset + max_bytes]
    model = load_checkpoint(run_dir)
    if variant is not None:
        model.set_eval_variant(variant)
    seg = segment_bytes(model, raw, window or record["eval"]["window"])
    picture = Path(output) if output else run_dir / "segment.png"
    picture.parent.mkdir(parents=True, exist_ok=True)
    histogram = picture.with_name(picture.stem + "_chunk_lengths.png")
    rule = f", variant {variant}" if variant else ""
    title = f"{record['run_id']} ({record['model']['adapter']}{rule})"
    plot_segmentation(seg, picture, title)
    plot_lengths(seg, histogram, title)
    return seg, picture, histogram


def cmd_segment(args: argparse.Namespace) -> None:
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
    p.add_argument("run_dir", help="a run folder holding record.json and model.pt, e.g. results/smoke/runs/RUN_ID")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="a file to read, or else the text itself")
    source.add_argument("--split", choices=("train", "val", "test"), help="take the text from this split of the run's corpus")
    p.add_argument("--offset", type=int, default=0, help="first byte of the text or split to use (default 0)")
    p.add_argument("--max-bytes", type=int, default=1024, help="bytes to segment (default 1024)")
    p.add_argument("--variant", help="an evaluation variant of the adapter, e.g. topk for ByteFlow")
    p.add_argument("--window", type=int, help="bytes per window (default: the run's evaluation window)")
    p.add_argument("-o", "--output", help="PNG path (default RUN_DIR/segment.png); the histogram goes beside it")
    p.add_argument("--marker", default="|", help="boundary mark in the printed text (default |)")
    p.set_defaults(func=cmd_segment)
    return p
