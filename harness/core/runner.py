"""Run a suite: every (model, corpus, budget, seed) through the one trainer and evaluator,
one record per run. Resumable: a run whose record exists with the same config hash is
skipped; a record is written last and atomically, so an interrupted run leaves no record
and is simply run again (from its saved training state, if any).

A run goes through five named steps: prepare (build the adapter, fit it to the training
split, size it), plan (its budget in optimizer steps), train, evaluate, write.

A run that diverges (its training loss stops being finite) or fails with an error that
names its cause leaves runs/RUN_ID/failure.json (records.RunFailure) instead of a record,
and the suite goes on; such a run is skipped later unless `retry_failed`. Each run is
done under a lock (runs/RUN_ID/run.lock), so processes that share a results folder never
train one run twice: a run another process holds is left for later, then waited for.

With an executor (harness.core.dispatch), the runs go out as submitit jobs after the shared
preparation; each job goes through the same steps under the same lock. In a process group
(harness.core.distributed: one run across processes), rank 0 alone takes the lock, decides
and writes; the other ranks follow its decisions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from tqdm import tqdm

from harness import RECORD_FORMAT_VERSION
from harness.analysis.references import cached_references, raw_byte_metrics
from harness.analysis.segment import segment_bytes
from harness.api import Adapter, Preparation, RunContext, build, get as adapter_class
from harness.core import data, distributed
from harness.core.device import Peak, busy_machine_warning, load_average, measure_matmul_peak, pick_device
from harness.core.evaluate import evaluate
from harness.core.records import (CorpusFacts, EpochCap, FlopsPerByte, ModelSpec, PreparationFacts, RunFailure,
                                  RunRecord, SegmentationExample, read_failure, read_record, remove_temporaries,
                                  save_checkpoint_atomic, versions, write_json_atomic, write_record)
from harness.core.sizing import resize, size_to_target
from harness.core.suite import ExecutorSettings, Run, Suite, expand, load_corpus, load_suite
from harness.core.train import TENSORBOARD_MISSING, Diverged, tensorboard_available, tensorboard_writer, train
from harness.errors import HarnessError
from harness.modeling import chunking
from harness.modeling.flops import measure_forward, training_flops_per_byte, training_steps

FLOP_CHECK_WINDOWS = 64  # training windows the analytic FLOPs per byte are checked on
FLOP_TOLERANCE = 0.02  # a larger gap between counted and analytic FLOPs is flagged


def log(message: str) -> None:
    if distributed.is_main():  # one voice for a run trained across processes
        tqdm.write(message)


@dataclass(frozen=True)
class CorpusData:
    splits: data.Splits
    val_windows: torch.Tensor
    test_windows: torch.Tensor


def run_suite(suite_path: str | Path, results_root: Path, device_name: str = "auto", show_progress: bool = True,
              save_every_s: float = 60.0, retry_failed: bool = False, dry_run: bool = False,
              tensorboard_dir: Path | None = None, executor: ExecutorSettings | None = None,
              threads: int | None = None) -> Path:
    """Every run of the suite that has no record yet; returns the suite's results folder. Raises
    a one-line HarnessError at the end if any run diverged or failed (the others are done). With
    `dry_run`, only write suite.json (corpora, reference rows) and say which runs are done. With
    `tensorboard_dir`, each run's training curves go to TENSORBOARD_DIR/SUITE/RUN_ID. With
    `executor`, the runs go out as submitit jobs after the shared preparation (harness.core.dispatch).
    `threads`: torch's CPU threads for training here and in each job (recorded in every record)."""
    suite = load_suite(suite_path)
    if threads is not None:
        torch.set_num_threads(threads)
    device = distributed.start(pick_device(device_name))
    check_shares(suite, distributed.world_size())
    if tensorboard_dir is not None and not tensorboard_available():
        log(f"warning: {TENSORBOARD_MISSING}")
        tensorboard_dir = None
    out = results_root / suite.name
    load = load_average()  # before the peak loads the machine itself
    peak = measure_matmul_peak(device)
    busy = busy_machine_warning(device, peak, load)
    if busy:
        log(busy)
    corpora = {corpus.label: load_corpus_data(suite, corpus.label, device) for corpus in suite.corpora}
    if distributed.is_main():
        write_suite_summary(out, suite, corpora, device, peak)
    if suite.inference_target(suite.budgets[0]) is not None and not dry_run:
        check_sizes(suite, corpora, device)
    runs = expand(suite)
    if suite.tune is not None:  # each model's trainer settings chosen on validation first (harness.core.tuning)
        from harness.core.tuning import apply_tuning, refresh_provenance, tune_suite

        runs = apply_tuning(runs, tune_suite(suite, out, corpora, device, peak, show_progress, save_every_s, dry_run))
        if not dry_run and distributed.is_main():
            refresh_provenance(runs, suite, out)
    failures: list[RunFailure] = []
    if dry_run:
        for index, run in enumerate(runs, 1):
            tag = f"[{index}/{len(runs)}] {run.run_id}"
            if not finished(out / "runs" / run.run_id, run.config_hash(suite), retry_failed, tag, failures, "done already"):
                log(f"{tag}: to run (dry run)")
        return out
    if executor is not None:
        from harness.core.dispatch import dispatch

        dispatch(suite, runs, corpora, out, executor, device_name, save_every_s, retry_failed, tensorboard_dir, threads)
        return out
    run_all(runs, suite, corpora, device, peak, out, show_progress, save_every_s, retry_failed, failures,
            tensorboard_dir)
    if failures and distributed.is_main():
        raise HarnessError(failure_summary(failures, len(runs), out))
    return out


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


def finished(run_dir: Path, config_hash: str, retry_failed: bool, tag: str, failures: list[RunFailure],
             done: str, quiet: bool = False) -> bool:
    """Whether the run needs no attempt: its record is there with this config, or it diverged or
    failed with this config and is not to be retried (its marker is added to `failures`). A
    record that cannot be read is run again, with a warning (unless `quiet`: said already)."""
    record_path = run_dir / "record.json"
    if record_path.exists():
        try:
            if read_record(record_path).config_hash == config_hash:
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
        (run_dir / "partial.pt").unlink(missing_ok=True)
    return failure


def failure_summary(failures: list[RunFailure], total: int, out: Path) -> str:
    """One line: which runs did not finish, and where to read why."""
    shown = "; ".join(f"{f.run_id} {describe(f)}" for f in failures[:3])
    more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
    return (f"{len(failures)} of {total} runs did not finish: {shown}{more} (failure.json in each run folder under "
            f"{out / 'runs'}; `harness run --retry-failed` tries them again); the other runs are done")


def load_corpus_data(suite: Suite, label: str, device: torch.device) -> CorpusData:
    splits = load_corpus(suite, label)
    log(f"suite {suite.name}: corpus {splits.corpus_id} sha256 {splits.sha256[:12]}, "
        f"train/val/test {len(splits.train)}/{len(splits.val)}/{len(splits.test)} bytes, device {device}")
    test_windows = data.windows(splits.test, suite.eval.window, suite.eval.max_windows)
    val_windows = data.windows(splits.val, suite.eval.window, suite.eval.max_windows)
    if len(test_windows) == 0 or len(val_windows) == 0:
        raise HarnessError(f"eval.window {suite.eval.window} is longer than the val or test split of {label}")
    return CorpusData(splits, val_windows, test_windows)


def write_suite_summary(out: Path, suite: Suite, corpora: dict[str, CorpusData], device: torch.device,
                        peak: Peak) -> None:
    """suite.json: the suite as run, and per corpus its hash and the reference rows."""
    prime_bytes = suite.references.prime_bytes if suite.references is not None else None
    unset = {key for key in ("executor", "references") if getattr(suite, key) is None}  # as suite.json was before them
    write_json_atomic(out / "suite.json", {
        "format_version": RECORD_FORMAT_VERSION,
        "suite": suite.model_dump(mode="json", exclude=unset or None),
        "corpora": {label: {
            "id": c.splits.corpus_id, "sha256": c.splits.sha256,
            "references": cached_references(c.splits.train, c.test_windows, label, log, prime_bytes),
            "raw_bytes_tokenizer": raw_byte_metrics(c.splits.test),
        } for label, c in corpora.items()},
        "device": str(device),
        "matmul_peak_flops_per_s": peak.flops_per_s,
        "matmul_peak_range": [peak.low, peak.high],
        "threads": torch.get_num_threads(),
        "versions": versions(),
    })


def context(suite: Suite, run: Run, device: torch.device) -> RunContext:
    return RunContext(window=suite.eval.window, seed=run.seed, device=device, budget_flops=run.budget,
                      count_auxiliary_flops=suite.count_auxiliary_flops, max_epochs=suite.max_epochs)


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


def check_sizes(suite: Suite, corpora: dict[str, CorpusData], device: torch.device) -> None:
    """Before any training: every model can be sized to the suite's inference cost on every
    corpus (the first seed's preparation), so an impossible target fails at once. Under a
    scaling rule, the first budget's preparation is sized to every budget's target too (a run
    sizes its own preparation later; this only checks that each target is within reach)."""
    for label, corpus in corpora.items():
        for run in expand(suite):
            if run.corpus.label != label or run.seed != suite.seeds[0] or run.budget != suite.budgets[0]:
                continue
            model, _, sizing = prepare(run, suite, corpus, context(suite, run, device), resize_model=False)
            log(f"sizing {label} {run.model.name}: {sizing['chosen']} -> {sizing['achieved_flops_per_byte']:.4g} "
                f"forward FLOPs/byte ({sizing['relative_error']:+.1%} of the target)")
            for budget in sorted(set(suite.budgets) - {run.budget}):
                _, facts = size_to_target(model, suite.inference_target(budget), suite.eval.window,
                                          suite.count_auxiliary_flops, run.model.name)
                log(f"sizing {label} {run.model.name} at {budget:.3g} FLOPs: {facts['chosen']} -> "
                    f"{facts['achieved_flops_per_byte']:.4g} forward FLOPs/byte")


# ---- the steps of one run ---------------------------------------------------------------------

def prepare(run: Run, suite: Suite, corpus: CorpusData, ctx: RunContext,
            resize_model: bool = True) -> tuple[Adapter, Preparation, dict | None]:
    """Build the adapter from the run's seed, fit it to the training split, and size it to the
    suite's inference cost at the run's budget if it sets one (the resized model takes over the
    preparation; with `resize_model` False the prepared model comes back as configured)."""
    torch.manual_seed(run.seed)
    model = build(run.model.adapter, run.model.config).to(ctx.device)
    started = time.perf_counter()
    preparation = model.prepare(corpus.splits.train, ctx)
    preparation.seconds = preparation.seconds or time.perf_counter() - started
    sizing, target = None, suite.inference_target(run.budget)
    if target is not None:
        config, sizing = size_to_target(model, target, ctx.window, ctx.count_auxiliary_flops, run.model.name)
        if suite.inference_scaling is not None:  # the record says where its target came from
            sizing["scaling"] = suite.inference_scaling.model_dump()
        if config != model.config and resize_model:
            torch.manual_seed(run.seed)  # the resized model starts from the run's seed too
            model = resize(model, config).to(ctx.device)
    return model, preparation, sizing


@dataclass(frozen=True)
class Plan:
    forward_flops_per_byte: dict[str, float]
    training_flops_per_byte: float
    auxiliary_training_flops: float  # charged to the budget before training
    batch_bytes: int
    steps: int
    epoch_cap: EpochCap | None = None  # the suite's max_epochs, when it cut the steps the budget bought
    warnings: tuple[str, ...] = ()


def plan(run: Run, model: Adapter, preparation: Preparation, ctx: RunContext, train_bytes: int,
         max_epochs: float | None = None) -> Plan:
    """The run's budget, less what preparation charged, in optimizer steps; at most `max_epochs`
    over the training split's windows. Warns when the data would repeat."""
    forward = model.flops_per_byte(ctx.window)
    auxiliary = preparation.auxiliary_flops if ctx.count_auxiliary_flops else 0.0
    per_byte = training_flops_per_byte(forward, ctx.count_auxiliary_flops)
    batch_bytes = run.trainer.batch_windows * ctx.window
    steps = training_steps(run.budget - auxiliary, per_byte, batch_bytes)
    if steps < 1:
        raise HarnessError(f"{run.run_id}: budget {run.budget:.3g} FLOPs leaves {run.budget - auxiliary:.3g} after "
                           f"preparation, less than one optimizer step ({per_byte * batch_bytes:.3g} FLOPs)")
    epoch_bytes = train_bytes // ctx.window * ctx.window
    epochs = steps * batch_bytes / epoch_bytes
    cap, warnings = None, []
    if max_epochs is not None and epochs > max_epochs:
        cap = EpochCap(max_epochs=max_epochs, budget_steps=steps)
        steps = max(1, int(max_epochs * epoch_bytes // batch_bytes))
        warnings.append(f"the budget buys {epochs:.3g} epochs over the training split; max_epochs {max_epochs:g} "
                        f"stops it at step {steps} of {cap.budget_steps} ({steps / cap.budget_steps:.1%} of the budget)")
    elif epochs > 1:
        warnings.append(f"the budget buys {epochs:.3g} epochs over the training split (the data repeats; a suite's "
                        "max_epochs caps it)")
    for warning in warnings:
        log(f"warning: {run.run_id}: {warning}")
    return Plan(forward, per_byte, auxiliary, batch_bytes, steps, cap, tuple(warnings))


def evaluate_run(model: Adapter, suite: Suite, corpus: CorpusData, ctx: RunContext) -> dict:
    """Val and test bpb under the adapter's evaluation rule, test bpb under its other rules,
    and how its units cut the test split."""
    batch = suite.eval.batch_windows
    variants = {}
    for name, label in model.eval_variants().items():
        model.set_eval_variant(name)
        variants[name] = evaluate(model, corpus.test_windows, batch, ctx.device, label=label)
        model.set_eval_variant(None)
    return {
        "val": evaluate(model, corpus.val_windows, batch, ctx.device),
        "test": evaluate(model, corpus.test_windows, batch, ctx.device),
        "test_variants": variants,
        "segmentation": segmentation_example(model, corpus.splits.test, ctx.window),
    }


def segmentation_example(model: Adapter, test: bytes, window: int, example_bytes: int = 384) -> SegmentationExample | None:
    """For models with units (Adapter.segment): how the evaluation rule cuts the start of the
    test split (bytes, scores, starts) and the unit-length histogram over the scored windows."""
    scored = test[: len(test) // window * window]
    seg = segment_bytes(model, scored, window)
    if seg is None:
        return None
    example = slice(0, min(example_bytes, len(scored)))
    return SegmentationExample(
        example_bytes=list(scored[example]),
        example_starts=np.flatnonzero(seg.starts[example]).tolist(),
        example_scores=None if seg.scores is None else np.round(seg.scores[example], 5).tolist(),
        chunk_length_counts=np.bincount(seg.lengths()).tolist(),
        window=window,
    )


def execute(run: Run, suite: Suite, corpus: CorpusData, device: torch.device, peak: Peak, config_hash: str,
            run_dir: Path, show_progress: bool, save_every_s: float, tensorboard_dir: Path | None = None) -> RunRecord:
    started = time.perf_counter()
    ctx = context(suite, run, device)
    model, preparation, sizing = prepare(run, suite, corpus, ctx)
    steps = plan(run, model, preparation, ctx, len(corpus.splits.train), suite.max_epochs)

    stream = data.TrainStream(corpus.splits.train, ctx.window, run.trainer.batch_windows, run.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    partial = run_dir / "partial.pt"
    writer = tensorboard_writer(tensorboard_dir) if tensorboard_dir is not None and distributed.is_main() else None
    try:
        training = train(model, stream, run.trainer, steps.steps, device, description=run.run_id,
                         show_progress=show_progress, resume_path=partial, resume_key=config_hash,
                         save_every_s=save_every_s, budget_flops=run.budget - steps.auxiliary_training_flops,
                         tensorboard=writer)
    finally:
        if writer is not None:
            writer.close()
    warnings = list(steps.warnings)
    for warning in preparation.facts.get("warnings", []):  # what preparation found (e.g. a weak entropy model)
        warnings.append(warning)
        log(f"warning: {run.run_id}: {warning}")
    if training["stopped_by_budget"] and training["steps"] < steps.steps:
        warnings.append(f"the budget was spent after {training['steps']} of {steps.steps} planned steps "
                        "(the learned unit rate ran above its target; the schedule was cut short)")
        log(f"warning: {run.run_id}: {warnings[-1]}")

    calibration = model.finish_training(corpus.splits.train, ctx)
    # the training forward, window by window so no batch padding is counted; after training, where
    # a learned chunk rate (H-Net) has settled, against the analytic figure at that rate
    counted_training = counted_flops_per_byte(model.train(), chunking.calibration_windows(
        corpus.splits.train, ctx.window, FLOP_CHECK_WINDOWS), ctx)
    results = evaluate_run(model, suite, corpus, ctx)
    flops = FlopsPerByte(analytic=model.flops_per_byte(ctx.window), counted_training=counted_training,
                         counted_training_windows=min(FLOP_CHECK_WINDOWS, len(corpus.splits.train) // ctx.window),
                         test=counted_flops_per_byte(model.eval(), corpus.test_windows, ctx))
    if abs(flops.training_deviation()) > FLOP_TOLERANCE:
        warnings.append(f"the training forward counted on {flops.counted_training_windows} training windows is "
                        f"{flops.training_deviation():+.1%} off the analytic FLOPs per byte that the budget uses")
        log(f"warning: {run.run_id}: {warnings[-1]}")

    # what train() charged when the adapter reports the FLOPs each step ran (a learned rate), else the plan's rate
    training_flops = training["flops"] if training["flops"] is not None else steps.training_flops_per_byte * training["bytes_seen"]
    achieved = training_flops / training["seconds"]
    mfu = achieved / peak.flops_per_s / distributed.world_size()
    if mfu > 1:
        warnings.append(f"trained at {achieved:.3g} FLOP/s, above the {peak.flops_per_s:.3g} matmul peak measured when "
                        "the suite started (other work was sharing the machine then): its MFU reads high")
        log(f"warning: {run.run_id}: {warnings[-1]}")
    splits = corpus.splits
    record = RunRecord(
        suite=suite.name, run_id=run.run_id, config_hash=config_hash,
        model=ModelSpec(**run.model.model_dump(mode="json") | {"config": model.config.model_dump(mode="json")}),
        trainer=run.trainer.model_dump(mode="json"), trainer_overrides=run.model.trainer.model_dump(exclude_none=True),
        budget_flops=run.budget, seed=run.seed,
        corpus=CorpusFacts(label=run.corpus.label, id=splits.corpus_id, sha256=splits.sha256,
                           train_bytes=len(splits.train), val_bytes=len(splits.val), test_bytes=len(splits.test)),
        eval=suite.eval.model_dump(mode="json"), parameters=model.parameter_counts(),
        flops_per_byte=flops, sizing=sizing,
        units_per_byte=model.units_per_byte(), bytes_per_unit=1.0 / model.units_per_byte(),
        preparation=PreparationFacts(seconds=preparation.seconds, auxiliary_flops=preparation.auxiliary_flops,
                                     unit_length_counts=preparation.unit_length_counts, facts=preparation.facts),
        steps=steps.steps, batch_bytes=steps.batch_bytes, bytes_seen=training["bytes_seen"], epochs=training["epochs"],
        epoch_cap=steps.epoch_cap,
        training_flops=training_flops, auxiliary_training_flops=steps.auxiliary_training_flops,
        count_auxiliary_flops=suite.count_auxiliary_flops, total_flops=training_flops + steps.auxiliary_training_flops,
        training_flops_per_byte=(steps.training_flops_per_byte if training["flops"] is None
                                 else training_flops / training["bytes_seen"]), calibration=calibration,
        loss_curve=training["curve"], tokenizer=model.tokenizer_metrics(splits.test, ctx.window),
        train_seconds=training["seconds"], resumed_at_step=training["resumed_at_step"],
        wall_seconds=time.perf_counter() - started, achieved_flops_per_s=achieved,
        matmul_peak_flops_per_s=peak.flops_per_s, matmul_peak_range=[peak.low, peak.high],
        threads=torch.get_num_threads(), mfu=mfu, device=str(device),
        warnings=warnings, versions=versions(),
        tuning=run.tuning, processes=distributed.world_size() if distributed.world_size() > 1 else None, **results,
    )
    if distributed.is_main():
        write(run_dir, model, record)
    return record


def counted_flops_per_byte(model: Adapter, windows: torch.Tensor, ctx: RunContext) -> float:
    """Forward FLOPs per byte that FlopCounterMode counts over `windows`, one window at a time
    (real unit counts, no batch padding) in the model's current mode, plus what the counter
    cannot see."""
    counted = sum(measure_forward(model, w[None].to(ctx.device)) for w in windows)
    return counted / windows.numel() + model.uncounted_flops_per_byte(ctx.window)


def write(run_dir: Path, model: Adapter, record: RunRecord) -> None:
    """The checkpoint, then the record (its presence means the run is done), then drop the
    resumable training state."""
    save_checkpoint_atomic(run_dir / "model.pt", model.state_dict())
    write_record(run_dir / "record.json", record)
    (run_dir / "partial.pt").unlink(missing_ok=True)
