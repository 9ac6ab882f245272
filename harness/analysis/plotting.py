"""What every PNG of a report shares: a headless backend, and one way to label and write a plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written on machines without a display
import matplotlib.pyplot as plt  # noqa: E402


def save_plot(fig, ax, xlabel: str, ylabel: str, title: str, path: Path, legend_size: int = 7) -> None:
    """Label, grid and legend an axis, then write the figure as PNG and close it."""
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
