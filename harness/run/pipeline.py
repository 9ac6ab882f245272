"""One run from plan to record: prepare (build the adapter, fit it to the training split,
size it), plan (its budget in optimizer steps), train, evaluate, write. Each step is typed;
the suite-level loop around it (locks, failures, tuning, dispatch) is harness/orchestrate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.api import Adapter, AuxiliaryTraining, Preparation, RunContext, build
from harness.errors import HarnessError
from harness.modeling import chunking
from harness.modeling.flops import counting, measure_forward
from harness.run import data, distributed, noise, parallel
from harness.run.budget import Plan, charged_training_flops, check_test_cost, plan
from harness.run.device import Peak
from harness.run.distributed import log
from harness.run.evaluate import bits_per_byte, evaluate, window_nll
from harness.run.checkpoint import LEGACY_WEIGHTS_FILE, WEIGHTS_FILE, save_weights
from harness.run.records import (CalibrationFlops, CorpusFacts, FlopsPerByte, ModelSpec, PreparationFacts, RunRecord,
                                 SegmentationExample, TestSet, versions, write_record)
from harness.run.segmentation import segment_bytes, units_per_byte
from harness.run.sizing import resize, size_to_target
from harness.run.spec import CLEAN_CONDITIONAL_RULE, Run, Suite, TrainerSettings, load_corpus
from harness.run.train import TrainingResult, tensorboard_writer, train
from harness.storage import remove_hashed

FLOP_CHECK_WINDOWS = 64  # training windows the analytic FLOPs per byte are checked on
FLOP_TOLERANCE = 0.02  # a larger gap between counted and analytic FLOPs is flagged


@dataclass(frozen=True)
class CorpusData:
    splits: data.Splits
    val_windows: torch.Tensor
    test_windows: torch.Tensor


def load_corpus_data(suite: Suite, label: str, device: torch.device) -> CorpusData:
    splits = load_corpus(suite, label)
    log(f"suite {suite.name}: corpus {splits.corpus_id} sha256 {splits.sha256[:12]}, "
        f"train/val/test {len(splits.train)}/{len(splits.val)}/{len(splits.test)} bytes, device {device}")
    test_windows = data.windows(splits.test, suite.eval.window, suite.eval.max_windows)
    val_windows = data.windows(splits.val, suite.eval.window, suite.eval.max_windows)
    if len(test_windows) == 0 or len(val_windows) == 0:
        raise HarnessError(f"eval.window {suite.eval.window} is longer than the val or test split of {label}")
    short = [code for code, text in splits.test_languages.items() if len(text) < suite.eval.window]
    if short:
        raise HarnessError(f"{suite.source}: eval.window: {suite.eval.window} bytes is longer than the test text of "
                           f"{', '.join(short)} in corpus {label}; raise the corpus's test_share or shorten the window")
    return CorpusData(splits, val_windows, test_windows)


def context(suite: Suite, run: Run, device: torch.device) -> RunContext:
    return RunContext(window=suite.eval.window, seed=run.seed, device=device, budget_flops=run.budget,
                      count_auxiliary_flops=suite.count_auxiliary_flops, max_epochs=suite.max_epochs,
                      trainer=AuxiliaryModelTrainer(suite.eval.window, run.seed, device))


@dataclass(frozen=True)
class AuxiliaryModelTrainer:
    """The harness's trainer and evaluator lent to an adapter for a model of its own (the BLT
    entropy model): the run's windows, seed and device, the one training step."""

    window: int
    seed: int
    device: torch.device
    eval_batch_windows: int = 64

    def train(self, model: Adapter, data_bytes: bytes, *, batch_windows: int, lr: float, steps: int,
              description: str) -> AuxiliaryTraining:
        settings = TrainerSettings(batch_windows=batch_windows, lr=lr, log_every=max(1, steps // 10))
        stream = data.TrainStream(data_bytes, self.window, batch_windows, self.seed)
        result = train(model, stream, settings, steps, self.device, description=description, show_progress=False)
        return AuxiliaryTraining(steps=result.steps, bytes_seen=result.bytes_seen, epochs=result.epochs,
                                 seconds=result.seconds, final_train_bpb=result.curve[-1]["train_bpb"])

    def bits_per_byte(self, model: Adapter, data_bytes: bytes) -> tuple[float, int]:
        windows = data.windows(data_bytes, self.window)
        return evaluate(model, windows, self.eval_batch_windows, self.device).bpb, windows.numel()


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
        config, sizing = size_to_target(model, target, ctx.window, ctx.count_auxiliary_flops, run.model.name,
                                        suite.sizing.widths)
        if suite.inference_scaling is not None:  # the record says where its target came from
            sizing["scaling"] = suite.inference_scaling.model_dump()
        if config != model.config and resize_model:
            torch.manual_seed(run.seed)  # the resized model starts from the run's seed too
            model = resize(model, config).to(ctx.device)
    return model, preparation, sizing


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
        "test_sets": language_test_sets(model, suite, corpus, ctx) | noise_test_sets(model, suite, corpus, ctx),
        "segmentation": segmentation_example(model, corpus.splits.test, ctx.window),
    }


def noise_test_sets(model: Adapter, suite: Suite, corpus: CorpusData, ctx: RunContext) -> dict[str, TestSet]:
    """The suite's noise rules on the test split, or on one language's test text of a parallel corpus
    (docs/noise.md): per rule, the noised text cut into windows like the clean one (bpb per noised
    byte), and the conditional form, clean second halves of the test windows after a noised first
    half; once, the same continuations after their clean halves."""
    settings = suite.eval.noise
    if settings is None:
        return {}
    batch, half = suite.eval.batch_windows, suite.eval.window // 2
    text = corpus.splits.test if settings.language is None else corpus.splits.test_languages[settings.language]
    clean = data.windows(text, suite.eval.window, suite.eval.max_windows)
    was_training = model.training
    model.eval()  # the FLOPs are counted in the evaluation rule's mode
    sets = {f"noise:{CLEAN_CONDITIONAL_RULE}": score_continuations(
        model, clean[1:], half, ctx, batch, "clean continuations after their clean context")}
    for name, rule in settings.rules.items():
        noised = noise.apply(text, rule.kind, rule.rate, rule.shares, settings.seed)
        windows = data.windows(noised.text, suite.eval.window, suite.eval.max_windows)
        if len(windows) == 0:
            raise HarnessError(f"{suite.source}: eval.noise.rules.{name}: the noised test split is shorter than a window")
        sets[f"noise:{name}"] = score_test_set(model, windows, ctx, batch, "noise",
                                               f"{name}: bpb per noised byte, {len(windows)} noised windows")
        try:
            contexts = torch.from_numpy(noise.noised_contexts(noised, suite.eval.window, len(clean))).long()
        except ValueError as e:
            raise HarnessError(f"{suite.source}: eval.noise.rules.{name}: {e}") from None
        sets[f"noise:{name}:clean-after-noised"] = score_continuations(
            model, torch.cat([contexts, clean[1:, half:]], dim=1), half, ctx, batch,
            f"{name}: clean continuations after a noised context")
    model.train(was_training)
    return sets


def language_test_sets(model: Adapter, suite: Suite, corpus: CorpusData, ctx: RunContext) -> dict[str, TestSet]:
    """`lang:CODE` for each language of a parallel corpus: its test text cut into windows like the
    test split, scored and charged on those windows, with the model's units per byte there and,
    for a tokenizer, its figures on the whole text (harness/run/parallel.py)."""
    sets = {}
    for code, text in corpus.splits.test_languages.items():
        windows = data.windows(text, suite.eval.window, suite.eval.max_windows)
        scored = score_test_set(model, windows, ctx, suite.eval.batch_windows, "language", code)
        tokenizer = model.tokenizer_metrics(text, ctx.window)
        sets[f"lang:{code}"] = scored.model_copy(update={
            "units_per_byte": units_per_byte(model, text[:windows.numel()], ctx.window), "text_bytes": len(text),
            "tokenizer": parallel.tokenizer_facts(tokenizer, text, code) if tokenizer else None})
    return sets


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
    """One run from plan to record: prepare, plan, train, finish (calibration, charged), measure what
    the forward costs, evaluate, check the inference cost the run was sized to, record; the record
    is written last (rank 0 only)."""
    started = time.perf_counter()
    ctx = context(suite, run, device)
    model, preparation, sizing = prepare(run, suite, corpus, ctx)
    budget = plan(run, model, preparation, ctx, len(corpus.splits.train), suite.max_epochs)
    warnings = list(budget.warnings)
    for warning in preparation.facts.get("warnings", []):  # what preparation found (e.g. a weak entropy model)
        warn(run, warnings, warning)
    training = train_run(run, model, corpus, budget, ctx, config_hash, run_dir, show_progress, save_every_s,
                         tensorboard_dir)
    if training.stopped_by_budget and training.steps < budget.steps:
        warn(run, warnings, f"the budget was spent after {training.steps} of {budget.steps} planned steps "
                            "(the learned unit rate ran above its target; the schedule was cut short)")
    calibration, calibration_flops = finish_training(model, corpus.splits.train, ctx)
    if calibration_flops.spent > calibration_flops.reserved * (1 + FLOP_TOLERANCE):
        warn(run, warnings, f"calibration after training counted {calibration_flops.spent:.4g} FLOPs, more than the "
                            f"{calibration_flops.reserved:.4g} its adapter reserved (Adapter.calibration_cost): "
                            "the run's total may pass its budget")
    # the training forward, window by window so no batch padding is counted; after training, where
    # a learned chunk rate (H-Net) has settled, against the analytic figure at that rate
    counted_training = counted_flops_per_byte(model.train(), chunking.calibration_windows(
        corpus.splits.train, ctx.window, FLOP_CHECK_WINDOWS), ctx)
    results = evaluate_run(model, suite, corpus, ctx)
    flops = FlopsPerByte(analytic=model.flops_per_byte(ctx.window), counted_training=counted_training,
                         counted_training_windows=min(FLOP_CHECK_WINDOWS, len(corpus.splits.train) // ctx.window),
                         test=counted_flops_per_byte(model.eval(), corpus.test_windows, ctx),
                         test_batched=counted_flops_per_byte(model, corpus.test_windows, ctx, suite.eval.batch_windows))
    if abs(flops.training_deviation()) > FLOP_TOLERANCE:
        warn(run, warnings, f"the training forward counted on {flops.counted_training_windows} training windows is "
                            f"{flops.training_deviation():+.1%} off the analytic FLOPs per byte that the budget uses")
    cost_check = checked_test_cost(run, flops, sizing, suite.count_auxiliary_flops, warnings)
    training_flops = charged_training_flops(training, budget)
    achieved, mfu = speed(run, training_flops, training.seconds, peak, warnings)
    record = RunRecord(
        **run_facts(run, suite, corpus, config_hash), parameters=model.parameter_counts(),
        model=ModelSpec(**run.model.model_dump(mode="json") | {"config": model.config.model_dump(mode="json")}),
        flops_per_byte=flops, sizing=sizing, units_per_byte=model.units_per_byte(),
        bytes_per_unit=1.0 / model.units_per_byte(),
        preparation=PreparationFacts(seconds=preparation.seconds, auxiliary_flops=preparation.auxiliary_flops,
                                     unit_length_counts=preparation.unit_length_counts, facts=preparation.facts),
        steps=budget.steps, batch_bytes=budget.batch_bytes, bytes_seen=training.bytes_seen, epochs=training.epochs,
        epoch_cap=budget.epoch_cap, training_flops=training_flops,
        auxiliary_training_flops=budget.auxiliary_training_flops, count_auxiliary_flops=suite.count_auxiliary_flops,
        total_flops=training_flops + budget.auxiliary_training_flops + calibration_flops.spent,
        training_flops_per_byte=training_flops / training.bytes_seen if training.flops is not None
        else budget.training_flops_per_byte, calibration=calibration, calibration_flops=calibration_flops,
        cost_check=cost_check, loss_curve=training.curve,
        tokenizer=model.tokenizer_metrics(corpus.splits.test, ctx.window), train_seconds=training.seconds,
        resumed_at_step=training.resumed_at_step, wall_seconds=time.perf_counter() - started,
        achieved_flops_per_s=achieved, matmul_peak_flops_per_s=peak.flops_per_s, matmul_peak_range=[peak.low, peak.high],
        threads=torch.get_num_threads(), mfu=mfu, device=str(device), warnings=warnings, **results)
    if distributed.is_main():
        write(run_dir, model, record)
    return record


def checked_test_cost(run: Run, flops: FlopsPerByte, sizing: dict | None, count_auxiliary: bool,
                      warnings: list[str]):
    """The matched-cost check of the scored test windows (harness/run/budget.py), warned about when it fails."""
    cost_check = check_test_cost(flops, sizing, count_auxiliary)
    if cost_check is not None and not cost_check.matched:
        warn(run, warnings, f"the scored test windows cost {cost_check.test:.4g} forward FLOPs per byte, "
                            f"{cost_check.relative_error:+.1%} off the {cost_check.target:.4g} it was sized to (tolerance "
                            f"{cost_check.tolerance:.0%}): not at matched inference cost, so the report ranks and fits "
                            "its row with no other")
    return cost_check


def speed(run: Run, training_flops: float, seconds: float, peak: Peak, warnings: list[str]) -> tuple[float, float]:
    """Training FLOP/s and MFU against the matmul peak measured when the suite started."""
    achieved = training_flops / seconds
    mfu = achieved / peak.flops_per_s / distributed.world_size()
    if mfu > 1:
        warn(run, warnings, f"trained at {achieved:.3g} FLOP/s, above the {peak.flops_per_s:.3g} matmul peak measured "
                            "when the suite started (other work was sharing the machine then): its MFU reads high")
    return achieved, mfu


def warn(run: Run, warnings: list[str], warning: str) -> None:
    """A warning for the run's record, said now too."""
    warnings.append(warning)
    log(f"warning: {run.run_id}: {warning}")


def run_facts(run: Run, suite: Suite, corpus: CorpusData, config_hash: str) -> dict:
    """The record fields that say which run this was, as the suite set it."""
    splits = corpus.splits
    return dict(
        suite=suite.name, run_id=run.run_id, config_hash=config_hash, budget_flops=run.budget, seed=run.seed,
        trainer=run.trainer, trainer_overrides=run.model.trainer.model_dump(exclude_none=True),
        corpus=CorpusFacts(label=run.corpus.label, id=splits.corpus_id, sha256=splits.sha256,
                           train_bytes=len(splits.train), val_bytes=len(splits.val), test_bytes=len(splits.test)),
        eval=suite.eval, versions=versions(), tuning=run.tuning,
        processes=distributed.world_size() if distributed.world_size() > 1 else None)


def train_run(run: Run, model: Adapter, corpus: CorpusData, budget: Plan, ctx: RunContext, config_hash: str,
              run_dir: Path, show_progress: bool, save_every_s: float, tensorboard_dir: Path | None) -> TrainingResult:
    """The run's training on its split, resumable from runs/RUN_ID/partial.pt, within what the
    budget leaves after preparation and calibration."""
    stream = data.TrainStream(corpus.splits.train, ctx.window, run.trainer.batch_windows, run.seed, run.trainer.sampling)
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = tensorboard_writer(tensorboard_dir) if tensorboard_dir is not None and distributed.is_main() else None
    try:
        return train(model, stream, run.trainer, budget.steps, ctx.device, description=run.run_id,
                     show_progress=show_progress, resume_path=run_dir / "partial.pt", resume_key=config_hash,
                     save_every_s=save_every_s, budget_flops=run.budget - budget.reserved_flops,
                     tensorboard=writer)
    finally:
        if writer is not None:
            writer.close()


def finish_training(model: Adapter, train: bytes, ctx: RunContext) -> tuple[dict, CalibrationFlops]:
    """The adapter's passes after training (Adapter.finish_training), counted as they run: its
    facts, and what it reserved against what it spent (FlopCounterMode plus the part the
    adapter says the counter cannot see)."""
    cost = model.calibration_cost(len(train), ctx.window)
    with counting() as counter:
        facts = model.finish_training(train, ctx)
    spent = float(counter.get_total_flops()) + cost.uncounted
    return facts, CalibrationFlops(reserved=cost.flops, spent=spent)


def counted_flops_per_byte(model: Adapter, windows: torch.Tensor, ctx: RunContext, batch_windows: int = 1) -> float:
    """Forward FLOPs per byte that FlopCounterMode counts over `windows` in the model's current
    mode, plus what the counter cannot see. One window at a time (the default) counts real unit
    counts, no batch padding: the useful FLOPs; in batches of `batch_windows`, what a batched
    evaluation computes, each window padded to its batch's longest unit count."""
    counted = sum(measure_forward(model, batch.to(ctx.device)) for batch in windows.split(batch_windows))
    return counted / windows.numel() + model.uncounted_flops_per_byte(ctx.window)


def score_test_set(model: Adapter, windows: torch.Tensor, ctx: RunContext, batch_windows: int, kind: str,
                   label: str) -> TestSet:
    """bpb of `windows` under the model's evaluation rule and its forward FLOPs per byte counted on
    those same windows: the record's entry for one extra test set (RunRecord.test_sets)."""
    scored = evaluate(model, windows, batch_windows, ctx.device, label=label)
    return TestSet(**scored.model_dump(), kind=kind, flops_per_byte=counted_flops_per_byte(model, windows, ctx))


def score_continuations(model: Adapter, windows: torch.Tensor, context_bytes: int, ctx: RunContext,
                        batch_windows: int, label: str) -> TestSet:
    """The bits of each window's bytes after its first `context_bytes`, given those: NLL(window) -
    NLL(its context alone), both scored from an empty context like every window (a token model's
    token across the boundary is scored whole in neither), in bpb per continuation byte. Its FLOPs
    per byte are counted on the whole windows, per window byte."""
    nll = (window_nll(model, windows, batch_windows, ctx.device)
           - window_nll(model, windows[:, :context_bytes].contiguous(), batch_windows, ctx.device))
    scored = windows.numel() - context_bytes * len(windows)
    return TestSet(bpb=bits_per_byte(float(nll.sum()), scored), bytes=scored, windows=len(windows),
                   window_nll_nats=[round(float(x), 6) for x in nll], label=label, kind="noise-conditional",
                   flops_per_byte=counted_flops_per_byte(model, windows, ctx))


def write(run_dir: Path, model: Adapter, record: RunRecord) -> None:
    """The weights (model.safetensors and its hash), then the record (its presence means the run
    is done), then drop the resumable training state and the weights of an older harness's run."""
    save_weights(run_dir / WEIGHTS_FILE, model.state_dict())
    write_record(run_dir / "record.json", record)
    remove_hashed(run_dir / "partial.pt")
    remove_hashed(run_dir / LEGACY_WEIGHTS_FILE)
