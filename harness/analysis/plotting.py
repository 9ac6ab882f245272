"""What every PNG of a report shares: a headless backend, one colour per model, one way to label
and write a plot, and where a length distribution's axis ends."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # reports are written on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

SHOWN_SHARE = 0.995  # a length axis ends where this share of the units is


def model_colours(names) -> dict[str, tuple]:
    """One colour per model name, the same in every plot of a report: the names sorted, then
    matplotlib's tab10 (tab20 beyond ten models) in that order."""
    names = sorted(set(names))
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: palette(i % palette.N) for i, name in enumerate(names)}


def save_plot(fig, ax, xlabel: str, ylabel: str, title: str, path: Path, legend_size: int = 7,
              legend: bool = True) -> None:
    """Label, grid and legend an axis (the legend right of it, where it hides no point), then write
    the figure as PNG and close it."""
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=legend_size, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def shown_length(counts) -> int:
    """The length where the axis of a length distribution ends (counts[i]: units of i bytes): the
    shortest that covers SHOWN_SHARE of the units, so a long thin tail does not squeeze the rest."""
    cumulative = np.cumsum(np.asarray(counts, dtype=float))
    return int(np.searchsorted(cumulative, SHOWN_SHARE * cumulative[-1]))
