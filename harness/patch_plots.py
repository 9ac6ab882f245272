"""Plots of patching (baselines/patcher.py): the patch-size distribution of each run,
from its record, and an example text with each patcher's patch boundaries marked."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

SHOWN = {0x20: "␣", 0x0A: "↵", 0x09: "⇥"}  # visible stand-ins; other non-printing bytes show as "·"
SHADES = ("#dbe9f6", "#fbe3c8")  # alternate patches


def byte_glyph(b: int) -> str:
    if b in SHOWN:
        return SHOWN[b]
    return chr(b) if 0x21 <= b <= 0x7E else "·"


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


@torch.no_grad()
def example_starts(models: dict[str, torch.nn.Module], text: bytes) -> dict[str, list[int]]:
    """Patch start positions of `text` (one window) under each model's patch_starts."""
    starts = {}
    for label, model in models.items():
        device = next(model.parameters()).device
        window = torch.tensor(list(text), dtype=torch.long, device=device)[None]
        starts[label] = model.eval().patch_starts(window)[0].nonzero().flatten().tolist()
    return starts


def plot_patch_boundaries(text: bytes, starts: dict[str, list[int]], path: Path, line_bytes: int = 64) -> None:
    """`text` drawn once per patcher (label -> patch start positions), one cell per byte,
    patches shaded alternately with a bar before each patch start; space, newline and tab
    show as ␣ ↵ ⇥, other non-printing bytes as ·."""
    rows = -(-len(text) // line_bytes)
    panel = rows + 1.6  # rows of text plus the title line
    fig, ax = plt.subplots(figsize=(0.14 * line_bytes + 0.6, 0.3 * panel * len(starts) + 0.3))
    y = 0.0
    for label, positions in starts.items():
        ax.text(0, y - 0.6, f"{label}: {len(positions)} patches, {len(text) / max(1, len(positions)):.2f} bytes/patch",
                fontsize=8, fontweight="bold", va="center")
        patch = torch.zeros(len(text), dtype=torch.long)
        patch[[p for p in positions if p < len(text)]] = 1
        patch = (patch.cumsum(0) - 1).tolist()
        starting = set(positions)
        for i, b in enumerate(text):
            col, row = i % line_bytes, i // line_bytes
            ax.add_patch(Rectangle((col, y + row), 1, 1, facecolor=SHADES[patch[i] % 2], edgecolor="none"))
            ax.text(col + 0.5, y + row + 0.5, byte_glyph(b), fontsize=7, family="DejaVu Sans Mono", ha="center", va="center")
            if i in starting:
                ax.plot([col, col], [y + row, y + row + 1], color="#b2182b", linewidth=1.2)
        y += panel
    ax.set_xlim(-0.5, line_bytes + 0.5)
    ax.set_ylim(y - 0.5, -1.2)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
