"""Each run of a suite once: under its lock (runs/RUN_ID/run.lock), so processes that share a
results folder never train one run twice; skipped when its record exists with the same config
hash; taken from the finished tuning trial of the same config hash (the trial at the chosen
settings on a ladder budget and seed is that run: trained once, its record `trained_as` the
trial, its weights copied once their hash is checked); a run that diverges or fails with an
error that names its cause leaves runs/RUN_ID/failure.json (records.RunFailure) instead of a
record, and the suite goes on. In a process group (harness/run/distributed.py), rank 0 alone
takes the lock, decides and writes; the other ranks follow its decisions.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from harness.api import get as adapter_class
from harness.storage import file_damage, remove_hashed, replace_hashed, write_json_atomic
from harness.errors import HarnessError
from harness.run import distributed
from harness.run.device import Peak
from harness.run.distributed import log
from harness.run.pipeline import CorpusData, context, execute, prepare
from harness.run.checkpoint import WEIGHTS_FILE
from harness.run.records import RunFailure, RunRecord, read_failure, read_record, remove_temporaries, versions, write_record
from harness.run.spec import Run, Suite, budget_label
from harness.run.train import Diverged


def run_all(runs: list[Run], suite: Suite, corpora: dict[str, "CorpusData"], device: torch.device, peak: Peak,
            out: Path, show_progress: bool, save_every_s: float, retry_failed: bool, failures: list[RunFailure],
            tensorboard_dir: Path | None = None) -> None:
    """Every run in turn; runs another process holds are left for a second pass, then waited for."""
    held: list[tuple[int, Run]] = []
    for index, run in enumerate(runs, 1):
        if not attempt(run, index, len(runs), suite, corpora, device, peak, out, show_progress, save_every_s,
                       retry_failed, failures, wait=False, tensorboard_dir=tensorboard_dir):
            held.append((index, run))
    for index, run in held:
        attempt(run, index, len(runs), suite, corpora, device, peak, out, show_progress, save_every_s, retry_failed,
                failures, wait=True, tensorboard_dir=tensorboard_dir)


def check_shares(suite: Suite, ranks: int) -> None:
    """Across processes every rank trains on an equal share of each batch."""
    for i, entry in enumerate(suite.models):
        key, windows = (f"models[{i}].trainer.batch_windows", entry.trainer.batch_windows) if entry.trainer.batch_windows \
            else ("trainer.batch_windows", suite.trainer.batch_windows)
        if windows % ranks:
            raise HarnessError(f"{suite.source}: {key}: {windows} windows do not split evenly over {ranks} processes "
                               "(each process trains on an equal share of the batch)")


def attempt(run: Run, index: int, total: int, suite: Suite, corpora: dict[str, "CorpusData"], device: torch.device,
            peak: Peak, out: Path, show_progress: bool, save_every_s: float, retry_failed: bool,
            failures: list[RunFailure], wait: bool, tensorboard_dir: Path | None = None) -> bool:
    """Do one run unless it is done, or failed before (then add its marker to `failures`), under
    its lock. Returns False, doing nothing, if another process holds the run and not `wait`."""
    tag = f"[{index}/{total}] {run.run_id}"
    run_dir = out / "runs" / run.run_id
    config_hash = run.config_hash(suite)
    claimed = claim(run_dir, config_hash, retry_failed, tag, failures, wait) if distributed.is_main() else None
    decided = distributed.from_main(claimed if isinstance(claimed, bool) else None)  # None: train it
    if decided is not None:
        return decided
    try:
        log(f"{tag}: training")
        try:
            record = execute(run, suite, corpora[run.corpus.label], device, peak, config_hash, run_dir,
                             show_progress and distributed.is_main(), save_every_s,
                             tensorboard_dir / suite.name / run.run_id if tensorboard_dir is not None else None)
        except (Diverged, HarnessError) as e:
            if distributed.is_main():
                failure = record_failure(run, suite, config_hash, run_dir, e)
                failures.append(failure)
                log(f"{tag}: {describe(failure)}; the suite goes on")
            return True
        log(f"{tag}: val {record.val.bpb:.4f} bpb, test {record.test.bpb:.4f} bpb, "
            f"{record.wall_seconds:.1f}s, {record.achieved_flops_per_s / 1e9:.2f} GFLOP/s")
        return True
    finally:
        if isinstance(claimed, FileLock):
            claimed.release()


def claim(run_dir: Path, config_hash: str, retry_failed: bool, tag: str, failures: list[RunFailure],
          wait: bool) -> FileLock | bool:
    """The run's lock, held, with the run's folder cleared for training; or True if the run needs
    nothing (done, or failed before); or False if another process holds it and not `wait`."""
    if finished(run_dir, config_hash, retry_failed, tag, failures, "done already"):
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / "run.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            log(f"{tag}: another process is running it; coming back to it at the end")
            return False
        log(f"{tag}: waiting for the other process that is running it")
        lock.acquire()
    if finished(run_dir, config_hash, retry_failed, tag, failures, "done by another process", quiet=True):
        lock.release()
        return True
    remove_temporaries(run_dir)  # left by a process killed while writing; no one else writes here now
    (run_dir / "failure.json").unlink(missing_ok=True)
    return lock


def same_trial(run: Run, config_hash: str, out: Path) -> tuple[str, RunRecord] | None:
    """The finished tuning trial that is this run (its `config_hash`: the chosen settings, budget
    and seed), with its record; None when no trial is."""
    if run.tuning is None:
        return None
    for trial_id in run.tuning["trials"]:
        if not trial_id.endswith(f"__{budget_label(run.budget)}__s{run.seed}"):
            continue
        try:
            record = read_record(out / "tuning" / "runs" / trial_id / "record.json")
        except HarnessError:
            continue  # not finished, or unreadable: it is no run's result
        if record.config_hash == config_hash:
            return trial_id, record
    return None


def adopt_trials(runs: list[Run], suite: Suite, out: Path, retry_failed: bool) -> None:
    """Before the runs: each run that a finished tuning trial is (same config hash) is recorded as
    that trial, under the run's lock, unless it needs no attempt (its record, or a failure not to
    be retried), another process holds it, or the trial's weights do not match their recorded hash
    (then it trains)."""
    for run in runs:
        run_dir, config_hash = out / "runs" / run.run_id, run.config_hash(suite)
        if finished(run_dir, config_hash, retry_failed, run.run_id, [], None, quiet=True):
            continue  # the run's attempt says so
        found = same_trial(run, config_hash, out)
        if found is None:
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(run_dir / "run.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # the process that holds it decides
        try:
            if not finished(run_dir, config_hash, retry_failed, run.run_id, [], None, quiet=True):
                _take(run, run_dir, *found, out)
        finally:
            lock.release()


def _take(run: Run, run_dir: Path, trial_id: str, record: RunRecord, out: Path) -> None:
    weights = out / "tuning" / "runs" / trial_id / WEIGHTS_FILE
    damage = file_damage(weights)
    if damage:
        log(f"warning: {weights}: {damage}; {run.run_id} trains instead of taking its tuning trial's result")
        return
    remove_temporaries(run_dir)
    (run_dir / "failure.json").unlink(missing_ok=True)
    if weights.exists():
        copy = run_dir / f".{WEIGHTS_FILE}.tmp{os.getpid()}"  # a copy cut short is a temporary (remove_temporaries)
        shutil.copyfile(weights, copy)
        replace_hashed(copy, run_dir / WEIGHTS_FILE)
    write_record(run_dir / "record.json", record.model_copy(update={"run_id": run.run_id, "tuning": run.tuning,
                                                                    "trained_as": trial_id}))
    log(f"{run.run_id}: is tuning trial {trial_id} (same config), not trained again: val {record.val.bpb:.4f} "
        f"bpb, test {record.test.bpb:.4f} bpb")


def finished(run_dir: Path, config_hash: str, retry_failed: bool, tag: str, failures: list[RunFailure],
             done: str | None, quiet: bool = False) -> bool:
    """Whether the run needs no attempt: its record is there with this config, or it diverged or
    failed with this config and is not to be retried (its marker is added to `failures`). A
    record that cannot be read is run again, with a warning (unless `quiet`: said already). The
    skip is said as `done` (None: not said, nor a failure's)."""
    record_path = run_dir / "record.json"
    if record_path.exists():
        try:
            if read_record(record_path).config_hash == config_hash:
                if done is not None:
                    log(f"{tag}: {done}, skipped")
                return True
            if not quiet:
                log(f"{tag}: the suite changed since this record; running again")
        except HarnessError as e:
            if not quiet:
                log(f"warning: {e}; running {run_dir.name} again")
    failure = read_failure(run_dir / "failure.json")
    if failure is not None and failure.config_hash == config_hash and not retry_failed:
        failures.append(failure)
        if done is not None:
            log(f"{tag}: {describe(failure)} before, skipped (--retry-failed runs it again)")
        return True
    return False


def describe(failure: RunFailure) -> str:
    if failure.kind == "diverged":
        last = "none" if failure.last_finite_loss is None else f"{failure.last_finite_loss:.4g}"
        return f"diverged at step {failure.step} (last finite loss {last})"
    return f"failed: {failure.reason}"


def record_failure(run: Run, suite: Suite, config_hash: str, run_dir: Path, error: Exception) -> RunFailure:
    """runs/RUN_ID/failure.json for a run that stopped. A diverged run's training state goes
    too: resumed, it would only diverge again."""
    diverged = isinstance(error, Diverged)
    failure = RunFailure(
        kind="diverged" if diverged else "failed", suite=suite.name, run_id=run.run_id, config_hash=config_hash,
        model=run.model.name, adapter=run.model.adapter, budget_flops=run.budget, seed=run.seed,
        corpus=run.corpus.label, step=error.step if diverged else None,
        last_finite_loss=error.last_finite_loss if diverged else None, reason=str(error), versions=versions())
    write_json_atomic(run_dir / "failure.json", failure.model_dump(mode="json"))
    if diverged:
        remove_hashed(run_dir / "partial.pt")
    return failure


def failure_summary(failures: list[RunFailure], total: int, out: Path) -> str:
    """One line: which runs did not finish, and where to read why."""
    shown = "; ".join(f"{f.run_id} {describe(f)}" for f in failures[:3])
    more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
    return (f"{len(failures)} of {total} runs did not finish: {shown}{more} (failure.json in each run folder under "
            f"{out / 'runs'}; `harness run --retry-failed` tries them again); the other runs are done")


def warm_caches(suite: Suite, runs: list[Run], corpora: dict[str, CorpusData]) -> None:
    """Before a fan-out: the preparations that runs share through a cache (trained tokenizers),
    done once here rather than raced for by every job."""
    seen = set()
    for run in runs:
        key = (run.model.name, run.corpus.label)
        if key in seen or not adapter_class(run.model.adapter).cached_preparation:
            continue
        seen.add(key)
        prepare(run, suite, corpora[run.corpus.label], context(suite, run, torch.device("cpu")))
        log(f"prepared {run.model.name} on {run.corpus.label} once for every run (cached)")


