"""Replay tuning methods on study_v2's three tuning budgets (issue 31), from its committed trials.

Training is deterministic given the run's config, so a trial that study_v2 ran is the trial any
method would run: the replay calls the harness's own search (harness.orchestrate.tuning:
tune_entries) with study_v2's suite and a trial function that reads the committed record instead
of training. A trial no record holds is listed as missing (the method would have had to train it).

Cost is counted two ways: the trials' own recorded wall time, and, since study_v2's tuning ran on a
busier machine than its ladder, each trial priced at its (model, budget) ladder run's mean wall
time, so that tuning and ladder are compared under the same conditions. A trial whose config hash
is a ladder run's (the chosen lr on a ladder budget and seed) is that run: the harness takes the
run from it (harness.orchestrate.attempts: adopt_trials), so what tuning adds to the study is the
other trials, the "added" columns.

    python results/tuning_method/replay.py   # writes results/tuning_method/replay.json and replay.md
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

from harness.orchestrate.suite import load_suite
from harness.orchestrate.tuning import apply_tuning, tune_entries
from harness.run.records import read_record
from harness.run.spec import expand

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "results" / "study_v2"
METHODS = {
    "fixed grid (study_v2)": {},
    "centred grid": {"grid": "centred"},
    "centred grid, confirm within 0.1 bpb": {"grid": "centred", "confirm_within": 0.1},
    "centred grid, confirm within 0.25 bpb": {"grid": "centred", "confirm_within": 0.25},
}
EARLY = 1 / 3  # where successive halving would rank the trials


def early_ranking() -> tuple[int, int, int]:
    """Successive halving under the cosine schedule: in how many of the searches (seed-0 trials of
    one model and budget) is the trial with the best final val bpb the best, or among the two best,
    by training bpb over the tenth of the run before EARLY of it (the last
    logged point before it where a short run logs none there)?"""
    searches = collections.defaultdict(dict)
    for path in (STUDY / "tuning" / "runs").glob("*__s0/record.json"):
        r = read_record(path)
        before = [p.train_bpb for p in r.loss_curve if p.step / r.steps <= EARLY]
        early = [p.train_bpb for p in r.loss_curve if EARLY - 0.1 <= p.step / r.steps <= EARLY] or before[-1:]
        searches[(r.model.name, r.budget_flops)][r.trainer.lr] = (sum(early) / len(early), r.val.bpb)
    first = two = 0
    for trials in searches.values():
        best = min(trials, key=lambda lr: trials[lr][1])
        ranked = sorted(trials, key=lambda lr: trials[lr][0])
        first, two = first + (ranked[0] == best), two + (best in ranked[:2])
    return len(searches), first, two


def trained_twice() -> list[tuple[str, float]]:
    """study_v2 trained each ladder run that a trial already was (same config hash) a second time:
    per such run, the larger of its val and test bpb differences from the trial."""
    trials = {}
    for path in (STUDY / "tuning" / "runs").glob("*/record.json"):
        record = read_record(path)
        trials[record.config_hash] = record
    gaps = []
    for path in sorted((STUDY / "runs").glob("*/record.json")):
        run = read_record(path)
        trial = trials.get(run.config_hash)
        if trial is not None:
            gaps.append((run.run_id, max(abs(run.val.bpb - trial.val.bpb), abs(run.test.bpb - trial.test.bpb))))
    return gaps


def ladder_seconds() -> dict:
    """Mean wall seconds of a ladder run per (model, budget)."""
    times = collections.defaultdict(list)
    for path in (STUDY / "runs").glob("*/record.json"):
        record = read_record(path)
        times[(record.model.name, record.budget_flops)].append(record.wall_seconds)
    return {key: sum(v) / len(v) for key, v in times.items()}


def replay(settings: dict, ladder: dict) -> dict:
    suite = load_suite(ROOT / "suites" / "study_v2.yaml")
    suite = suite.model_copy(update={"tune": suite.tune.model_copy(update=settings)})
    used, missing = [], []

    def trial_bpb(run, failures) -> float:
        path = STUDY / "tuning" / "runs" / run.run_id / "record.json"
        config_hash = run.config_hash(suite)
        if not path.exists():  # the method would train it: priced, and scored as losing here
            missing.append(run.run_id)
            used.append((run.model.name, run.budget, math.nan, config_hash))
            return math.nan
        record = read_record(path)
        assert record.config_hash == config_hash, run.run_id
        used.append((run.model.name, run.budget, record.wall_seconds, config_hash))
        return record.val.bpb

    entries = tune_entries(suite, trial_bpb)
    runs = {run.config_hash(suite) for run in apply_tuning(expand(suite), entries)}
    added = [trial for trial in used if trial[3] not in runs]  # the trials no ladder run is
    return {"settings": settings, "trials": len(used), "missing": missing, "ladder_runs": len(used) - len(added),
            "recorded_hours": _recorded(used), "ladder_priced_hours": _priced(used, ladder),
            "added_recorded_hours": _recorded(added), "added_ladder_priced_hours": _priced(added, ladder),
            "chosen": {f"{e['model']} {e['budget']:.1e}": [e["chosen"]["lr"], e["val_bpb"]] for e in entries}}


def _recorded(trials: list) -> float:
    return sum(seconds for _, _, seconds, _ in trials if not math.isnan(seconds)) / 3600


def _priced(trials: list, ladder: dict) -> float:
    return sum(ladder[(model, budget)] for model, budget, _, _ in trials) / 3600


def main() -> None:
    ladder = ladder_seconds()
    ladder_hours = sum(ladder.values()) * 3 / 3600  # 3 seeds per (model, budget)
    results = {name: replay(settings, ladder) for name, settings in METHODS.items()}
    base = results["fixed grid (study_v2)"]["chosen"]
    lines = [f"Ladder (study_v2's 180 runs): {ladder_hours:.2f} h of wall time.", "",
             "| method | trials | missing | recorded h | ladder-priced h | / ladder | ladder runs among them "
             "| added: recorded h | added: ladder-priced h | added / ladder | choices as study_v2 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        same = sum(r["chosen"][k][0] == base[k][0] for k in base)
        lines.append(f"| {name} | {r['trials']} | {len(r['missing'])} | {r['recorded_hours']:.2f} | "
                     f"{r['ladder_priced_hours']:.2f} | {r['ladder_priced_hours'] / ladder_hours:.2f}x | "
                     f"{r['ladder_runs']} | {r['added_recorded_hours']:.2f} | {r['added_ladder_priced_hours']:.2f} | "
                     f"{r['added_ladder_priced_hours'] / ladder_hours:.2f}x | {same} of {len(base)} |")
    twice = trained_twice()
    apart = sorted((gap, run_id) for run_id, gap in twice if gap > 0)
    lines += ["", f"Trained twice: {len(twice)} of study_v2's ladder runs have a trial's config hash; "
              f"{len(twice) - len(apart)} have the trial's val and test bpb exactly, "
              f"{sum(gap < 1e-4 for gap, _ in apart)} within 1e-4, and "
              + ", ".join(f"{run_id} by {gap:.3f}" for gap, run_id in apart if gap >= 1e-4) + "."]
    searches, first, two = early_ranking()
    lines += ["", "Missing: trials no record holds; the method would train them (they are priced at their ladder run "
              "and scored as losing here, so that row's choices are not final).", "",
              "Added: the trials that are no ladder run. A trial at the chosen lr on a ladder budget and seed has that "
              "run's config hash; `harness run` records the run from it instead of training it again.", "",
              f"Successive halving under the cosine schedule, ranked by training bpb at {EARLY:.2f} of the run: the "
              f"final best trial ranks first in {first} and among the two best in {two} of {searches} searches."]
    (Path(__file__).parent / "replay.json").write_text(json.dumps({"ladder_hours": ladder_hours, **results,
                                                                   "trained_twice": dict(twice),
                                                                   "early_ranking": [searches, first, two]}, indent=1))
    (Path(__file__).parent / "replay.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
