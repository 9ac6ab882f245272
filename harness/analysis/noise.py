"""Noise degradations from a suite's records (docs/noise.md): per budget, model and noise rule, the
bpb on the noised test split against the clean test bpb, and the conditional form (clean
continuations after a noised context against the same continuations after their clean context).
Each degradation is the mean over training seeds of the per-seed difference (the same trained
model scores both), with a 95% Student-t interval over those seeds."""

from __future__ import annotations

import pandas as pd

from harness.analysis import stats
from harness.analysis.tables import markdown
from harness.run.records import RunRecord
from harness.run.spec import CLEAN_CONDITIONAL_RULE


def rule_names(records: list[RunRecord]) -> list[str]:
    """The noise rules the records scored, sorted."""
    return sorted({name.split(":")[1] for r in records for name, scored in r.test_sets.items() if scored.kind == "noise"})


def paired_difference(base: dict[int, float], other: dict[int, float]) -> tuple[float, str]:
    """Mean of other - base over the seeds both have, and its 95% t-interval ("one seed" for one)."""
    seeds = sorted(base.keys() & other.keys())
    mean, low, high = stats.seed_interval([other[s] - base[s] for s in seeds])
    return mean, f"[{low:+.4f}, {high:+.4f}]" if len(seeds) >= 2 else "one seed"


def noise_table(records: list[RunRecord]) -> pd.DataFrame | None:
    """Per budget, model and rule: clean and noised bpb (seed means) and the paired degradations; None
    when no record has a noised test set."""
    rows = []
    for rule in rule_names(records):
        scored = [r for r in records if f"noise:{rule}" in r.test_sets]
        for budget, model in sorted({(r.budget_flops, r.model.name) for r in scored}):
            runs = [r for r in scored if (r.budget_flops, r.model.name) == (budget, model)]
            bpb = {key: {r.seed: r.test_sets[key].bpb for r in runs}
                   for key in (f"noise:{rule}", f"noise:{rule}:clean-after-noised", f"noise:{CLEAN_CONDITIONAL_RULE}")}
            clean = {r.seed: clean_bpb(r) for r in runs}
            after_clean, after_noised = bpb[f"noise:{CLEAN_CONDITIONAL_RULE}"], bpb[f"noise:{rule}:clean-after-noised"]
            degradation, interval = paired_difference(clean, bpb[f"noise:{rule}"])
            conditional, conditional_interval = paired_difference(after_clean, after_noised)
            rows.append({"budget": budget, "model": model, "rule": rule, "seeds": len(runs),
                         "clean bpb": _mean(clean), "noised bpb": _mean(bpb[f"noise:{rule}"]),
                         "Δ bpb": degradation, "95% CI": interval,
                         "continuation, clean context": _mean(after_clean),
                         "continuation, noised context": _mean(after_noised),
                         "conditional Δ": conditional, "conditional 95% CI": conditional_interval})
    return pd.DataFrame(rows).sort_values(["budget", "rule", "model"]) if rows else None


def noised_language(record: RunRecord) -> str | None:
    """The language whose test text of a parallel corpus the rules noised, or None: the test split."""
    return record.eval.noise.language if record.eval.noise is not None else None


def noised_text(record: RunRecord) -> str:
    language = noised_language(record)
    return "the test split" if language is None else f"the {language} test text"


def clean_bpb(record: RunRecord) -> float:
    """The clean bpb of the text the rules noised, on the same windows."""
    language = noised_language(record)
    return record.test.bpb if language is None else record.test_sets[f"lang:{language}"].bpb


def _mean(by_seed: dict[int, float]) -> float:
    return sum(by_seed.values()) / len(by_seed)


def noise_section(records: list[RunRecord]) -> list[str]:
    """The report's noise table with what it measures, as markdown lines (none without noised test sets)."""
    table = noise_table(records)
    if table is None:
        return []
    rules = {}
    for r in records:
        for name, rule in (r.eval.noise.rules.items() if r.eval.noise is not None else ()):
            shares = ", ".join(f"{edit} {share:g}" for edit, share in (rule.shares or {}).items())
            rules[name] = f"`{name}`: {rule.kind} at {rule.rate:g}" + (f" (shares: {shares})" if shares else "")
    return ["### Noised test text", "",
            f"{noised_text(records[0]).capitalize()} noised by each rule (" + "; ".join(rules[name] for name in sorted(rules)) + "; "
            "docs/noise.md), the same noised bytes for every model and seed. Noised bpb is bits per noised byte over "
            "windows of the noised text; Δ bpb is noised minus clean bpb of that text. The conditional columns score only "
            "the clean second half of each of its windows (the first window left out), after its own clean first half "
            "or after the noised text of that half: bits of the continuation given its context, per continuation "
            "byte; conditional Δ is the second minus the first, what a noised context costs the clean text after "
            "it. Differences are paired by training seed: the mean and a 95% Student-t interval over the seeds.",
            "", markdown(table), ""]
