"""Tuning: each model at its own learning rate, chosen on validation bpb and bracketed.

A suite's `tune:` section names trial budgets, seeds and a starting grid of peak learning
rates (optionally warmup fractions and batch sizes, crossed with it). For every model (on
every corpus, at every tuning budget) each grid point is an ordinary run: trained by the
one run's pipeline (harness/run/pipeline.py: execute), recorded under RESULTS/SUITE/tuning/runs/RUN_ID, skipped when its record
exists with the same config hash. A value is scored by its mean validation bpb over the
tuning seeds; test bpb is never read. When the best lr sits at an edge of the grid, the grid
is extended by `factor` past that edge, at most `max_extensions` times; an optimum still at
the edge stops the suite with a one-line error. With `confirm_seeds`, the `confirm_top` best
values are trained again on those seeds and the best mean over all seeds wins: on short runs
one seed's noise can otherwise pick a rate that is unstable on the next seed. The choices go
to tuning.json, and the suite's runs then train with them (the config hash includes the
chosen lr) and record which trials chose them; a finished run whose settings a new tuning
budget chose again keeps its result and has that provenance written into its record.

A trial that diverges or fails is recorded like any run (failure.json in its folder), scores as
losing (NaN), and the search goes on; a trial whose record cannot be read is trained again.
tuning.json carries its sha256 beside it; one that is damaged is rewritten by `harness run` and
said in one line by `--dry-run` and `harness report`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness.errors import HarnessError
from harness.orchestrate.attempts import describe, record_failure
from harness.run.distributed import log
from harness.run.pipeline import execute
from harness.run.records import RunFailure, read_failure, read_hashed_json, read_record, remove_temporaries, write_record
from harness.run.spec import Run, Suite, budget_label
from harness.run.train import Diverged
from harness.storage import write_json_atomic

TUNING_FILE = "tuning.json"


# ---- the search: a pure function of an objective ----------------------------------------------

@dataclass
class Search:
    scores: dict[float, float]  # value -> objective (lower is better)
    best: float
    extensions: int
    added: list[float] = field(default_factory=list)  # values the extensions added, in order


def _key(score: float) -> float:
    return math.inf if math.isnan(score) else score  # a diverged trial never wins


def bracketed_search(objective: Callable[[float], float], grid: list[float], factor: float = 3.0,
                     max_extensions: int = 2, what: str = "lr") -> Search:
    """Minimise `objective` over `grid` (positive values); while the best value is the smallest
    or largest one tried, try best / factor or best * factor, at most `max_extensions` times.
    Raises HarnessError when the best value is still at an edge."""
    if len(set(grid)) < 2 or factor <= 1:
        raise HarnessError(f"a bracketed search needs at least 2 distinct {what} values and a factor above 1")
    scores = {v: objective(v) for v in sorted(set(grid))}
    added: list[float] = []
    while True:
        values = sorted(scores)
        best = min(values, key=lambda v: _key(scores[v]))
        if not math.isfinite(_key(scores[best])):
            raise HarnessError(f"every {what} in {_fmt(values)} gave a non-finite objective")
        if values[0] < best < values[-1]:
            return Search(scores, best, len(added), added)
        if len(added) >= max_extensions:
            side = "largest" if best == values[-1] else "smallest"
            raise HarnessError(f"the best {what} {best:.3g} is still the {side} of {_fmt(values)} after "
                               f"{len(added)} extension(s); widen the grid or raise tune.max_extensions")
        new = best * factor if best == values[-1] else best / factor
        scores[new] = objective(new)
        added.append(new)


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


# ---- tuning a suite ---------------------------------------------------------------------------

class TrialRun(Run):
    """A tuning trial: an ordinary run whose id names its trial settings."""

    label: str

    @property
    def run_id(self) -> str:
        prefix = f"{self.corpus.label}__" if self.name_corpus else ""
        label = self.label.replace("+", "")  # lr1.00e00 for 1.0, as in budget labels
        return f"tune__{prefix}{self.model.name}__{label}__{budget_label(self.budget)}__s{self.seed}"


def trial_label(settings: dict) -> str:
    parts = [f"lr{settings['lr']:.2e}"]
    if "warmup_fraction" in settings:
        parts.append(f"wu{settings['warmup_fraction']:g}")
    if "batch_windows" in settings:
        parts.append(f"b{settings['batch_windows']}")
    return "__".join(parts)


def tune_suite(suite: Suite, out: Path, corpora: dict, device, peak, show_progress: bool = False,
               save_every_s: float = 60.0, dry_run: bool = False, retry_failed: bool = False) -> list[dict]:
    """Run (or reuse) every tuning trial and write out/tuning.json. Returns its entries, one per
    (corpus, model, tuning budget): trials, the chosen settings, how often the grid was extended.
    With `dry_run`, trains nothing and returns the entries of an existing tuning.json (or none).
    A trial that failed before is not tried again unless `retry_failed`."""
    tune = suite.tune
    if dry_run:
        return _entries_for_a_dry_run(out, tune)
    entries = tune_entries(suite, trial_scorer(suite, out, corpora, device, peak, show_progress, save_every_s,
                                               retry_failed))
    write_json_atomic(out / TUNING_FILE, {"selected_on": "val", "settings": tune.recorded(),
                                          "entries": entries}, hashed=True)
    return entries


def trial_scorer(suite: Suite, out: Path, corpora: dict, device, peak, show_progress: bool, save_every_s: float,
                 retry_failed: bool) -> Callable[[TrialRun, list[RunFailure]], float]:
    """Scores one trial: its val bpb, from its record or trained now (_val_bpb)."""
    def trial(run: TrialRun, failures: list[RunFailure]) -> float:
        return _val_bpb(run, suite, out, corpora[run.corpus.label], device, peak, show_progress, save_every_s,
                        retry_failed, failures)
    return trial


def tune_entries(suite: Suite, trial_bpb: Callable[[TrialRun, list[RunFailure]], float]) -> list[dict]:
    """The tuning entries of every (corpus, model, tuning budget), budgets in increasing order (a
    centred grid starts from the previous budget's choice); `trial_bpb` scores one trial."""
    return [e for corpus in suite.corpora for entry in suite.rows for e in tune_row(suite, corpus, entry, trial_bpb)]


def tune_row(suite: Suite, corpus, entry, trial_bpb: Callable[[TrialRun, list[RunFailure]], float]) -> list[dict]:
    """The tuning entries of one model on one corpus, one per tuning budget, smallest first. Rows
    are independent of each other: the unit that tuning fans out in (harness.orchestrate.dispatch)."""
    entries, previous = [], None
    for budget in sorted(suite.tune.budgets):
        entries.append(_tune_model(suite, corpus, entry, budget, trial_bpb, previous))
        previous = entries[-1]["chosen"]["lr"]
    holdout = suite.holdout
    if holdout is not None and holdout.tune_budget is not None and entry.name in holdout.rows:
        entries.append(_tune_model(suite, corpus, entry, holdout.tune_budget, trial_bpb, previous) | {"holdout": True})
    return entries


def lr_grid(tune, previous: float | None) -> list[float]:
    """The starting lr values of one search: the suite's grid, or with `grid: centred` and a choice
    at the previous budget, that choice and its neighbours on the grid. Past the grid's ends a
    neighbour is the choice x or / `factor`, as an extension computes it, so a trial an extension
    ran before is found again by its config hash."""
    if tune.grid == "fixed" or previous is None:
        return list(tune.lr)
    lattice = sorted(tune.lr)
    below = max((v for v in lattice if v < previous), default=previous / tune.factor)
    above = min((v for v in lattice if v > previous), default=previous * tune.factor)
    return [below, previous, above]


def _entries_for_a_dry_run(out: Path, tune) -> list[dict]:
    try:
        existing = read_tuning(out)
    except HarnessError as e:
        log(f"tuning: {e}; the runs below show untuned settings (dry run)")
        return []
    if existing is None:
        log("tuning: no tuning.json yet; the runs below show untuned settings (dry run)")
        return []
    stale = existing["settings"] != tune.recorded()
    log("tuning: using the choices in tuning.json (dry run)" + (
        "; it was made for other tune: settings, so a real run tunes again first and the runs "
        "below may change" if stale else ""))
    return existing["entries"]


def _tune_model(suite: Suite, corpus, entry, budget: float,
                trial_bpb: Callable[[TrialRun, list[RunFailure]], float], previous: float | None = None) -> dict:
    """The tuning entry of one (corpus, model, budget): the bracketed search over lr for each
    combination of the other settings, confirmed on fresh seeds when the suite asks. `previous`:
    the lr chosen at the next smaller tuning budget, where a centred grid starts."""
    tune = suite.tune
    others = {k: v for k, v in (("warmup_fraction", tune.warmup_fraction), ("batch_windows", tune.batch_windows)) if v}
    base = suite.trainer.model_copy(update=entry.trainer.model_dump(exclude_none=True))
    grid = lr_grid(tune, previous)
    best, trials, failures = None, [], []
    for combo in itertools.product(*others.values()):
        fixed = dict(zip(others, combo))

        def val_bpbs(lr: float, seeds: list[int], fixed=fixed) -> float:
            """Train (or reuse) the trial at `lr` on `seeds`; its entry keeps every seed scored so
            far, and the mean over them is its score."""
            settings = {"lr": lr, **fixed}
            trial = next((t for t in trials if all(t[k] == v for k, v in settings.items())), None)
            if trial is None:
                trial = {**settings, "run_ids": [], "val_bpb_per_seed": []}
                trials.append(trial)
            for seed in seeds:
                run = TrialRun(suite=suite.name, corpus=corpus, model=entry, budget=budget, seed=seed,
                               trainer=base.model_copy(update=settings), label=trial_label(settings),
                               name_corpus=len(suite.corpora) > 1)
                trial["run_ids"].append(run.run_id)
                failed = len(failures)
                trial["val_bpb_per_seed"].append(trial_bpb(run, failures))
                if len(failures) > failed:
                    trial.setdefault("failed", []).append(f"{run.run_id} {describe(failures[-1])}")
            trial["val_bpb"] = sum(trial["val_bpb_per_seed"]) / len(trial["val_bpb_per_seed"])
            return trial["val_bpb"]

        what = f"{corpus.label} {entry.name} at {budget:.2e} FLOPs" + "".join(f", {k} {v}" for k, v in fixed.items())
        try:
            search = bracketed_search(lambda lr: val_bpbs(lr, tune.seeds), grid, tune.factor, tune.max_extensions,
                                      what="lr")
        except HarnessError as e:
            why = f" (first: {failures[0].run_id} {describe(failures[0])})" if failures else ""
            raise HarnessError(f"tuning {what}: {e}{why}") from None
        scores = search.scores
        if tune.confirm_seeds:  # the front-runners again on fresh seeds; the mean over all decides
            top = _front_runners(scores, tune)
            if len(top) > 1:
                scores = {lr: val_bpbs(lr, tune.confirm_seeds) for lr in top}
        lr = min(scores, key=lambda v: _key(scores[v]))
        if best is None or _key(scores[lr]) < _key(best[1]):
            best = ({"lr": lr, **fixed}, scores[lr], search.extensions)
    for trial in trials:
        trial["extension"] = trial["lr"] not in grid
        trial["confirmed"] = len(trial["run_ids"]) > len(tune.seeds)
    chosen, score, extensions = best
    log(f"tuning {corpus.label} {entry.name} at {budget:.2e} FLOPs: chose " + ", ".join(f"{k} {v:.3g}" for k, v in chosen.items())
        + f" (val {score:.4f} bpb, {len(trials)} trials, {extensions} extension(s))")
    return {"corpus": corpus.label, "model": entry.name, "budget": budget, "seeds": list(tune.seeds),
            "confirm_seeds": list(tune.confirm_seeds),
            "trials": sorted(trials, key=lambda t: tuple(t[k] for k in ("lr", *others))),
            "chosen": chosen, "val_bpb": score, "extensions": extensions,
            "untuned": {"lr": base.lr} | {k: getattr(base, k) for k in others}}


def _front_runners(scores: dict[float, float], tune) -> list[float]:
    """The values the confirm seeds train again: the best `confirm_top`, and with `confirm_within`
    only those that close to the best (a clear winner needs no second seed)."""
    top = sorted(scores, key=lambda v: _key(scores[v]))[:tune.confirm_top]
    if tune.confirm_within is None:
        return top
    return [v for v in top if _key(scores[v]) <= _key(scores[top[0]]) + tune.confirm_within]


def _val_bpb(run: TrialRun, suite: Suite, out: Path, corpus, device, peak, show_progress: bool,
             save_every_s: float, retry_failed: bool, failures: list[RunFailure]) -> float:
    """The trial's validation bpb: from its record when it is done with this config, else trained
    now. A trial that diverges or fails (now, or before and not retried) is added to `failures`
    and scores NaN, which never wins."""
    run_dir = out / "tuning" / "runs" / run.run_id
    config_hash = run.config_hash(suite)
    record_path = run_dir / "record.json"
    if record_path.exists():
        try:
            record = read_record(record_path)
        except HarnessError as e:
            log(f"warning: {e}; running {run.run_id} again")
        else:
            if record.config_hash == config_hash:
                log(f"tuning {run.run_id}: done already, skipped")
                return record.val.bpb
    failure = read_failure(run_dir / "failure.json")
    if failure is not None and failure.config_hash == config_hash and not retry_failed:
        failures.append(failure)
        log(f"tuning {run.run_id}: {describe(failure)} before, scored as losing (--retry-failed runs it again)")
        return math.nan
    if run_dir.is_dir():
        remove_temporaries(run_dir)
        (run_dir / "failure.json").unlink(missing_ok=True)
    log(f"tuning {run.run_id}: training")
    try:
        record = execute(run, suite, corpus, device, peak, config_hash, run_dir, show_progress, save_every_s)
    except (Diverged, HarnessError) as e:
        failure = record_failure(run, suite, config_hash, run_dir, e)
        failures.append(failure)
        log(f"tuning {run.run_id}: {describe(failure)}; scored as losing, the search goes on")
        return math.nan
    log(f"tuning {run.run_id}: val {record.val.bpb:.4f} bpb")
    return record.val.bpb


def read_tuning(out: Path) -> dict | None:
    """tuning.json's contents, or None when there is none; a one-line HarnessError when it is damaged
    (its hash differs) or is not a tuning file."""
    path = out / TUNING_FILE
    if not path.exists():
        return None
    remedy = "`harness run` on the suite writes it again"
    tuning = read_hashed_json(path, remedy)
    if not isinstance(tuning.get("settings"), dict) or not isinstance(tuning.get("entries"), list):
        raise HarnessError(f"{path}: not a tuning file (no settings and entries); {remedy}")
    return tuning


def apply_tuning(runs: list[Run], entries: list[dict]) -> list[Run]:
    """Each run with its model's chosen settings from the tuning budget nearest its own (in log
    FLOPs), and the provenance: which trials chose them, on which split. The entries tuned for a
    held-out rung (Suite.holdout) serve its runs only."""
    tuned = []
    for run in runs:
        candidates = [e for e in entries if e["model"] == run.model.name and e["corpus"] == run.corpus.label
                      and (run.held_out or not e.get("holdout"))]  # a held-out rung's tuning is its own
        if not candidates:
            tuned.append(run)
            continue
        entry = min(candidates, key=lambda e: abs(math.log(e["budget"] / run.budget)))
        provenance = {"chosen": entry["chosen"], "budget": entry["budget"], "seeds": entry["seeds"],
                      "confirm_seeds": entry.get("confirm_seeds", []),
                      "val_bpb": entry["val_bpb"], "extensions": entry["extensions"], "selected_on": "val",
                      "trials": [i for t in entry["trials"] for i in t["run_ids"]]}
        tuned.append(run.model_copy(update={"trainer": run.trainer.model_copy(update=entry["chosen"]),
                                            "tuning": provenance}))
    return tuned


def refresh_provenance(runs: list[Run], suite: Suite, out: Path) -> None:
    """A finished run whose chosen settings are unchanged but now come from other trials (a
    tuning budget was added nearer its own) keeps its result: only its record's `tuning` field
    is rewritten, so no record names trials that no longer chose it."""
    for run in runs:
        path = out / "runs" / run.run_id / "record.json"
        if run.tuning is None or not path.exists():
            continue
        try:
            record = read_record(path)
        except HarnessError:
            continue  # the runner says so and runs it again
        if record.config_hash == run.config_hash(suite) and record.tuning != run.tuning:
            write_record(path, record.model_copy(update={"tuning": run.tuning}))
            log(f"{run.run_id}: tuning provenance updated (settings chosen again at "
                       f"{run.tuning['budget']:.2e} FLOPs; result unchanged)")
