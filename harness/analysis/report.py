"""Markdown report and plots from a suite's records. Every figure comes from a
record in RESULTS_DIR (suite.json and runs/*/record.json)."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, MaxNLocator

from harness.analysis import fits as scaling, stats
from harness.analysis.factors import base_levels, factor_section, factor_sentences
from harness.analysis.noise import noise_section
from harness.analysis.languages import language_section
from harness.analysis.plotting import model_colours, save_plot, shown_length
from harness.analysis.rows import differences_section, parameter_columns, parameter_phrases
from harness.analysis.tables import markdown as _markdown
from harness.run.budget import cost_check_of
from harness.run.references import primed_with
from harness.errors import HarnessError
from harness.run.records import read_hashed_json
from harness.analysis.segment import Segmentation, plot_segmentation, segmentation_threshold
from harness.analysis.tuning_report import tuning_section
from harness.run.records import RunFailure, RunRecord, read_failures, read_suite_records
from harness.run.spec import InferenceScaling


COST_TOLERANCE = 0.02  # measured FLOPs further than this from the analytic figure are shown


WINDOW_TEST = "paired t over windows"  # stats.difference_p_value's test for single runs
WINDOW_NOTE = "one seed: this p reflects sampling over test windows only, not training noise"


def _with_caveat(test: str) -> str:
    """The test's name, with the caveat that a p over windows leaves out seed-to-seed variation."""
    return f"{test}; {WINDOW_NOTE}" if test == WINDOW_TEST else test


def _groups(records: list[RunRecord]) -> dict[tuple[float, str], list[RunRecord]]:
    """Runs keyed by (budget, model name)."""
    groups: dict[tuple[float, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.budget_flops, r.model.name), []).append(r)
    return groups


def summary_table(records: list[RunRecord]) -> pd.DataFrame:
    """Per model and budget: mean test bpb over seeds with a 95% interval (t over seeds,
    or bootstrap over windows for a single run); FLOPs and bytes per unit are seed means too, and
    so is the test cost against the target of a sized run (marked when a run missed it)."""
    rows = []
    for (budget, model), runs in sorted(_groups(records).items()):
        if len(runs) >= 2:
            mean, low, high = stats.seed_interval([r.test.bpb for r in runs])
            method = f"t, {len(runs)} seeds"
        else:
            mean, low, high = stats.bootstrap_interval(stats.window_bpb(runs[0]))
            method = f"bootstrap, {runs[0].test.windows} windows"
        rows.append({
            "budget": budget, "model": model, "adapter": runs[0].model.adapter, "seeds": len(runs),
            "test bpb": mean, "95% CI": f"[{low:.4f}, {high:.4f}]", "interval": method,
            "fwd FLOPs/byte": float(np.mean([r.flops_per_byte.analytic["total"] for r in runs])),
            "bytes/unit": float(np.mean([r.bytes_per_unit for r in runs])),
            "_low": low, "_high": high, "_test_flops": _mean_test_cost(runs), "test cost vs target": _against_target(runs),
            **parameter_columns(runs),  # total, embedding and non-embedding: bpb is not compared without them
        })
    return pd.DataFrame(rows)


def _against_target(runs: list[RunRecord]) -> str | None:
    """Seed-mean test cost / the target - 1 of a row of sized runs, and "not matched" when a run
    missed its tolerance (None for runs that were not sized, or records before the test count)."""
    checks = [cost_check_of(r) for r in runs]
    if any(c is None for c in checks):
        return None
    error = f"{np.mean([c.relative_error for c in checks]):+.1%}"
    return error if all(c.matched for c in checks) else f"{error}, not matched"


def unmatched_runs(records: list[RunRecord]) -> dict[tuple[float, str], list[RunRecord]]:
    """Rows (budget, model) in which a run's forward FLOPs per byte on the scored test windows are
    further from the target it was sized to than its tolerance (harness.run.budget.check_test_cost):
    the runs that missed, per row."""
    rows: dict[tuple[float, str], list[RunRecord]] = {}
    for r in records:
        check = cost_check_of(r)
        if check is not None and not check.matched:
            rows.setdefault((r.budget_flops, r.model.name), []).append(r)
    return rows


def at_matched_cost(records: list[RunRecord]) -> list[RunRecord]:
    """The runs of the rows whose every run held its inference cost: what rankings, the leaders'
    sentences and the scaling fits compare (a row with a run that missed is compared with none)."""
    missed = unmatched_runs(records)
    return [r for r in records if (r.budget_flops, r.model.name) not in missed]


def unmatched_sentence(records: list[RunRecord]) -> str | None:
    """The summary's note naming the rows left out of the comparisons, and by how much each run missed."""
    missed = unmatched_runs(records)
    if not missed:
        return None
    runs = [r for row in missed.values() for r in row]
    tolerance = max(cost_check_of(r).tolerance for r in runs)
    rows = "; ".join(f"{model} at {budget:.3g} (" + ", ".join(
        f"seed {r.seed} {cost_check_of(r).relative_error:+.1%}" for r in sorted(missed[budget, model], key=lambda r: r.seed))
        + ")" for budget, model in sorted(missed, key=lambda row: (row[1], row[0])))
    return (f"- Not at matched inference cost: on the scored test windows, {len(runs)} of {len(records)} runs are more "
            f"than {tolerance:.0%} off the forward FLOPs per byte their rung's target sets (counted window by window), "
            "so their rows are left out of the rankings, the sentences above and the scaling fits; their bpb is in the "
            f"tables, marked \"not matched\": {rows}.")


def _mean_test_cost(runs: list[RunRecord]) -> float:
    """Mean forward FLOPs per byte measured on the scored test windows (NaN for records before it)."""
    costs = [r.flops_per_byte.test for r in runs]
    return float(np.mean(costs)) if all(c is not None for c in costs) else float("nan")


def cost_table(records: list[RunRecord]) -> pd.DataFrame | None:
    """Runs whose measured FLOPs per byte differ from the analytic training-split figure by more
    than the tolerance: on the scored test windows (inference cost) or on training windows (the
    budget's check). None when every run is within it, or for records that predate the counts."""
    rows = []
    for r in records:
        f = r.flops_per_byte
        test, check = f.test_deviation(), f.training_deviation()
        if (test is not None and abs(test) > COST_TOLERANCE) or (check is not None and abs(check) > COST_TOLERANCE):
            rows.append({"run": r.run_id, "analytic FLOPs/byte": f.analytic["total"], "test FLOPs/byte": f.test,
                         "test vs analytic": test, "counted training FLOPs/byte": f.counted_training,
                         "training vs analytic": check})
    return pd.DataFrame(rows) if rows else None


def padding_table(records: list[RunRecord]) -> pd.DataFrame | None:
    """Per model, over its runs that counted both: how much more the evaluator's batches computed
    than the useful FLOPs (each window alone), as a share of the useful ones. None for records
    from before the batched count."""
    shares: dict[str, list[float]] = {}
    for r in sorted(records, key=lambda r: r.model.name):
        share = r.flops_per_byte.padding_share()
        if share is not None:
            shares.setdefault(r.model.name, []).append(share)
    rows = [{"model": model, "runs": len(v), "padding (mean)": f"{np.mean(v):+.1%}",
             "range": f"{min(v):+.1%} to {max(v):+.1%}"} for model, v in shares.items()]
    return pd.DataFrame(rows) if rows else None


def ranking_table(records: list[RunRecord]) -> pd.DataFrame:
    """Per budget, models ranked by mean test bpb, each compared with the best."""
    groups = _groups(records)
    rows = []
    for budget in sorted({b for b, _ in groups}):
        models = sorted(((m, runs) for (b, m), runs in groups.items() if b == budget),
                        key=lambda item: sum(r.test.bpb for r in item[1]) / len(item[1]))
        best_name, best_runs = models[0]
        best_bpb = sum(r.test.bpb for r in best_runs) / len(best_runs)
        for rank, (name, runs) in enumerate(models, 1):
            bpb = sum(r.test.bpb for r in runs) / len(runs)
            if rank == 1:
                p, test, verdict = float("nan"), "", "best"
            else:
                p, test = stats.difference_p_value(runs, best_runs)
                verdict = "significant" if p < stats.ALPHA else "not significant"
            rows.append({"budget": budget, "rank": rank, "model": name, "test bpb": bpb, "Δ vs best": bpb - best_bpb,
                         "p": p, "test": test, "vs best": verdict})
    return pd.DataFrame(rows, columns=["budget", "rank", "model", "test bpb", "Δ vs best", "p", "test", "vs best"])


def model_kinds(records: list[RunRecord]) -> dict[str, str]:
    """Model name -> "tokenized" (records with tokenizer metrics) or "tokenizer-free"."""
    return {r.model.name: "tokenized" if r.tokenizer else "tokenizer-free" for r in records}


def _against(row: pd.Series, name: str, detail: str = "") -> str:
    """How far a ranking row is behind the best, with the verdict, p and test (and its caveat)."""
    return (f"{row['Δ vs best']:.4f} bpb ahead of {name} "
            f"({detail}{row['vs best']}, p = {row['p']:.3g}, {_with_caveat(row['test'])})")


def _aside(*notes: str | None) -> str:
    """' (a; b)' for the notes given, '' for none."""
    notes = [n for n in notes if n]
    return f" ({'; '.join(notes)})" if notes else ""


def summary_sentences(ranking: pd.DataFrame, kinds: dict[str, str], corpus: dict | None = None,
                      parameters: dict[tuple[float, str], str] | None = None,
                      held_out_budget: float | None = None) -> list[str]:
    """One generated sentence per budget, saying each fact once: who leads and by how much over
    the runner-up; over the best model of the other kind (tokenized / tokenizer-free) when
    that is not the runner-up; and where the best compressor primed with the training split
    stands (none for a record without primed references). `parameters` ((budget, model) -> a
    phrase) puts each named model's parameters beside it. At `held_out_budget` (the suite's
    holdout rung) only some rows ran, and the sentence says so."""
    lines = []
    for budget, group in ranking.groupby("budget"):
        size = {m: (parameters or {}).get((budget, m)) for m in group["model"]}
        best = group.iloc[0]
        both_kinds = len({kinds.get(m) for m in group["model"]}) > 1
        kind = _aside(kinds[best["model"]] if both_kinds else None, size[best["model"]])
        among = (f", the rung held out beyond the ladder (run by {len(group)} row{'s' if len(group) != 1 else ''} only)"
                 if budget == held_out_budget else "")
        sentence = (f"- At {budget:.3g} training FLOPs{among}, **{best['model']}**{kind} leads with "
                    f"{best['test bpb']:.4f} bpb")
        clauses = []
        if len(group) > 1:
            second = group.iloc[1]
            other = _aside(kinds[second["model"]] if both_kinds and kinds[second["model"]] != kinds[best["model"]]
                           else None, size[second["model"]])
            clauses.append(_against(second, f"{second['model']}{other}"))
            rivals = group[[kinds.get(m) != kinds.get(best["model"]) for m in group["model"]]]
            if both_kinds and rivals.iloc[0]["model"] != second["model"]:  # the best of the other kind, if not said
                rival = rivals.iloc[0]
                clauses.append(_against(rival, f"the best {kinds[rival['model']]} model, "
                                               f"{rival['model']}{_aside(size[rival['model']])}",
                                        f"{rival['test bpb']:.4f} bpb; "))
        sentence += (": " + " and ".join(clauses)) if clauses else ""
        primed = primed_clause(best["test bpb"], corpus)
        sentence += f"; {primed}" if primed else ""
        lines.append(sentence + ".")
    return lines


def primed_clause(bpb: float, corpus: dict | None) -> str | None:
    """Where a bpb stands against the best compressor primed with the training split (None for a
    record without primed references)."""
    refs = (corpus or {}).get("references", {})
    primed = refs.get("test", {}).get("primed_bpb")
    if not primed:
        return None
    name, reference = min(primed.items(), key=lambda item: item[1])
    side = "behind" if bpb > reference else "ahead of"
    return (f"it is {abs(bpb - reference):.4f} bpb {side} the best primed compressor, {name} "
            f"{primed_with(refs.get('prime_bytes'))} ({reference:.4f} bpb)")


WHOLE_SPLIT = "whole test split at once"
ALONE = "each window alone (container overhead included)"


def reference_table(refs: dict) -> pd.DataFrame:
    """A corpus's reference rows: primed, whole split, each window alone, order-0 entropy.
    A record from before primed references has only the per-window rows (its "compressors_bpb")."""
    test, primed = refs["test"], primed_with(refs.get("prime_bytes"))  # a suite may cap the priming
    rows = ([{"reference": f"{name}, {primed}", "bpb": bpb} for name, bpb in test.get("primed_bpb", {}).items()]
            + [{"reference": f"{name}, {WHOLE_SPLIT}", "bpb": bpb} for name, bpb in test.get("whole_split_bpb", {}).items()]
            + [{"reference": f"{name}, {ALONE}", "bpb": bpb} for name, bpb in test["compressors_bpb"].items()]
            + [{"reference": "order-0 entropy of the test windows", "bpb": test["order0_entropy_bpb"]}])
    return pd.DataFrame(rows)


def runs_table(records: list[RunRecord]) -> pd.DataFrame:
    rows = []
    for r in records:
        rows.append({
            "model": r.model.name,
            "adapter": r.model.adapter,
            "budget": r.budget_flops,
            "seed": r.seed,
            "params": r.parameters["total"],
            "fwd FLOPs/byte": r.flops_per_byte.analytic["total"],
            "train FLOPs": r.total_flops,
            "bytes seen": r.bytes_seen,
            "epochs": r.epochs,
            "val bpb": r.val.bpb,
            "test bpb": r.test.bpb,
            "bytes/unit": r.bytes_per_unit,
            "wall s": r.wall_seconds,
            "FLOP/s": r.achieved_flops_per_s,
            "MFU": r.mfu if r.mfu <= 1 else None,  # above 1: the peak was measured under load (blank)
        })
    return pd.DataFrame(rows).sort_values(["model", "budget", "seed"], kind="stable")


def tokenizer_table(records: list[RunRecord], corpus: dict) -> pd.DataFrame | None:
    """One row per tokenizer model (first run of each), plus raw bytes for comparison."""
    rows, seen = [], set()
    for r in records:
        t = r.tokenizer or {}
        if not t or r.model.name in seen:
            continue
        seen.add(r.model.name)
        rows.append({"model": r.model.name, "tokenizer": t["tokenizer"], "vocab": t["vocab_size"],
                     "bytes/token (test)": t["bytes_per_token_test"],
                     "bytes/token (test windows)": t.get("bytes_per_token_test_windows"),
                     "vocab used (test)": t["vocab_used_test"], "tokenizer train s": t["tokenizer_train_seconds"],
                     "encode MB/s": t.get("encode_mb_per_s")})
    if not rows:
        return None
    raw = corpus["raw_bytes_tokenizer"]
    rows.append({"model": "(raw bytes)", "tokenizer": raw["tokenizer"], "vocab": raw["vocab_size"],
                 "bytes/token (test)": 1.0, "bytes/token (test windows)": 1.0,
                 "vocab used (test)": raw["vocab_used_test"], "tokenizer train s": 0.0, "encode MB/s": None})
    return pd.DataFrame(rows)


def representative_runs(records: list[RunRecord], key: str) -> dict[str, RunRecord]:
    """Per model that has `key` in its records: the run at its largest budget, lowest seed."""
    chosen: dict[str, RunRecord] = {}
    for r in sorted(records, key=lambda r: (r.budget_flops, -r.seed)):
        if getattr(r, key):
            chosen[r.model.name] = r
    return chosen


def plot_segmentation_examples(records: list[RunRecord], plot_dir: Path, label: str,
                               colours: dict[str, tuple] | None = None) -> list[str]:
    """One picture per chunking model: the start of the test split with its boundaries
    (and scores, and the threshold where the rule has one), as the evaluation rule cut it.
    Returns markdown image lines."""
    colours = colours or model_colours(r.model.name for r in records)
    lines = []
    for name, r in representative_runs(records, "segmentation").items():
        seg = r.segmentation
        starts = np.zeros(len(seg.example_bytes), dtype=bool)
        starts[seg.example_starts] = True
        scores = None if seg.example_scores is None else np.asarray(seg.example_scores)
        example = Segmentation(text=bytes(seg.example_bytes), scores=scores, starts=starts, window=seg.window)
        path = plot_dir / f"segment_{name}_{label}.png"
        plot_segmentation(example, path, f"{name} ({r.run_id}), test split, evaluation rule",
                          threshold=segmentation_threshold(r) if scores is not None else None, colour=colours[name])
        lines += [f"![{name}: chunk boundaries on the test split](plots/{path.name})", ""]
    return lines


def plot_length_distributions(curves: dict[str, np.ndarray], path: Path, title: str,
                              colours: dict[str, tuple] | None = None) -> bool:
    """Fraction of chunks of each length, one panel per model (a model whose chunks all have
    one length would flatten the others on a shared axis); counts[i] = chunks of i bytes. The
    length axis, the same in every panel, ends where 99.5% of every model's chunks are; a panel
    says what lies beyond. A curve's key is the model name or (name, label shown). Returns False, drawing
    nothing, when there is no curve."""
    if not curves:
        return False
    colours = colours or model_colours(k[0] if isinstance(k, tuple) else k for k in curves)
    limit = max(max(shown_length(counts) for counts in curves.values()), 2)
    columns = min(3, len(curves))
    rows = -(-len(curves) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.2 * rows + 0.5), squeeze=False)
    for ax, (key, counts) in zip(axes.flat, curves.items()):
        name, label = key if isinstance(key, tuple) else (key, key)
        counts = np.asarray(counts, dtype=float)
        lengths = np.arange(len(counts))
        share = counts / counts.sum()
        mean = (lengths * counts).sum() / counts.sum()
        shown = (lengths >= 1) & (lengths <= limit) & (counts > 0)
        ax.vlines(lengths[shown], 0, share[shown], color=colours[name], linewidth=3, alpha=0.5)
        ax.plot(lengths[shown], share[shown], marker="o", markersize=2.5, linewidth=0, color=colours[name],
                label=f"{label} (mean {mean:.2f} B)")
        beyond = share[limit + 1:].sum()
        tail = f"\n{beyond:.1%} longer than {limit} B, longest {np.flatnonzero(counts)[-1]} B" if beyond > 0 else ""
        ax.set_title(f"{label}: mean {mean:.2f} B{tail}", fontsize=7)
        ax.set_xlim(0.5, limit + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, share[shown].max() * 1.12)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(curves):]:
        ax.set_visible(False)
    fig.supxlabel("length (bytes)", fontsize=8)
    fig.supylabel("fraction of chunks", fontsize=8)
    fig.suptitle(f"{title}; lengths up to {limit} B shown (99.5% of every model's chunks)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_patch_sizes(records: list[RunRecord], path: Path, colours: dict[str, tuple] | None = None) -> bool:
    """Patch sizes each patcher measured on the training split (the record's preparation)."""
    curves = {(r.model.name, f"{r.model.name} ({r.preparation.facts.get('patcher', '?')})"): [0] + r.preparation.unit_length_counts
              for r in representative_runs(records, "preparation").values() if r.preparation.unit_length_counts}
    return plot_length_distributions(curves, path, "patch sizes on the training split", colours)


def plot_chunk_lengths(records: list[RunRecord], path: Path, colours: dict[str, tuple] | None = None) -> bool:
    """Chunk (patch) lengths on the test windows under each chunking model's evaluation rule."""
    curves = {name: r.segmentation.chunk_length_counts for name, r in representative_runs(records, "segmentation").items()}
    return plot_length_distributions(curves, path, "chunk lengths on the test windows (evaluation rule)", colours)


def variant_table(records: list[RunRecord]) -> pd.DataFrame | None:
    """Per model, budget and other evaluation rule (e.g. ByteFlow's top-K): mean test bpb
    under the rule and under the causal rule, and the gap with a t interval over seeds."""
    rows = []
    for (budget, model), runs in sorted(_groups(records).items()):
        for name in runs[0].test_variants:
            gaps = [r.test.bpb - r.test_variants[name].bpb for r in runs]
            gap, low, high = stats.seed_interval(gaps)
            rows.append({"budget": budget, "model": model, "rule": name, "seeds": len(runs),
                         "test bpb": float(np.mean([r.test_variants[name].bpb for r in runs])),
                         "causal test bpb": float(np.mean([r.test.bpb for r in runs])),
                         "causal - rule": gap, "95% CI": f"[{low:+.4f}, {high:+.4f}]" if len(runs) > 1 else "",
                         "note": runs[0].test_variants[name].label})
    return pd.DataFrame(rows) if rows else None


def sizing_table(records: list[RunRecord]) -> pd.DataFrame | None:
    """Per model and target (first run of each): configured and chosen widths and depth (every width
    in records since every width grows; the main one in older records), target and achieved cost;
    a budget column when the targets differ between budgets (a scaling rule)."""
    rows, seen = [], set()
    for r in sorted(records, key=lambda r: (r.model.name, r.budget_flops)) if _scaled(records) else records:
        s = r.sizing
        if not s or (r.model.name, s["target_flops_per_byte"]) in seen:
            continue
        seen.add((r.model.name, s["target_flops_per_byte"]))
        configured = {k: v for k, v in s["configured"].items() if k != "flops_per_byte"}
        budget = {"budget": r.budget_flops} if _scaled(records) else {}
        rows.append({"model": r.model.name, **budget, "rule": s["rule"],
                     "configured": ", ".join(f"{k}={v}" for k, v in configured.items()),
                     "configured FLOPs/byte": s["configured"]["flops_per_byte"],
                     "chosen": ", ".join(f"{k}={v}" for k, v in s["chosen"].items()),
                     "target FLOPs/byte": s["target_flops_per_byte"], "achieved FLOPs/byte": s["achieved_flops_per_byte"],
                     "error": s["relative_error"]})
    return pd.DataFrame(rows) if rows else None


def _scaled(records: list[RunRecord]) -> bool:
    """Whether the runs were sized to more than one target (a scaling rule over several budgets)."""
    return len({r.sizing["target_flops_per_byte"] for r in records if r.sizing}) > 1


def calibration_tables(records: list[RunRecord]) -> dict[str, pd.DataFrame]:
    """Per adapter, the scalar facts it computed after training (e.g. ByteFlow's threshold): one
    table each, with the columns its runs have, in model / budget / seed order."""
    tables = {}
    for adapter in sorted({r.model.adapter for r in records if r.calibration}):
        runs = sorted((r for r in records if r.model.adapter == adapter and r.calibration),
                      key=lambda r: (r.model.name, r.budget_flops, r.seed))
        rows = [{"run": r.run_id, **{k: v for k, v in r.calibration.items() if isinstance(v, (int, float, str))}}
                for r in runs]
        tables[adapter] = pd.DataFrame(rows).dropna(axis="columns", how="all")
    return tables


BUDGET_MARKERS = "os^Dvph*X"  # the marker of each budget, in increasing order, in the inference-cost plot


def _errors(group: pd.DataFrame) -> list[pd.Series]:
    return [group["test bpb"] - group["_low"], group["_high"] - group["test bpb"]]


def plot_bpb_against_budget(summary: pd.DataFrame, label: str, path: Path,
                            colours: dict[str, tuple] | None = None) -> None:
    """Test bpb (95% intervals) against the training budget, a line per model. With one budget,
    the models side by side in order of bpb instead (on a FLOPs axis they would stack on one
    vertical line)."""
    colours = colours or model_colours(summary["model"])
    budgets = sorted(summary["budget"].unique())
    if len(budgets) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for model, group in summary.groupby("model"):
            group = group.sort_values("budget")
            ax.errorbar(group["budget"], group["test bpb"], yerr=_errors(group), marker="o", capsize=3, label=model,
                        color=colours[model])
        ax.set_xscale("log")
        save_plot(fig, ax, "training FLOPs (budget)", "test bits per byte", f"{label}: test bpb against training compute",
                  path, legend_size=8)
        return
    ranked = summary.sort_values("test bpb").reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(ranked) + 1.5), 4))
    for position, row in ranked.iterrows():
        ax.errorbar([position], [row["test bpb"]], yerr=[[row["test bpb"] - row["_low"]], [row["_high"] - row["test bpb"]]],
                    marker="o", capsize=3, label=row["model"], color=colours[row["model"]])
    ax.set_xticks(range(len(ranked)), ranked["model"], rotation=40, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(ranked) - 0.4)
    save_plot(fig, ax, "", "test bits per byte", f"{label}: test bpb at the one budget, {budgets[0]:.3g} training FLOPs",
              path, legend=False)


def plot_bpb_against_cost(summary: pd.DataFrame, x: str, xlabel: str, title: str, path: Path,
                          colours: dict[str, tuple] | None = None) -> None:
    """Test bpb (95% intervals) against the inference cost in column `x`: the colour is the model,
    the marker the budget (a legend of its own), and a thin line joins a model's budgets."""
    colours = colours or model_colours(summary["model"])
    budgets = sorted(summary["budget"].unique())
    markers = {b: BUDGET_MARKERS[i % len(BUDGET_MARKERS)] for i, b in enumerate(budgets)}
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, group in summary.groupby("model"):
        group = group.sort_values("budget")
        ax.errorbar(group[x], group["test bpb"], yerr=_errors(group), marker="none", capsize=3, linewidth=0.8,
                    label=model, color=colours[model])
        for budget, point in group.groupby("budget"):
            ax.scatter(point[x], point["test bpb"], marker=markers[budget], s=30, color=colours[model], zorder=3)
    if len(budgets) > 1:
        handles = [Line2D([], [], marker=markers[b], color="0.35", linestyle="none", label=f"{b:.2g}") for b in budgets]
        ax.add_artist(ax.legend(handles=handles, title="training FLOPs", fontsize=7, title_fontsize=7,
                                loc="lower left", bbox_to_anchor=(1.01, 0), borderaxespad=0))
    else:
        title = f"{title} at {budgets[0]:.3g} FLOPs"
    low, high = float(summary[x].min()), float(summary[x].max())
    if high > 3 * low:
        ax.set_xscale("log")
    else:  # a log axis over a few percent writes its tick labels over each other
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 260k, 1.2M
    save_plot(fig, ax, xlabel, "test bits per byte", title, path, legend_size=7)


def plot_learning_curves(records: list[RunRecord], path: Path, colours: dict[str, tuple] | None = None) -> None:
    """Train bpb against bytes seen: one line per model, its largest budget and lowest seed."""
    colours = colours or model_colours(r.model.name for r in records)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in representative_runs(records, "loss_curve").items():
        curve = r.loss_curve
        ax.plot([p.bytes for p in curve], [p.train_bpb for p in curve], label=name, linewidth=1, color=colours[name])
    save_plot(fig, ax, "training bytes seen", "train bits per byte", "learning curves (each model: largest budget, lowest seed)",
          path, legend_size=7)


def failure_table(failures: list[RunFailure]) -> pd.DataFrame:
    """Runs that did not finish (runs/RUN_ID/failure.json): how and why, never a bpb."""
    rows = [{"run": f.run_id, "model": f.model, "budget": f.budget_flops, "seed": f.seed,
             "outcome": f"diverged at step {f.step}" if f.kind == "diverged" else "failed",
             "last finite loss": f.last_finite_loss,
             "reason": f.reason if f.kind == "failed" else ""} for f in failures]
    return pd.DataFrame(rows)


def epoch_cap_lines(records: list[RunRecord]) -> list[str]:
    """A sentence for the runs that the suite's max_epochs stopped short of their budget."""
    capped = [r for r in records if r.epoch_cap is not None]
    if not capped:
        return []
    runs = ", ".join(f"{r.run_id} ({r.steps} of {r.epoch_cap.budget_steps} steps)" for r in capped)
    return [f"Stopped at max_epochs {capped[0].epoch_cap.max_epochs:g} over the training split, short of their "
            f"budget (train FLOPs above are what they ran): {runs}.", ""]


def _warn(message: str) -> None:
    print(f"harness: warning: {message}; skipped", file=sys.stderr)


def _peak_sentence(records: list[RunRecord]) -> str:
    """The fp32 matmul peak that each run measured when it started (its MFU's denominator)."""
    peaks = [r.matmul_peak_flops_per_s for r in records]
    if max(peaks) - min(peaks) <= 0.005 * max(peaks):
        text = f"measured fp32 matmul peak {peaks[0]:.3g} FLOP/s (MFU is relative to it)."
    else:
        text = (f"measured fp32 matmul peak {min(peaks):.3g} to {max(peaks):.3g} FLOP/s across runs (each run's MFU "
                "is relative to the peak measured when it ran).")
    above = sum(r.mfu > 1 for r in records)
    if above:  # a peak measured while other work shared the machine reads low
        text += (f" {above} of {len(records)} runs trained faster than the peak they measured (a peak taken while "
                 "other work shared the machine reads low); their MFU is left blank.")
    return text


def auxiliary_sentence(records: list[RunRecord], spec: dict) -> str:
    """Whether the FLOPs count auxiliary models (the BLT entropy model), naming the models that have
    one; nothing for a suite without such a model."""
    owners = sorted({r.model.name for r in records
                     if r.preparation.auxiliary_flops > 0 or "auxiliary" in r.flops_per_byte.analytic})
    if not owners:
        return ""
    models = ", ".join(owners)
    if spec.get("count_auxiliary_flops", True):
        return (f" Auxiliary models (in {models}: their training, and their forward pass per byte) are **included** "
                "in the training FLOPs and budgets.")
    return f" Auxiliary models (in {models}) are **excluded** from the training FLOPs and budgets, as in the BLT paper."


def calibration_sentence(records: list[RunRecord]) -> str:
    """Whether the passes after training (Adapter.finish_training) were charged, naming the models
    that have them; nothing for a suite without any."""
    charged = sorted({r.model.name for r in records if r.calibration_flops and r.calibration_flops.spent > 0})
    uncharged = sorted({r.model.name for r in records if r.calibration and r.calibration_flops is None})
    text = ""
    if charged:
        text += (f" Calibration after training (in {', '.join(charged)}) is **included**: the budget reserves it "
                 "before training, and the train FLOPs include what it counted.")
    if uncharged:
        text += (f" The records of {', '.join(uncharged)} predate calibration charging: their passes after training "
                 "(calibration) are not in the train FLOPs.")
    return text


def suite_header(spec: dict, records: list[RunRecord]) -> list[str]:
    """The report's opening: title, description (if any), split, device, FLOP conventions, sizing rule."""
    description = (spec.get("description") or "").strip()
    lines = [
        f"# Suite `{spec['name']}`",
        "",
        *([description, ""] if description else []),
        f"Split {spec['split']['train_bytes']:,} / {spec['split']['val_bytes']:,} / {spec['split']['test_bytes']:,} "
        f"bytes (train / val / test) of each corpus; test windows of {spec['eval']['window']} bytes, each scored from "
        f"an empty context. Device `{', '.join(sorted({r.device for r in records}))}`; " + _peak_sentence(records),
        "",
        "FLOPs: a multiply-add is 2; every matrix product counts (head and both attention products); "
        "training = 3 x forward. bpb = summed NLL in nats / (ln 2 x scored bytes)." + auxiliary_sentence(records, spec)
        + calibration_sentence(records),
        "",
    ]
    # suites written before every width grew have no `sizing` and were sized by the main width
    main_only = spec.get("sizing", {}).get("widths", "main") == "main"
    by = "its main width" if main_only else "all its widths in their configured ratios"
    if spec.get("inference_flops_per_byte"):
        lines += [f"Matched inference cost: every model was sized to {spec['inference_flops_per_byte']:.3g} forward FLOPs "
                  f"per byte (within 5%) by {by}, then depth (README, \"Matched inference cost\"); "
                  "the sizing table of each corpus lists what changed.", ""]
    if spec.get("inference_scaling"):
        rule = InferenceScaling(**spec["inference_scaling"])
        targets = ", ".join(f"{rule.target(b):.3g} at {b:.3g}" for b in sorted(spec["budgets"]))
        lines += [f"Inference cost grows with compute: at a budget of C training FLOPs every model was sized to "
                  f"{rule.describe()} forward FLOPs per byte (within 5%) by {by}, then depth (README, "
                  f"\"Matched inference cost\"): {targets}. The sizing table of each corpus lists what changed.", ""]
    return lines


def build_report(results_dir: Path, report_dir: Path) -> str:
    """The markdown report; its plots are written to report_dir/plots, the folder
    the markdown will sit in (so its image links are relative)."""
    suite_file = results_dir / "suite.json"
    if not suite_file.exists():
        raise HarnessError(f"{results_dir}: no suite.json (run `harness run SUITE` first)")
    suite = read_hashed_json(suite_file, "run the suite again to rewrite it")
    if not {"suite", "corpora"} <= suite.keys():
        raise HarnessError(f"{suite_file}: not a valid suite summary (run the suite again to rewrite it)")
    records = read_suite_records(results_dir, on_error=_warn)  # an unreadable record is left out, with a warning
    finished = {r.run_id for r in records}
    failures = [f for f in read_failures(results_dir) if f.run_id not in finished]
    if not records:
        unfinished = f" ({len(failures)} did not finish; see failure.json in their run folders)" if failures else ""
        raise HarnessError(f"{results_dir}: no finished runs yet{unfinished}")
    plot_dir = report_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    spec = suite["suite"]
    by_corpus = {label: [r for r in records if r.corpus.label == label] for label in suite["corpora"]}
    by_corpus = {label: runs for label, runs in by_corpus.items() if runs}
    matched = {label: at_matched_cost(runs) for label, runs in by_corpus.items()}
    rankings = {label: ranking_table(runs) for label, runs in matched.items()}
    colours = model_colours([m["name"] for m in spec["models"]] + [r.model.name for r in records])  # one per model, every plot
    lines = suite_header(spec, records)
    # the rung held out beyond the ladder (the suite's `holdout`): left out of the fits, which predict it
    held_budget = (spec.get("holdout") or {}).get("budget")
    held = {label: [r for r in runs if r.budget_flops == held_budget] for label, runs in matched.items()}
    fitted = {label: scaling.scaling_fits(scaling.fit_records(
        [r for r in runs if r.budget_flops != held_budget], model_kinds(by_corpus[label])))
        for label, runs in matched.items()}
    beyond = {label: scaling.predict_beyond(fitted[label].power_law, runs) if runs else {}
              for label, runs in held.items()}
    lines += ["## Summary", ""]
    for label, ranking in rankings.items():
        notes = [scaling.summary_sentence(fitted[label]), scaling.beyond_sentence(fitted[label], beyond[label]),
                 unmatched_sentence(by_corpus[label])]
        lines += [f"Corpus `{label}`:", "", *summary_sentences(ranking, model_kinds(by_corpus[label]),
                                                                suite["corpora"][label], parameter_phrases(by_corpus[label]),
                                                                held_budget),
                  *factor_sentences(matched[label], base_levels(spec)),
                  *[note for note in notes if note], ""]
    if failures:
        lines += ["## Runs that did not finish", "",
                  "These runs have no bpb and are in no table below: a diverged run's training loss stopped being "
                  "finite (the last finite loss is nats per byte); a failed run stopped with the reason given. "
                  "`harness run SUITE --retry-failed` runs them again.", "",
                  _markdown(failure_table(failures)), ""]
    for label, runs in by_corpus.items():
        lines += corpus_section(label, runs, rankings[label], suite["corpora"][label], plot_dir, colours,
                                base_levels(spec))
        left_out = ("Rows not at matched inference cost are not fitted (Summary)." if unmatched_runs(runs) else "")
        lines += scaling.fits_section(fitted[label], label, plot_dir, colours, bool(spec.get("inference_scaling")),
                                      left_out)
        lines += scaling.beyond_lines(fitted[label], beyond[label], held[label])
    lines += tuning_section(results_dir, plot_dir, colours, sum(r.trained_as is not None for r in records))
    return "\n".join(lines)


def summary_shown(summary: pd.DataFrame, measured_cost: bool) -> pd.DataFrame:
    """The summary table as the report shows it: the measured test cost where every record has
    it, the cost against the target where runs were sized."""
    shown = summary.drop(columns=["_low", "_high"] + ([] if measured_cost else ["_test_flops"]))
    if shown["test cost vs target"].isna().all():
        shown = shown.drop(columns=["test cost vs target"])
    return shown.rename(columns={"_test_flops": "test fwd FLOPs/byte"})


def corpus_section(label: str, records: list[RunRecord], ranking: pd.DataFrame, corpus: dict, plot_dir: Path,
                   colours: dict[str, tuple] | None = None, factor_bases: dict[str, str] | None = None) -> list[str]:
    """The tables and plots of one corpus's runs, as markdown lines; `factor_bases` (factor -> base
    level) for a suite with factors."""
    colours = colours or model_colours(r.model.name for r in records)
    summary = summary_table(records)
    plots = {name: f"{name}_{label}.png" for name in ("bpb_vs_flops", "bpb_vs_inference_flops", "learning_curves",
                                                      "patch_sizes", "chunk_lengths")}
    plot_bpb_against_budget(summary, label, plot_dir / plots["bpb_vs_flops"], colours)
    measured_cost = bool(summary["_test_flops"].notna().all())  # records before format 3 have the analytic figure only
    plot_bpb_against_cost(summary, "_test_flops" if measured_cost else "fwd FLOPs/byte",
                          "forward FLOPs per byte on the test windows (inference cost)" if measured_cost else
                          "forward FLOPs per byte (inference cost)",
                          f"{label}: test bpb against inference cost", plot_dir / plots["bpb_vs_inference_flops"],
                          colours)
    plot_learning_curves(records, plot_dir / plots["learning_curves"], colours)
    return (results_lines(label, records, ranking, corpus, summary, measured_cost, factor_bases)
            + tokenizer_lines(records, corpus) + language_section(label, records, plot_dir, colours)
            + reference_lines(corpus["references"])
            + measurement_lines(records) + noise_section(records) + plot_lines(label, records, plots, plot_dir, colours))


def results_lines(label: str, records: list[RunRecord], ranking: pd.DataFrame, corpus: dict, summary: pd.DataFrame,
                  measured_cost: bool, factor_bases: dict[str, str] | None) -> list[str]:
    """The corpus heading, bpb per model and budget, how rows differ, the ranking, factors, every run."""
    refs = corpus["references"]
    return [
        f"## Corpus `{label}`",
        "",
        f"Corpus id `{corpus['id']}`, sha256 `{corpus['sha256'][:16]}…`; {refs['windows']} test windows of "
        f"{refs['window']} bytes.",
        "",
        "### Test bpb per model and budget (95% intervals)",
        "",
        _markdown(summary_shown(summary, measured_cost)),
        "",
        *differences_section(records),
        "### Ranking per budget",
        "",
        "Each model against the best of its budget: Welch's t-test over seeds where both have two or more, "
        "else a paired t-test over the shared test windows; p >= 0.05 is not significant. "
        "A p over windows (one seed) reflects sampling over test windows only: seed-to-seed training noise is not in it."
        + (" Rows not at matched inference cost (\"not matched\" above) are not ranked." if unmatched_runs(records)
           else ""),
        "",
        _markdown(ranking),
        "",
        *factor_section(records, factor_bases or {}),
        "### Runs",
        "",
        _markdown(runs_table(records)),
        "",
        *epoch_cap_lines(records),
    ]


def tokenizer_lines(records: list[RunRecord], corpus: dict) -> list[str]:
    lines = []
    tokenizers = tokenizer_table(records, corpus)
    if tokenizers is not None:
        lines += ["### Tokenizers (test split)", "", _markdown(tokenizers), "",
                  "Training time is that of the run that trained the tokenizer; later runs load it from the cache. "
                  "The bytes/unit of the tables above is measured on the training split (long text, the extra tokens "
                  "at window edges left out); these columns are on the test split, in 64 KiB pieces and in the scored windows.",
                  ""]
    return lines


def reference_lines(refs: dict) -> list[str]:
    """The compressor reference rows on the same test windows, and what each coding means."""
    reference = reference_table(refs)
    lines = [
        "### Reference rows (same test windows)",
        "",
        ("Primed: each window coded after the training split, the extra bytes C(train + window) - C(train), "
         "the fair counterpart of a trained model (none for gzip, whose 32 kB window sees almost none of the split, "
         "nor for bz2, which re-sorts its whole block). "
         + (f"Here the compressors are {primed_with(refs['prime_bytes'])} (the suite's `references.prime_bytes` "
            f"cap; the training split holds {refs['train_bytes']:,} bytes). " if refs.get("prime_bytes") else "")
         + "Whole split: all scored windows compressed at once (each window "
         "after the windows before it, a context the models do not get), comparable with published whole-file figures. "
         "Each window alone: the container's headers dominate a window this short."
         if refs["test"].get("primed_bpb") else
         "This record predates primed references: every compressor row codes each window alone, "
         "container overhead included, and flatters the models (run the suite again for primed rows)."),
        "",
        _markdown(reference),
        "",
    ]
    if refs.get("compressors"):
        lines += ["Settings: " + "; ".join(f"{name}: {settings}" for name, settings in refs["compressors"].items()) + ".", ""]
    return lines


def measurement_lines(records: list[RunRecord]) -> list[str]:
    """Other evaluation rules, FLOPs that differ from the analytic figure, padding, sizing, calibration."""
    variants = variant_table(records)
    lines = []
    if variants is not None:
        lines += ["### Other evaluation rules", "",
                  "The test bpb above uses each adapter's causal evaluation rule; these rows use other rules "
                  "for comparison (a non-causal rule is not a valid likelihood). Means over seeds; the interval "
                  "is a 95% t interval of the per-seed gap (paired: both rules score the same trained model).", "",
                  _markdown(variants), ""]
    costs = cost_table(records)
    if costs is not None:
        lines += ["### Measured FLOPs that differ from the analytic figure", "",
                  f"Runs whose forward FLOPs per byte, counted window by window, differ by more than {COST_TOLERANCE:.0%} "
                  "from the analytic figure at the training-split rates (what budgets use): on the scored test windows "
                  "under the evaluation rule (the inference cost the plot uses), or on training windows (the budget's "
                  "check). Matched-inference sizing uses the training-split figure.", "", _markdown(costs), ""]
    padding = padding_table(records)
    if padding is not None:
        batches = ", ".join(sorted({str(r.eval.batch_windows) for r in records}))
        lines += ["### Padding in batched evaluation", "",
                  "FLOPs here count useful work: each test window's forward on its own, with its own unit count. "
                  f"The evaluator runs batches of {batches} windows, padded to the longest unit count (tokens, "
                  "patches, chunks) in the batch; counted the same way over those batches, it computed this much more:",
                  "", _markdown(padding), ""]
    sizing = sizing_table(records)
    if sizing is not None:
        lines += ["### Sizing to the inference cost", "", _markdown(sizing), ""]
    calibration = calibration_tables(records)
    if calibration:
        lines += ["### Calibration after training", ""]
        for adapter, table in calibration.items():
            lines += [f"Adapter `{adapter}`:", "", table.to_markdown(index=False, floatfmt=".4g"), ""]
    return lines


def plot_lines(label: str, records: list[RunRecord], plots: dict[str, str], plot_dir: Path,
               colours: dict[str, tuple]) -> list[str]:
    lines = [
        "### Plots",
        "",
        f"![test bpb against training FLOPs](plots/{plots['bpb_vs_flops']})",
        "",
        f"![test bpb against forward FLOPs per byte](plots/{plots['bpb_vs_inference_flops']})",
        "",
        f"![learning curves](plots/{plots['learning_curves']})",
        "",
    ]
    if plot_patch_sizes(records, plot_dir / plots["patch_sizes"], colours):
        lines += [f"![patch sizes per patcher, training split](plots/{plots['patch_sizes']})", ""]
    if plot_chunk_lengths(records, plot_dir / plots["chunk_lengths"], colours):
        lines += [f"![chunk lengths on the test windows](plots/{plots['chunk_lengths']})", ""]
    lines += plot_segmentation_examples(records, plot_dir, label, colours)
    return lines
