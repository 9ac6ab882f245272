"""The patch-size distribution of each patcher run, from its record (examples of patch
boundaries on text are drawn by harness.segment, like ByteFlow's chunks)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_patch_sizes(records: list[dict], path: Path) -> bool:
    """Fraction of patches of each size (bytes), one line per run that has a patch-size
    histogram (record["preparation"]["patch_size_counts"], measured on the training split).
    Returns False, drawing nothing, when no record has one."""
    runs = [r for r in records if r.get("preparation", {}).get("patch_size_counts")]
    if not runs:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        prep = r["preparation"]
        counts = prep["patch_size_counts"]
        total = sum(counts)
        sizes = range(1, len(counts) + 1)
        label = f"{r['model']['name']} ({prep.get('patcher', '?')}, mean {prep['avg_patch_size']:.2f} B)"
        ax.plot(sizes, [c / total for c in counts], marker="o", markersize=3, linewidth=1, label=label)
    ax.set_xlabel("patch size (bytes)")
    ax.set_ylabel("fraction of patches")
    ax.set_title("patch sizes on the training split")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
