"""Run a suite: every (model, corpus, budget, seed) through the one trainer and evaluator
(harness/run/pipeline.py), one record per run. Resumable: a run whose record exists with the
same config hash is skipped; a record is written last and atomically, so an interrupted run
leaves no record and is simply run again (from its saved training state, if any).

Before the runs: the corpora and their reference rows (suite.json), the sizing check, tuning
(harness/orchestrate/tuning.py). Then the runs go one after another in this process
(harness/orchestrate/attempts.py), or out as submitit jobs (harness/orchestrate/dispatch.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from harness import RECORD_FORMAT_VERSION
from harness.storage import write_json_atomic
from harness.errors import HarnessError
from harness.orchestrate.attempts import check_shares, failure_summary, adopt_trials, finished, run_all, same_trial
from harness.orchestrate.dispatch import check_executor, dispatch, tune_as_jobs
from harness.orchestrate.suite import load_suite
from harness.orchestrate.tuning import apply_tuning, refresh_provenance, tune_suite
from harness.run import distributed
from harness.run.device import Peak, busy_machine_warning, load_average, measure_matmul_peak, pick_device
from harness.run.distributed import log
from harness.run.pipeline import CorpusData, context, load_corpus_data, prepare
from harness.run.records import RunFailure, versions
from harness.run.references import cached_references, raw_byte_metrics
from harness.run.sizing import TargetOutOfReach, size_to_target
from harness.run.spec import ExecutorSettings, Suite, expand
from harness.run.train import TENSORBOARD_MISSING, tensorboard_available


def run_suite(suite_path: str | Path, results_root: Path, device_name: str = "auto", show_progress: bool = True,
              save_every_s: float = 60.0, retry_failed: bool = False, dry_run: bool = False,
              tensorboard_dir: Path | None = None, executor: ExecutorSettings | None = None,
              threads: int | None = None) -> Path:
    """Every run of the suite that has no record yet; returns the suite's results folder. Raises
    a one-line HarnessError at the end if any run diverged or failed (the others are done). With
    `dry_run`, only write suite.json (corpora, reference rows) and say which runs are done. With
    `tensorboard_dir`, each run's training curves go to TENSORBOARD_DIR/SUITE/RUN_ID. With
    `executor`, the runs go out as submitit jobs after the shared preparation (harness.orchestrate.dispatch).
    `threads`: torch's CPU threads for training here and in each job (recorded in every record)."""
    suite = load_suite(suite_path)
    if threads is not None:
        torch.set_num_threads(threads)
    device = distributed.start(pick_device(device_name))
    check_shares(suite, distributed.world_size())
    if tensorboard_dir is not None and not tensorboard_available():
        log(f"warning: {TENSORBOARD_MISSING}")
        tensorboard_dir = None
    if executor is not None and not dry_run:  # before any corpus or reference is prepared
        check_executor(executor, device_name, suite)
    out = results_root / suite.name
    load = load_average()  # before the peak loads the machine itself
    peak = measure_matmul_peak(device)
    busy = busy_machine_warning(device, peak, load)
    if busy:
        log(busy)
    corpora = {corpus.label: load_corpus_data(suite, corpus.label, device) for corpus in suite.corpora}
    if suite.inference_target(suite.budgets[0]) is not None:  # before the reference rows, which take longer
        check_sizes(suite, corpora, device)
    if distributed.is_main():
        write_suite_summary(out, suite, corpora, device, peak)
    runs = expand(suite)
    if suite.tune is not None:  # each model's trainer settings chosen on validation first (harness.orchestrate.tuning)
        if executor is not None and not dry_run:
            tune_as_jobs(suite, out, executor, device_name, save_every_s, retry_failed, threads)
        runs = apply_tuning(runs, tune_suite(suite, out, corpora, device, peak, show_progress, save_every_s,
                                                dry_run, retry_failed))
        if not dry_run and distributed.is_main():
            refresh_provenance(runs, suite, out)
            adopt_trials(runs, suite, out, retry_failed)
    failures: list[RunFailure] = []
    if dry_run:
        for index, run in enumerate(runs, 1):
            tag = f"[{index}/{len(runs)}] {run.run_id}"
            config_hash = run.config_hash(suite)
            if not finished(out / "runs" / run.run_id, config_hash, retry_failed, tag, failures, "done already"):
                trial = same_trial(run, config_hash, out)
                log(f"{tag}: " + (f"to take from tuning trial {trial[0]}, the same config (dry run)" if trial
                                  else "to run (dry run)"))
        return out
    if executor is not None:
        dispatch(suite, runs, corpora, out, executor, device_name, save_every_s, retry_failed, tensorboard_dir, threads)
        return out
    run_all(runs, suite, corpora, device, peak, out, show_progress, save_every_s, retry_failed, failures,
            tensorboard_dir)
    if failures and distributed.is_main():
        raise HarnessError(failure_summary(failures, len(runs), out))
    return out


def write_suite_summary(out: Path, suite: Suite, corpora: dict[str, CorpusData], device: torch.device,
                        peak: Peak) -> None:
    """suite.json: the suite as run, and per corpus its hash and the reference rows."""
    prime_bytes = suite.references.prime_bytes if suite.references is not None else None
    unset = {key for key in ("executor", "references", "factors", "holdout") if getattr(suite, key) is None}  # as before them
    write_json_atomic(out / "suite.json", {
        "format_version": RECORD_FORMAT_VERSION,
        "suite": suite.model_dump(mode="json", exclude=unset or None),
        "suite_file": suite._source,  # the file `harness run` was given (None for a suite built in code)
        "corpora": {label: {
            "id": c.splits.corpus_id, "sha256": c.splits.sha256,
            "references": cached_references(c.splits.train, c.test_windows, label, log, prime_bytes),
            "raw_bytes_tokenizer": raw_byte_metrics(c.splits.test),
        } for label, c in corpora.items()},
        "device": str(device),
        "matmul_peak_flops_per_s": peak.flops_per_s,
        "matmul_peak_range": [peak.low, peak.high],
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # harness/cli.py sets this or GOMP_SPINCOUNT,
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "openmp_wait_reason": os.environ.get("HARNESS_OPENMP_WAIT"),  # and says why here
        "versions": versions(),
    }, hashed=True)


def check_sizes(suite: Suite, corpora: dict[str, CorpusData], device: torch.device) -> None:
    """Before any training: every model can be sized to the suite's inference cost on every
    corpus (the first seed's preparation), so an impossible target fails at once. Under a
    scaling rule, the first budget's preparation is sized to every budget's target too (a run
    sizes its own preparation later; this only checks that each target is within reach). Also at
    --dry-run; a target out of reach is one line naming the suite file and its key."""
    try:
        _size_every_model(suite, corpora, device)
    except TargetOutOfReach as e:
        key = "inference_scaling" if suite.inference_scaling is not None else "inference_flops_per_byte"
        raise HarnessError(f"{suite.source}: {key}: {e}") from None


def _size_every_model(suite: Suite, corpora: dict[str, CorpusData], device: torch.device) -> None:
    for label, corpus in corpora.items():
        for run in expand(suite):
            if run.corpus.label != label or run.seed != suite.seeds[0] or run.budget != suite.budgets[0]:
                continue
            model, _, sizing = prepare(run, suite, corpus, context(suite, run, device), resize_model=False)
            log(f"sizing {label} {run.model.name}: {sizing['chosen']} -> {sizing['achieved_flops_per_byte']:.4g} "
                f"forward FLOPs/byte ({sizing['relative_error']:+.1%} of the target)")
            held = [suite.holdout.budget] if suite.holdout is not None and run.model.name in suite.holdout.rows else []
            for budget in sorted(set(suite.budgets + held) - {run.budget}):
                _, facts = size_to_target(model, suite.inference_target(budget), suite.eval.window,
                                          suite.count_auxiliary_flops, run.model.name, suite.sizing.widths)
                log(f"sizing {label} {run.model.name} at {budget:.3g} FLOPs: {facts['chosen']} -> "
                    f"{facts['achieved_flops_per_byte']:.4g} forward FLOPs/byte")


