"""Factor effects from a suite's records (suite `factors`, README "Factors"): per budget, model and
factor, each level against the base level, paired by seed. A pair is two rows of one model at one
budget that differ only in that factor's level (the other factors at the same levels), trained on
the same seed; the effect is the mean of the per-seed differences in test bpb, with a 95% Student-t
interval and the p of a paired t-test over those seeds."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from harness.analysis import stats
from harness.analysis.tables import markdown
from harness.run.records import RunRecord


def base_levels(spec: dict) -> dict[str, str]:
    """Factor -> its base level (declared, else the first), from the suite as run (suite.json)."""
    return {name: factor.get("base") or next(iter(factor["levels"])) for name, factor in (spec.get("factors") or {}).items()}


def model_of(row: str) -> str:
    """The model a row crosses with factor levels: `bytes` for `bytes+hash=on` (model names have no '+')."""
    return row.split("+")[0]


def paired_effect(base: dict[int, float], level: dict[int, float]) -> dict:
    """The effect level - base over the seeds both have: mean difference, 95% t-interval, paired
    t-test p (NaN interval and p for a single seed), n seeds and the two means."""
    seeds = sorted(base.keys() & level.keys())
    b, l = np.array([base[s] for s in seeds]), np.array([level[s] for s in seeds])
    if len(seeds) < 2:
        mean, low, high, p = float((l - b).mean()) if seeds else float("nan"), float("nan"), float("nan"), float("nan")
    else:
        mean, low, high = stats.seed_interval(l - b)
        p = float(scipy_stats.ttest_rel(l, b).pvalue) if np.ptp(l - b) > 0 else float("nan")
    return {"seeds": len(seeds), "base bpb": float(b.mean()) if seeds else float("nan"),
            "level bpb": float(l.mean()) if seeds else float("nan"), "Δ bpb": mean, "_low": low, "_high": high, "p": p}


def _rows(records: list[RunRecord]) -> dict[tuple, tuple[str, dict[int, float]]]:
    """(budget, model, frozenset of factor levels) -> (row name, {seed: test bpb}), for rows that factors cross."""
    rows: dict[tuple, tuple[str, dict[int, float]]] = {}
    for r in records:
        if r.model.factors:
            key = (r.budget_flops, model_of(r.model.name), frozenset(r.model.factors.items()))
            rows.setdefault(key, (r.model.name, {}))[1][r.seed] = r.test.bpb
    return rows


def factor_table(records: list[RunRecord], bases: dict[str, str]) -> pd.DataFrame | None:
    """Per budget, model, factor and non-base level (and the other factors' levels): the paired
    effect against the base level; `_row` names the level's row. None when no row with a non-base
    level has its base row beside it."""
    rows = _rows(records)
    table = []
    for (budget, model, levels), (name, seeds) in sorted(rows.items(), key=lambda item: (item[0][0], item[1][0])):
        levels = dict(levels)
        for factor, level in sorted(levels.items()):
            if factor not in bases or level == bases[factor]:
                continue
            base = rows.get((budget, model, frozenset((levels | {factor: bases[factor]}).items())))
            if base is not None:
                others = ", ".join(f"{f}={v}" for f, v in sorted(levels.items()) if f != factor)
                table.append({"budget": budget, "model": model, "factor": factor, "level": level, "base": bases[factor],
                              "other levels": others, **paired_effect(base[1], seeds), "_row": name})
    if not table:
        return None
    frame = pd.DataFrame(table)
    frame["95% CI"] = [f"[{lo:+.4f}, {hi:+.4f}]" if np.isfinite(lo) else "" for lo, hi in zip(frame["_low"], frame["_high"])]
    return frame


def factor_section(records: list[RunRecord], bases: dict[str, str]) -> list[str]:
    """The report's factor table with its explanation, as markdown lines (none without factors)."""
    table = factor_table(records, bases)
    if table is None:
        return []
    columns = ["budget", "model", "factor", "level", "base", "other levels", "seeds", "base bpb", "level bpb", "Δ bpb",
               "95% CI", "p"]
    shown = table[[c for c in columns if c != "other levels" or table["other levels"].any()]]
    return ["### Factors: each level against the base level", "",
            "Per budget and model, the test bpb of each factor level minus that of the base level, paired by seed "
            "(the two rows differ only in this factor; other factors at the levels shown): the mean difference over "
            "the seeds both rows have, its 95% Student-t interval and the p of a paired t-test (none for one seed). "
            "A negative difference: the level lowers bpb.", "", markdown(shown), ""]


def factor_sentences(records: list[RunRecord], bases: dict[str, str]) -> list[str]:
    """A summary sentence for each budget whose best row leads through a factor level: among the rows
    at every factor's base level another model leads. It names the level and its paired effect."""
    table = factor_table(records, bases)
    lines = []
    for budget in sorted({r.budget_flops for r in records}):
        runs = [r for r in records if r.budget_flops == budget]
        bpb = {name: float(np.mean([r.test.bpb for r in runs if r.model.name == name])) for name in {r.model.name for r in runs}}
        levels = {r.model.name: r.model.factors for r in runs}
        leader = min(bpb, key=bpb.get)
        raised = {f: level for f, level in levels[leader].items() if f in bases and level != bases[f]}
        at_base = [name for name in bpb if all(bases.get(f, level) == level for f, level in levels[name].items())]
        if not raised or not at_base or model_of(min(at_base, key=bpb.get)) == model_of(leader):
            continue
        base_leader = min(at_base, key=bpb.get)
        effects = []
        for _, e in table[(table["budget"] == budget) & (table["_row"] == leader)].iterrows():
            interval = f", 95% CI {e['95% CI']}, p = {e['p']:.3g}" if e["95% CI"] else ""
            effects.append(f"{e['factor']}={e['level']} against {e['factor']}={e['base']} changes it by "
                           f"{e['Δ bpb']:+.4f} bpb ({e['seeds']} paired seed{'s' if e['seeds'] != 1 else ''}{interval})")
        lines.append(f"- At {budget:.3g} training FLOPs, **{leader}** leads through its factor level "
                     f"{', '.join(f'{f}={v}' for f, v in raised.items())}, not its model: among the rows at every "
                     f"factor's base level **{base_leader}** leads ({bpb[base_leader]:.4f} bpb)"
                     + (f"; {'; '.join(effects)}" if effects else "") + ".")
    return lines
