"""Run a suite: every (model, budget, seed) through the one trainer and evaluator,
one record per run. Resumable: a run whose record exists with the same config
hash is skipped; a record is written last and atomically, so an interrupted run
leaves no record and is simply run again."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from harness import RECORD_FORMAT_VERSION

from harness.core import data

from harness.api import registry
from harness.analysis.references import cached_references, raw_byte_metrics
from harness.errors import HarnessError
from harness.core.evaluate import evaluate
from harness.modeling.flops import measure_forward, measure_matmul_peak, training_flops_per_byte
from harness.analysis.segment import segment_bytes
from harness.core.sizing import resize, size_to_target
from harness.core.records import read_record, save_checkpoint_atomic, versions, write_json_atomic
from harness.core.suite import Run, Suite, expand, load_corpus, load_suite
from harness.core.train import train


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HarnessError("--device cuda: no CUDA device is available")
    return torch.device(name)


def log(message: str) -> None:
    tqdm.write(message)


def run_suite(suite_path: str | Path, results_root: Path, device_name: str = "auto", show_progress: bool = True,
              save_every_s: float = 60.0) -> Path:
    suite = load_suite(suite_path)
    device = pick_device(device_name)
    out = results_root / suite.name
    peak = measure_matmul_peak(device)
    corpora = {}  # label -> (splits, val windows, test windows)
    for corpus in suite.corpora:
        splits = load_corpus(suite, corpus.label)
        log(f"suite {suite.name}: corpus {splits.corpus_id} sha256 {splits.sha256[:12]}, "
            f"train/val/test {len(splits.train)}/{len(splits.val)}/{len(splits.test)} bytes, device {device}")
        test_windows = data.windows(splits.test, suite.eval.window, suite.eval.max_windows)
        val_windows = data.windows(splits.val, suite.eval.window, suite.eval.max_windows)
        if len(test_windows) == 0 or len(val_windows) == 0:
            raise HarnessError(f"eval.window {suite.eval.window} is longer than the val or test split of {corpus.label}")
        corpora[corpus.label] = (splits, val_windows, test_windows)
    write_json_atomic(out / "suite.json", {
        "format_version": RECORD_FORMAT_VERSION,
        "suite": suite.model_dump(mode="json"),
        "corpora": {label: {
            "id": splits.corpus_id, "sha256": splits.sha256,
            "references": cached_references(splits.train, test, label, log),
            "raw_bytes_tokenizer": raw_byte_metrics(splits.test),
        } for label, (splits, _, test) in corpora.items()},
        "device": str(device),
        "matmul_peak_flops_per_s": peak,
        "versions": versions(),
    })
    if suite.inference_flops_per_byte is not None:
        check_sizes(suite, {label: splits for label, (splits, _, _) in corpora.items()})
    runs = expand(suite)
    for index, run in enumerate(runs, 1):
        run_dir = out / "runs" / run.run_id
        config_hash = run.config_hash(suite)
        record_path = run_dir / "record.json"
        if record_path.exists():
            if read_record(record_path).get("config_hash") == config_hash:
                log(f"[{index}/{len(runs)}] {run.run_id}: done already, skipped")
                continue
            log(f"[{index}/{len(runs)}] {run.run_id}: the suite changed since this record; running again")
        log(f"[{index}/{len(runs)}] {run.run_id}: training")
        record = execute(run, suite, *corpora[run.corpus.label], device, peak, config_hash, run_dir,
                         show_progress, save_every_s)
        log(f"[{index}/{len(runs)}] {run.run_id}: val {record['val']['bpb']:.4f} bpb, test {record['test']['bpb']:.4f} bpb, "
            f"{record['wall_seconds']:.1f}s, {record['achieved_flops_per_s'] / 1e9:.2f} GFLOP/s")
    return out


def check_sizes(suite: Suite, corpora: dict[str, data.Splits]) -> None:
    """Before any training: every model can be sized to the suite's inference cost on every
    corpus (the first seed's preparation), so an impossible target fails at once."""
    for label, splits in corpora.items():
        for entry in suite.models:
            torch.manual_seed(suite.seeds[0])
            model = registry.build(entry.adapter, entry.config)
            model.prepare(splits.train, suite.seeds[0])
            _, facts = size_to_target(model, suite.inference_flops_per_byte, suite.eval.window,
                                      suite.count_auxiliary_flops, entry.name)
            log(f"sizing {label} {entry.name}: {facts['chosen']} -> {facts['achieved_flops_per_byte']:.4g} "
                f"forward FLOPs/byte ({facts['relative_error']:+.1%} of the target)")


def segmentation_example(model, test: bytes, window: int, example_bytes: int = 384) -> dict | None:
    """For chunking models (a `segment` hook): how the evaluation rule cuts the start of the
    test split (bytes, scores, starts) and the chunk-length histogram over the scored windows."""
    if not hasattr(model, "segment"):
        return None
    scored = test[: len(test) // window * window]
    seg = segment_bytes(model, scored, window)
    example = slice(0, min(example_bytes, len(scored)))
    return {
        "example_bytes": list(scored[example]),
        "example_starts": np.flatnonzero(seg.starts[example]).tolist(),
        "example_scores": None if seg.scores is None else np.round(seg.scores[example], 5).tolist(),
        "chunk_length_counts": np.bincount(seg.lengths()).tolist(),
        "window": window,
    }


def execute(run: Run, suite: Suite, splits: data.Splits, val_windows, test_windows, device: torch.device,
            peak: float, config_hash: str, run_dir: Path, show_progress: bool, save_every_s: float) -> dict:
    started = time.perf_counter()
    torch.manual_seed(run.seed)
    model = registry.build(run.model.adapter, run.model.config).to(device)
    prepare_started = time.perf_counter()
    preparation = model.prepare(splits.train, run.seed)
    preparation.setdefault("seconds", time.perf_counter() - prepare_started)
    sizing = None
    if suite.inference_flops_per_byte is not None:
        config, sizing = size_to_target(model, suite.inference_flops_per_byte, suite.eval.window,
                                        suite.count_auxiliary_flops, run.model.name)
        if config != model.config:
            torch.manual_seed(run.seed)  # the resized model starts from the run's seed too
            model = resize(model, config).to(device)

    window = suite.eval.window
    flops = model.flops_per_byte(window)
    # an auxiliary model's preparation (e.g. training BLT's entropy model) is charged to the budget
    auxiliary_training = float(preparation.get("flops", 0.0)) if suite.count_auxiliary_flops else 0.0
    budget_left = run.budget - auxiliary_training
    train_fpb = training_flops_per_byte(flops, suite.count_auxiliary_flops)
    # the training forward (what budgets count), window by window so no batch padding is counted
    measured = (sum(measure_forward(model.train(), w[None].to(device)) for w in test_windows[:2]) / test_windows[:2].numel()
                + model.uncounted_flops_per_byte(window))
    batch_bytes = run.trainer.batch_windows * window
    train_bytes = max(0.0, budget_left) / train_fpb
    steps = int(train_bytes // batch_bytes)
    if steps < 1:
        raise HarnessError(f"{run.run_id}: budget {run.budget:.3g} FLOPs leaves {budget_left:.3g} after preparation, "
                           f"less than one optimizer step ({train_fpb * batch_bytes:.3g} FLOPs)")
    stream = data.TrainStream(splits.train, window, run.trainer.batch_windows, run.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    partial = run_dir / "partial.pt"
    training = train(model, stream, run.trainer, steps, device, description=run.run_id, show_progress=show_progress,
                     resume_path=partial, resume_key=config_hash, save_every_s=save_every_s)
    warnings = []
    if training["epochs"] > 1:
        warnings.append(f"trained for {training['epochs']:.2f} epochs over the training split (data repeats)")
        log(f"warning: {run.run_id}: {warnings[-1]}")

    calibration = model.finish_training(splits.train)
    val = evaluate(model, val_windows, suite.eval.batch_windows, device)
    test = evaluate(model, test_windows, suite.eval.batch_windows, device)
    variants = {}
    for name, label in model.eval_variants().items():
        model.set_eval_variant(name)
        variants[name] = {"label": label, **evaluate(model, test_windows, suite.eval.batch_windows, device)}
        model.set_eval_variant(None)

    segmentation = segmentation_example(model, splits.test, window)
    training_flops = train_fpb * training["bytes_seen"]
    achieved = training_flops / training["seconds"]
    total_flops = training_flops + auxiliary_training
    record = {
        "format_version": RECORD_FORMAT_VERSION,
        "suite": suite.name,
        "run_id": run.run_id,
        "config_hash": config_hash,
        "model": run.model.model_dump(mode="json") | {"config": model.config.model_dump(mode="json")},
        "trainer": run.trainer.model_dump(mode="json"),
        "trainer_overrides": run.model.trainer.model_dump(exclude_none=True),
        "budget_flops": run.budget,
        "seed": run.seed,
        "corpus": {"label": run.corpus.label, "id": splits.corpus_id, "sha256": splits.sha256,
                   "train_bytes": len(splits.train), "val_bytes": len(splits.val), "test_bytes": len(splits.test)},
        "eval": suite.eval.model_dump(mode="json"),
        "parameters": model.parameter_counts(),
        "flops_per_byte": {"analytic": flops, "measured": measured},
        "sizing": sizing,
        "units_per_byte": model.units_per_byte(),
        "bytes_per_unit": 1.0 / model.units_per_byte(),
        "preparation": preparation,
        "steps": steps,
        "batch_bytes": batch_bytes,
        "bytes_seen": training["bytes_seen"],
        "epochs": training["epochs"],
        "training_flops": training_flops,
        "auxiliary_training_flops": auxiliary_training,
        "count_auxiliary_flops": suite.count_auxiliary_flops,
        "total_flops": total_flops,
        "training_flops_per_byte": train_fpb,
        "calibration": calibration,
        "loss_curve": training["curve"],
        "val": val,
        "test": test,
        "test_variants": variants,
        "tokenizer": model.tokenizer_metrics(splits.test, window),
        "segmentation": segmentation,
        "train_seconds": training["seconds"],
        "resumed_at_step": training["resumed_at_step"],
        "wall_seconds": time.perf_counter() - started,
        "achieved_flops_per_s": achieved,
        "matmul_peak_flops_per_s": peak,
        "mfu": achieved / peak,
        "device": str(device),
        "warnings": warnings,
        "versions": versions(),
    }
    save_checkpoint_atomic(run_dir / "model.pt", model.state_dict())
    write_json_atomic(run_dir / "record.json", record)
    partial.unlink(missing_ok=True)
    return record
