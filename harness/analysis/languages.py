"""Per-language results on a parallel corpus (harness/run/parallel.py; docs/languages.md), read from
the records' `lang:CODE` test sets: test bpb, forward FLOPs per byte counted on each language's
windows, units per byte, and the premium of each language over English on the same messages;
each tokenizer's figures per language; a plot of bpb against cost per byte."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from harness.analysis import stats
from harness.analysis.plotting import model_colours, save_plot
from harness.analysis.tables import markdown
from harness.run.records import RunRecord, TestSet

REFERENCE = "en"  # premiums are relative to English, the catalogues' source language
LANGUAGE_MARKERS = "os^Dv*XP<>phd"  # one marker per language in the plot, in the corpus's order
PREFIX = "lang:"


def language_sets(record: RunRecord) -> dict[str, TestSet]:
    """Language code -> the record's test set of that language, in the corpus's order."""
    return {name.removeprefix(PREFIX): s for name, s in record.test_sets.items() if s.kind == "language"}


def _groups(records: list[RunRecord]) -> dict[tuple[float, str], list[RunRecord]]:
    """Runs with language sets, keyed by (budget, model name)."""
    groups: dict[tuple[float, str], list[RunRecord]] = {}
    for r in records:
        if language_sets(r):
            groups.setdefault((r.budget_flops, r.model.name), []).append(r)
    return groups


def _relative(runs: list[RunRecord], code: str, value) -> float:
    """Seed mean of value(language set) / value(English set); NaN without English."""
    ratios = [value(language_sets(r)[code]) / value(language_sets(r)[REFERENCE]) for r in runs
              if REFERENCE in language_sets(r) and value(language_sets(r)[REFERENCE])]
    return float(np.mean(ratios)) if ratios else float("nan")


def _bpb_interval(runs: list[RunRecord], code: str) -> tuple[float, float, float]:
    """Mean bpb with a 95% t interval over seeds, or a bootstrap over windows for one seed."""
    sets = [language_sets(r)[code] for r in runs]
    if len(sets) >= 2:
        return stats.seed_interval([s.bpb for s in sets])
    return stats.bootstrap_interval(stats.evaluation_window_bpb(sets[0]))


def language_table(records: list[RunRecord]) -> pd.DataFrame | None:
    """Per budget, model and language: test bpb (95% interval), forward FLOPs per byte and units
    per byte on its windows, and against English: units per byte, cost per byte, and the bytes
    of the same messages. None without language sets."""
    rows = []
    for (budget, model), runs in sorted(_groups(records).items()):
        for code in language_sets(runs[0]):
            mean, low, high = _bpb_interval(runs, code)
            sets = [language_sets(r)[code] for r in runs]
            rows.append({
                "budget": budget, "model": model, "language": code, "seeds": len(runs), "test bpb": mean,
                "95% CI": f"[{low:.4f}, {high:.4f}]", "_low": low, "_high": high,
                "fwd FLOPs/byte": float(np.mean([s.flops_per_byte for s in sets])),
                "units/byte": float(np.mean([s.units_per_byte for s in sets])),
                "units/byte vs en": _relative(runs, code, lambda s: s.units_per_byte),
                "FLOPs/byte vs en": _relative(runs, code, lambda s: s.flops_per_byte),
                "bytes vs en": _relative(runs, code, lambda s: s.text_bytes),
            })
    return pd.DataFrame(rows) if rows else None


def tokenizer_language_table(records: list[RunRecord]) -> pd.DataFrame | None:
    """Per tokenizer model (its first run) and language: bytes per token, the tokens for the same
    messages against English, fertility and Rényi efficiency on the language's whole test text."""
    rows, seen = [], set()
    for r in records:
        sets = language_sets(r)
        if r.model.name in seen or not any(s.tokenizer for s in sets.values()):
            continue
        seen.add(r.model.name)
        english = sets.get(REFERENCE)
        for code, s in sets.items():
            t = s.tokenizer
            rows.append({"model": r.model.name, "language": code, "bytes/token": t["bytes_per_token"],
                         "tokens vs en": t["tokens"] / english.tokenizer["tokens"] if english else float("nan"),
                         "fertility": t["fertility"], "fertility per": t["fertility_per"],
                         "Rényi efficiency": t["renyi_efficiency"]})
    return pd.DataFrame(rows) if rows else None


def plot_bpb_against_language_cost(table: pd.DataFrame, budget: float, path: Path,
                                   colours: dict[str, tuple] | None = None) -> None:
    """Test bpb (95% intervals) against forward FLOPs per byte at one budget: a point per model and
    language, the colour the model, the marker the language (each with a legend of its own)."""
    table = table[table["budget"] == budget]
    colours = colours or model_colours(table["model"])
    languages = list(dict.fromkeys(table["language"]))
    markers = {code: LANGUAGE_MARKERS[i % len(LANGUAGE_MARKERS)] for i, code in enumerate(languages)}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for _, row in table.iterrows():
        ax.errorbar([row["fwd FLOPs/byte"]], [row["test bpb"]], marker=markers[row["language"]], markersize=6,
                    yerr=[[row["test bpb"] - row["_low"]], [row["_high"] - row["test bpb"]]], capsize=2,
                    linewidth=0.8, color=colours[row["model"]], linestyle="none")
    handles = [Line2D([], [], marker=markers[c], color="0.35", linestyle="none", label=c) for c in languages]
    ax.add_artist(ax.legend(handles=handles, title="language", fontsize=7, title_fontsize=7, loc="lower left",
                            bbox_to_anchor=(1.01, 0), borderaxespad=0))
    for model in dict.fromkeys(table["model"]):
        ax.plot([], [], color=colours[model], linewidth=3, label=model)
    if table["fwd FLOPs/byte"].max() > 3 * table["fwd FLOPs/byte"].min():
        ax.set_xscale("log")
    save_plot(fig, ax, "forward FLOPs per byte on the language's test windows", "test bits per byte",
              f"test bpb against cost per byte, per language, at {budget:.3g} FLOPs", path)


def language_section(label: str, records: list[RunRecord], plot_dir: Path,
                     colours: dict[str, tuple] | None = None) -> list[str]:
    """The report's per-language section for one corpus; empty without language sets."""
    table = language_table(records)
    if table is None:
        return []
    lines = ["### Languages (parallel test text)", "",
             "Each language's test text holds the translations of the same messages; every model trained once on "
             "the corpus's mix and scored each language's windows on its own. FLOPs/byte is the forward cost counted on "
             "those windows, units/byte the model positions (tokens, patches, chunks; 1 for bytes) per scored byte. "
             "The premium columns divide by the same model's English figure (seed means of the per-seed ratios): "
             "units/byte and FLOPs/byte per byte of text, and `bytes vs en` the bytes the language needs for the same "
             "messages, so a token model's tokens for the same content against English are units/byte vs en x bytes "
             "vs en. bpb is per byte of each language's own text; intervals are 95% t over seeds, or a bootstrap over "
             "windows for one seed.", "",
             markdown(table.drop(columns=["_low", "_high"])), ""]
    tokenizers = tokenizer_language_table(records)
    if tokenizers is not None:
        lines += ["Tokenizers per language, on each language's whole test text: bytes per token; the tokens for the "
                  "same messages against English (the tokenization premium); fertility, tokens per whitespace-separated "
                  "word, or per character (whitespace left out) for languages written without spaces; Rényi efficiency "
                  "of order 2.5 of the token frequencies over log |V| (Zouhar et al. 2023).", "",
                  markdown(tokenizers), ""]
    for budget in sorted(table["budget"].unique()):
        name = f"languages_{label}_{budget:.2e}.png".replace("+", "")
        plot_bpb_against_language_cost(table, budget, plot_dir / name, colours)
        lines += [f"![test bpb against cost per byte per language at {budget:.3g} FLOPs](plots/{name})", ""]
    return lines
