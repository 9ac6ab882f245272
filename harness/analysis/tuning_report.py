"""The report's tuning section, from RESULTS/SUITE/tuning.json (harness.orchestrate.tuning): per model
the trials' validation bpb against lr, the chosen settings, and the gap to the untuned ones."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from harness.analysis.plotting import model_colours, save_plot
from harness.analysis.tables import markdown as _markdown
from harness.errors import HarnessError
from harness.run.records import read_hashed_json


def tuning_table(entries: list[dict]) -> pd.DataFrame:
    rows = []
    for e in entries:
        untuned = [t for t in e["trials"] if all(t.get(k) == v for k, v in e["untuned"].items())]
        gap = untuned[0]["val_bpb"] - e["val_bpb"] if untuned else None
        rows.append({
            "corpus": e["corpus"], "model": e["model"], "budget": e["budget"],
            "lr tried": " ".join(f"{t['lr']:.2g}" for t in e["trials"]),
            "confirmed (val bpb, seeds)": " ".join(f"{t['lr']:.2g} ({t['val_bpb']:.4f}, {len(t['run_ids'])})"
                                                   for t in e["trials"] if t.get("confirmed")) or "-",
            "chosen": ", ".join(f"{k} {v:.3g}" for k, v in e["chosen"].items()),
            "val bpb": round(e["val_bpb"], 4), "extensions": e["extensions"],
            "untuned": ", ".join(f"{k} {v:.3g}" for k, v in e["untuned"].items()),
            "untuned - tuned val bpb": "not tried" if gap is None else round(gap, 4),
        })
    return pd.DataFrame(rows)


def plot_val_against_lr(entries: list[dict], path: Path, title: str, colours: dict[str, tuple] | None = None) -> None:
    colours = colours or model_colours(e["model"] for e in entries)
    fig, ax = plt.subplots(figsize=(6, 4))
    for e in sorted(entries, key=lambda e: e["model"]):
        trials = sorted(e["trials"], key=lambda t: t["lr"])
        colour = colours[e["model"]]
        ax.plot([t["lr"] for t in trials], [t["val_bpb"] for t in trials], marker="o", label=e["model"], color=colour)
        ax.plot([e["chosen"]["lr"]], [e["val_bpb"]], marker="*", markersize=12, color=colour)
    ax.set_xscale("log")
    save_plot(fig, ax, "peak learning rate", "validation bpb (mean over tuning seeds)", title, path)


def drift_lines(entries: list[dict]) -> list[str]:
    """Where a model was tuned at several budgets: how its chosen lr moves with the budget."""
    lines = []
    for corpus, model in sorted({(e["corpus"], e["model"]) for e in entries}):
        mine = sorted((e for e in entries if (e["corpus"], e["model"]) == (corpus, model)), key=lambda e: e["budget"])
        if len(mine) > 1:
            steps = " -> ".join(f"{e['chosen']['lr']:.2g} at {e['budget']:.2e}" for e in mine)
            lines.append(f"- {corpus} {model}: chosen lr {steps} FLOPs")
    return lines


def tuning_section(results_dir: Path, plot_dir: Path, colours: dict[str, tuple] | None = None,
                   taken: int = 0) -> list[str]:
    """Markdown lines of the tuning section; none when the suite was not tuned, or (with a warning)
    when tuning.json is damaged. `taken`: how many of the suite's runs were taken from their trials."""
    path = results_dir / "tuning.json"
    if not path.exists():
        return []
    left_out = "the tuning section is left out (`harness run` on the suite writes it again)"
    try:
        tuning = read_hashed_json(path, left_out)
        if not isinstance(tuning.get("entries"), list):
            raise HarnessError(f"{path}: not a tuning file (no entries); {left_out}")
    except HarnessError as e:
        print(f"harness: warning: {e}", file=sys.stderr)
        return []
    entries = tuning["entries"]
    seeds = sorted({s for e in entries for s in e["seeds"]})
    confirm = sorted({s for e in entries for s in e.get("confirm_seeds", [])})
    again = (f"; the best values of each search were trained again on seeds {confirm} and the best mean over all "
             "seeds won (the confirmed column)") if confirm else ""
    lines = ["## Tuning", "",
             f"Each model's learning rate was chosen on **validation** bpb (mean over seeds {seeds}{again}; test bpb "
             "is never read), as the best of a grid that is extended past its edge until the optimum is bracketed. "
             "Every trial is a run under `tuning/runs/`; each run of this suite trains with the choice at the "
             "tuning budget nearest its own and records which trials chose it. The last column is the validation "
             "gain of tuning at the tuning budget, where the untuned setting was among the trials.", "",
             _markdown(tuning_table(entries)), ""]
    if taken:
        lines += [f"{taken} of the suite's runs are tuning trials (the chosen settings on a tuning budget and seed the "
                  "suite runs: the same config hash), recorded from them rather than trained again; their records "
                  "name the trial (`trained_as`).", ""]
    for corpus in sorted({e["corpus"] for e in entries}):
        for budget in sorted({e["budget"] for e in entries if e["corpus"] == corpus}):
            name = f"tuning_{corpus}_{budget:.2e}.png".replace("+", "")
            plot_val_against_lr([e for e in entries if e["corpus"] == corpus and e["budget"] == budget],
                                plot_dir / name, f"{corpus}, {budget:.2e} FLOPs: validation bpb against lr", colours)
            lines += [f"![validation bpb against lr ({corpus}, {budget:.2e} FLOPs; a star marks the choice)]"
                      f"(plots/{name})", ""]
    drift = drift_lines(entries)
    if drift:
        lines += ["How the chosen lr drifts with the budget:", "", *drift, ""]
    return lines
