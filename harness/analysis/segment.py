"""Where a trained model cuts bytes into units (tokens aside): its Adapter.segment hook run
over consecutive windows, the text with boundaries marked, and two pictures (the boundary
scores as a line over the bytes with the boundaries as ticks; the unit-length histogram).

The hook gives (scores (B, W) | None, starts (B, W) bool): scores[b, t] is the score the
model computed from bytes < t when deciding whether byte t starts a unit (None for rules
without a score), starts[b, t] whether it does (byte 0 of a window always does). The text
is cut into consecutive windows of the run's evaluation length (the tail is a shorter
window), each segmented from an empty context under the model's evaluation rule, exactly
as the evaluator scores it. Used by `harness segment` and by the report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.run.segmentation import Segmentation, segment_bytes  # noqa: F401  (the picture's input)

ROW_BYTES = 96  # bytes per row of the picture
PICTURE_BYTES = 16 * ROW_BYTES  # the picture shows the first bytes only; the histogram counts all


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


def segmentation_threshold(r) -> float | None:
    """The threshold a run's evaluation rule applies to its segment scores (r: its RunRecord), where it
    has one: a calibrated "threshold" (ByteFlow, unless it evaluates with the rolling rule) or the entropy
    patcher's global "theta" (the monotonic rule thresholds a difference of scores: none)."""
    if isinstance(r.calibration.get("threshold"), (int, float)) and r.model.config.get("eval_rule") != "rolling":
        return float(r.calibration["threshold"])
    facts = r.preparation.facts
    if isinstance(facts.get("theta"), (int, float)) and facts.get("entropy_rule", "global") == "global":
        return float(facts["theta"])
    return None


def plot_segmentation(seg: Segmentation, path: Path, title: str, threshold: float | None = None,
                      colour="tab:blue") -> None:
    """The bytes with chunk starts (red ticks) and window starts (dotted); the scores as a line where
    the rule has them, with its threshold (dashed) if given. Without scores there is no score axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(seg.text), PICTURE_BYTES)
    if n < len(seg.text):
        title = f"{title}: first {n} of {len(seg.text)} bytes"
    rows = (n + ROW_BYTES - 1) // ROW_BYTES
    fig, axes = plt.subplots(rows, 1, figsize=(14, 1.5 * rows + 0.6), squeeze=False)
    if seg.scores is None:
        threshold = None
    if seg.scores is not None:
        shown = np.append(seg.scores[:n], [] if threshold is None else [threshold])
        low, high = float(np.min(shown)), float(np.max(shown))
        pad = 0.05 * (high - low) or 1.0
        low, high = low - pad, high + pad
    else:
        low, high = 0.0, 1.0
    for r, ax in enumerate(axes[:, 0]):
        a, b = r * ROW_BYTES, min(n, (r + 1) * ROW_BYTES)
        x = np.arange(a, b)
        if seg.scores is not None:
            ax.plot(x, seg.scores[a:b], color=colour, linewidth=1)
        if threshold is not None:
            ax.axhline(threshold, color="0.3", linewidth=0.8, linestyle="--")
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
        if seg.scores is None:  # boundaries only: no score axis to show
            ax.set_yticks([])
    axes[0, 0].set_title(title + (f" (dashed: threshold {threshold:.4g})" if threshold is not None else ""), fontsize=9)
    if seg.scores is not None:
        fig.supylabel("score", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lengths(seg: Segmentation, path: Path, title: str) -> None:
    """The chunk-length histogram, its axis ending where 99.5% of the chunks are (the title says
    how many are longer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from harness.analysis.plotting import shown_length

    lengths = seg.lengths()
    limit = max(shown_length(np.bincount(lengths)), 2)
    longer = int((lengths > limit).sum())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths[lengths <= limit], bins=np.arange(0.5, limit + 1.5), color="tab:blue", edgecolor="white")
    ax.set_xlabel("chunk length (bytes)")
    ax.set_ylabel("chunks")
    tail = f"\n{longer} longer, up to {lengths.max()} bytes, not shown" if longer else ""
    ax.set_title(f"{title}: {len(lengths)} chunks, mean {lengths.mean():.2f} bytes{tail}", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
