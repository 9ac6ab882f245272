"""Markdown report and plots from a suite's records. Every figure comes from a
record in RESULTS_DIR (suite.json and runs/*/record.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from harness.analysis import fits as scaling, stats
from harness.analysis.plotting import save_plot
from harness.analysis.tables import markdown as _markdown
from harness.run.references import primed_with
from harness.errors import HarnessError
from harness.analysis.segment import Segmentation, plot_segmentation, segmentation_threshold
from harness.analysis.tuning_report import tuning_section
from harness.run.records import RunFailure, RunRecord, read_failures, read_suite_records
from harness.run.spec import InferenceScaling


COST_TOLERANCE = 0.02  # measured FLOPs further than this from the analytic figure are shown


def model_colours(names) -> dict[str, tuple]:
    """One colour per model name, the same in every plot of a report: the names sorted, then
    matplotlib's tab10 (tab20 beyond ten models) in that order."""
    names = sorted(set(names))
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: palette(i % palette.N) for i, name in enumerate(names)}


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
    or bootstrap over windows for a single run)."""
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
            "fwd FLOPs/byte": runs[0].flops_per_byte.analytic["total"], "bytes/unit": runs[0].bytes_per_unit,
            "_low": low, "_high": high, "_test_flops": _mean_test_cost(runs),
        })
    return pd.DataFrame(rows)


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
    return pd.DataFrame(rows)


def model_kinds(records: list[RunRecord]) -> dict[str, str]:
    """Model name -> "tokenized" (records with tokenizer metrics) or "tokenizer-free"."""
    return {r.model.name: "tokenized" if r.tokenizer else "tokenizer-free" for r in records}


def _against(row: pd.Series, name: str, detail: str = "") -> str:
    """How far a ranking row is behind the best, with the verdict, p and test (and its caveat)."""
    return (f"{row['Δ vs best']:.4f} bpb ahead of {name} "
            f"({detail}{row['vs best']}, p = {row['p']:.3g}, {_with_caveat(row['test'])})")


def summary_sentences(ranking: pd.DataFrame, kinds: dict[str, str], corpus: dict | None = None) -> list[str]:
    """One generated sentence per budget, saying each fact once: who leads and by how much over
    the runner-up; over the best model of the other kind (tokenized / tokenizer-free) when
    that is not the runner-up; and where the best compressor primed with the training split
    stands (none for a record without primed references)."""
    lines = []
    for budget, group in ranking.groupby("budget"):
        best = group.iloc[0]
        both_kinds = len({kinds.get(m) for m in group["model"]}) > 1
        kind = f" ({kinds[best['model']]})" if both_kinds else ""
        sentence = f"- At {budget:.3g} training FLOPs, **{best['model']}**{kind} leads with {best['test bpb']:.4f} bpb"
        clauses = []
        if len(group) > 1:
            second = group.iloc[1]
            other = f" ({kinds[second['model']]})" if both_kinds and kinds[second["model"]] != kinds[best["model"]] else ""
            clauses.append(_against(second, f"{second['model']}{other}"))
            rivals = group[[kinds.get(m) != kinds.get(best["model"]) for m in group["model"]]]
            if both_kinds and rivals.iloc[0]["model"] != second["model"]:  # the best of the other kind, if not said
                rival = rivals.iloc[0]
                clauses.append(_against(rival, f"the best {kinds[rival['model']]} model, {rival['model']}",
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
    """Fraction of chunks of each length, one line per model; counts[i] = chunks of i bytes.
    A curve's key is the model name or (name, label shown). Returns False, drawing nothing,
    when there is no curve."""
    if not curves:
        return False
    colours = colours or model_colours(k[0] if isinstance(k, tuple) else k for k in curves)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, counts in curves.items():
        name, label = key if isinstance(key, tuple) else (key, key)
        counts = np.asarray(counts, dtype=float)
        lengths = np.arange(len(counts))
        mean = (lengths * counts).sum() / counts.sum()
        ax.plot(lengths[1:], counts[1:] / counts.sum(), marker="o", markersize=3, linewidth=1, color=colours[name],
                label=f"{label} (mean {mean:.2f} B)")
    save_plot(fig, ax, "chunk length (bytes)", "fraction of chunks", title, path, legend_size=7)
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
    """Per model and target (first run of each): configured and chosen width/depth, target and
    achieved cost; a budget column when the targets differ between budgets (a scaling rule)."""
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


def calibration_table(records: list[RunRecord]) -> pd.DataFrame | None:
    """Scalar facts that adapters computed after training (e.g. ByteFlow's threshold)."""
    rows = [{"run": r.run_id, **{k: v for k, v in r.calibration.items() if isinstance(v, (int, float, str))}}
            for r in records if r.calibration]
    return pd.DataFrame(rows) if rows else None


def plot_bpb(summary: pd.DataFrame, x: str, xlabel: str, title: str, path: Path, connect: bool,
             colours: dict[str, tuple] | None = None) -> None:
    """Test bpb (95% intervals) against column `x` of the summary, one series per model;
    `connect` joins a model's budgets with a line, otherwise each point is labelled with its
    budget (several budgets of a model share its colour and may share its x)."""
    colours = colours or model_colours(summary["model"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, group in summary.groupby("model"):
        group = group.sort_values("budget")
        errors = [group["test bpb"] - group["_low"], group["_high"] - group["test bpb"]]
        ax.errorbar(group[x], group["test bpb"], yerr=errors, marker="o", capsize=3, label=model,
                    linestyle="-" if connect else "none", color=colours[model])
        if not connect:
            for px, py, budget in zip(group[x], group["test bpb"], group["budget"]):
                ax.annotate(f"C={budget:.2g}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=6,
                            color=colours[model])
    ax.set_xscale("log")
    save_plot(fig, ax, xlabel, "test bits per byte", title, path, legend_size=8)


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


def build_report(results_dir: Path, report_dir: Path) -> str:
    """The markdown report; its plots are written to report_dir/plots, the folder
    the markdown will sit in (so its image links are relative)."""
    suite_file = results_dir / "suite.json"
    if not suite_file.exists():
        raise HarnessError(f"{results_dir}: no suite.json (run `harness run SUITE` first)")
    try:
        suite = json.loads(suite_file.read_text())
    except ValueError:  # also UnicodeDecodeError
        suite = None
    if not isinstance(suite, dict) or not {"suite", "corpora"} <= suite.keys():
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
    rankings = {label: ranking_table(runs) for label, runs in by_corpus.items()}
    colours = model_colours(r.model.name for r in records)  # one colour per model in every plot
    lines = [
        f"# Suite `{spec['name']}`",
        "",
        (spec.get("description") or "").strip(),
        "",
        f"Split {spec['split']['train_bytes']:,} / {spec['split']['val_bytes']:,} / {spec['split']['test_bytes']:,} "
        f"bytes (train / val / test) of each corpus; test windows of {spec['eval']['window']} bytes, each scored from "
        f"an empty context. Device `{', '.join(sorted({r.device for r in records}))}`; " + _peak_sentence(records),
        "",
        "FLOPs: a multiply-add is 2; every matrix product counts (head and both attention products); "
        "training = 3 x forward. bpb = summed NLL in nats / (ln 2 x scored bytes). "
        + ("Auxiliary models (the BLT entropy model: its training, and its forward pass per byte) are **included** "
           "in the training FLOPs and budgets." if spec.get("count_auxiliary_flops", True) else
           "Auxiliary models (the BLT entropy model) are **excluded** from the training FLOPs and budgets, "
           "as in the BLT paper."),
        "",
    ]
    if spec.get("inference_flops_per_byte"):
        lines += [f"Matched inference cost: every model was sized to {spec['inference_flops_per_byte']:.3g} forward FLOPs "
                  "per byte (within 5%) by its main width, then depth (README, \"Matched inference cost\"); "
                  "the sizing table of each corpus lists what changed.", ""]
    if spec.get("inference_scaling"):
        rule = InferenceScaling(**spec["inference_scaling"])
        targets = ", ".join(f"{rule.target(b):.3g} at {b:.3g}" for b in sorted(spec["budgets"]))
        lines += [f"Inference cost grows with compute: at a budget of C training FLOPs every model was sized to "
                  f"{rule.describe()} forward FLOPs per byte (within 5%) by its main width, then depth (README, "
                  f"\"Matched inference cost\"): {targets}. The sizing table of each corpus lists what changed.", ""]
    fitted = {label: scaling.fit_records(runs, model_kinds(runs)) for label, runs in by_corpus.items()}
    lines += ["## Summary", ""]
    for label, ranking in rankings.items():
        crossing = scaling.summary_sentence(fitted[label])
        lines += [f"Corpus `{label}`:", "", *summary_sentences(ranking, model_kinds(by_corpus[label]),
                                                                suite["corpora"][label]),
                  *([crossing] if crossing else []), ""]
    if failures:
        lines += ["## Runs that did not finish", "",
                  "These runs have no bpb and are in no table below: a diverged run's training loss stopped being "
                  "finite (the last finite loss is nats per byte); a failed run stopped with the reason given. "
                  "`harness run SUITE --retry-failed` runs them again.", "",
                  _markdown(failure_table(failures)), ""]
    for label, runs in by_corpus.items():
        lines += corpus_section(label, runs, rankings[label], suite["corpora"][label], plot_dir, colours)
        lines += scaling.fits_section(fitted[label], label, plot_dir, colours, bool(spec.get("inference_scaling")))
    lines += tuning_section(results_dir, plot_dir)
    return "\n".join(lines)


def corpus_section(label: str, records: list[RunRecord], ranking: pd.DataFrame, corpus: dict, plot_dir: Path,
                   colours: dict[str, tuple] | None = None) -> list[str]:
    """The tables and plots of one corpus's runs, as markdown lines."""
    colours = colours or model_colours(r.model.name for r in records)
    summary = summary_table(records)
    plots = {name: f"{name}_{label}.png" for name in ("bpb_vs_flops", "bpb_vs_inference_flops", "learning_curves",
                                                      "patch_sizes", "chunk_lengths")}
    plot_bpb(summary, "budget", "training FLOPs (budget)", f"{label}: test bpb against training compute",
             plot_dir / plots["bpb_vs_flops"], connect=True, colours=colours)
    measured_cost = bool(summary["_test_flops"].notna().all())  # records before format 3 have the analytic figure only
    plot_bpb(summary, "_test_flops" if measured_cost else "fwd FLOPs/byte",
             "forward FLOPs per byte on the test windows (inference cost)" if measured_cost else
             "forward FLOPs per byte (inference cost)",
             f"{label}: test bpb against inference cost", plot_dir / plots["bpb_vs_inference_flops"], connect=False,
             colours=colours)
    plot_learning_curves(records, plot_dir / plots["learning_curves"], colours)
    refs = corpus["references"]
    reference = reference_table(refs)
    variants = variant_table(records)
    lines = [
        f"## Corpus `{label}`",
        "",
        f"Corpus id `{corpus['id']}`, sha256 `{corpus['sha256'][:16]}…`; {refs['windows']} test windows of "
        f"{refs['window']} bytes.",
        "",
        "### Test bpb per model and budget (95% intervals)",
        "",
        _markdown(summary.drop(columns=["_low", "_high"]).rename(columns={"_test_flops": "test fwd FLOPs/byte"})
                  if measured_cost else summary.drop(columns=["_low", "_high", "_test_flops"])),
        "",
        "### Ranking per budget",
        "",
        "Each model against the best of its budget: Welch's t-test over seeds where both have two or more, "
        "else a paired t-test over the shared test windows; p >= 0.05 is not significant. "
        "A p over windows (one seed) reflects sampling over test windows only: seed-to-seed training noise is not in it.",
        "",
        _markdown(ranking),
        "",
        "### Runs",
        "",
        _markdown(runs_table(records)),
        "",
        *epoch_cap_lines(records),
    ]
    tokenizers = tokenizer_table(records, corpus)
    if tokenizers is not None:
        lines += ["### Tokenizers (test split)", "", _markdown(tokenizers), "",
                  "Training time is that of the run that trained the tokenizer; later runs load it from the cache.", ""]
    lines += [
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
    sizing = sizing_table(records)
    if sizing is not None:
        lines += ["### Sizing to the inference cost", "", _markdown(sizing), ""]
    calibration = calibration_table(records)
    if calibration is not None:
        lines += ["### Calibration after training", "", calibration.to_markdown(index=False, floatfmt=".4g"), ""]
    lines += [
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
