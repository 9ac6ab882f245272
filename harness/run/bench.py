"""Speed where users run it (`harness bench`): each model of a suite, sized as the suite sizes
it at its first budget, trained for a few steps through the trainer's own pieces (optimizer,
forward, objective, clipping) with the device synchronised around each phase, then evaluated
through the evaluator. FLOPs are the ones records use (the adapter's analytic count, or what a
step reports it ran), so bench and run records give the same FLOP/s for the same work.

Figures: training and evaluation bytes/s and FLOP/s, MFU against the matmul peak measured in
this process, the time of a training step by phase (data, forward, backward, optimizer), and
for adapters with an auxiliary part its time on its own: ByteFlow's chunk scoring (scores,
top-K, layout, given the encoder outputs) and the BLT entropy patcher's entropy model.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from harness.api import Adapter
from harness.run import data
from harness.modeling.runtime import median_seconds, synchronize, to_device
from harness.run.device import Peak, busy_machine_warning, measure_matmul_peak
from harness.run.evaluate import window_nll
from harness.run.records import versions
from harness.run.distributed import log
from harness.run.pipeline import CorpusData, context, load_corpus_data, prepare
from harness.run.spec import Run, Suite, expand
from harness.run.train import make_optimization, training_forward, training_step
from harness.errors import HarnessError
from harness.modeling.flops import TRAIN_MULTIPLIER
from harness.run.budget import inference_flops_per_byte, training_flops_per_byte

PHASES = ("data", "forward", "backward", "optimizer")
AUXILIARY_REPEATS = 5


def bench_runs(suite: Suite, names: list[str] | None) -> list[Run]:
    """One run per model (all, or those named, in the suite's order): the first budget, seed and
    corpus, so each model has the size the suite gives it at its first budget."""
    known = [m.name for m in suite.rows]
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise HarnessError(f"--models: {', '.join(unknown)} not in {suite.source}; its models: {', '.join(known)}")
    first = suite.corpora[0].label
    runs = {run.model.name: run for run in expand(suite)
            if run.budget == suite.budgets[0] and run.seed == suite.seeds[0] and run.corpus.label == first}
    return [runs[name] for name in (names or known)]


def machine() -> dict:
    """What the figures depend on besides the code: processor, cores, threads, load."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    facts = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
             "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
             "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"), "openmp_wait_reason": os.environ.get("HARNESS_OPENMP_WAIT")}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def peaks(device: torch.device) -> dict[str, Peak]:
    """The fp32 matmul peak; on CUDA also the bf16 one (the dtype autocast trains in)."""
    found = {"float32": measure_matmul_peak(device)}
    if device.type == "cuda":
        found["bfloat16"] = measure_matmul_peak(device, torch.bfloat16, size=4096)
    return found


def bench_suite(suite: Suite, runs: list[Run], device: torch.device, steps: int, warmup: int = 2,
                compile: bool | None = None, profile: bool = False) -> dict:
    """The bench's JSON payload for `runs` (see the module note)."""
    before = machine()  # its load average is read before the peak loads the machine itself
    log(f"bench: measuring the matmul peak on {device}")
    measured = peaks(device)
    busy = busy_machine_warning(device, measured["float32"], (before["load_average"] or [None])[0])
    if busy:
        log(busy)
    corpus = load_corpus_data(suite, suite.corpora[0].label, device)
    models = []
    for index, run in enumerate(runs, 1):
        tag = f"bench [{index}/{len(runs)}] {run.model.name}"
        models.append(bench_model(run, suite, corpus, device, measured, steps, warmup, compile, profile, tag))
    return {
        "suite": suite.name, "suite_file": str(suite.source), "device": str(device), "steps": steps,
        "warmup_steps": warmup, "corpus": corpus.splits.corpus_id,
        "machine": before, "load_average_after": machine()["load_average"],
        "matmul_peak": {dtype: {"flops_per_s": p.flops_per_s, "min": p.low, "max": p.high}
                        for dtype, p in measured.items()},
        "warnings": [busy] if busy else [],
        "versions": versions(),
        "models": models,
    }


def bench_model(run: Run, suite: Suite, corpus: CorpusData, device: torch.device, measured: dict[str, Peak],
                steps: int, warmup: int, compile: bool | None, profile: bool, tag: str) -> dict:
    """One model's figures; a progress line (`tag: ...`) as each phase starts and ends."""
    ctx = context(suite, run, device)
    log(f"{tag}: preparing")
    started = time.perf_counter()
    model, preparation, sizing = prepare(run, suite, corpus, ctx)
    prepare_seconds = time.perf_counter() - started
    log(f"{tag}: prepared in {prepare_seconds:.1f}s{preparation_note(preparation.facts)}")
    settings = run.trainer if compile is None else run.trainer.model_copy(update={"compile": compile})
    forward = model.flops_per_byte(ctx.window)
    per_byte = training_flops_per_byte(forward, ctx.count_auxiliary_flops)
    inference_per_byte = inference_flops_per_byte(forward, ctx.count_auxiliary_flops)

    train = time_training(model, settings, corpus.splits.train, ctx.window, per_byte, device, steps, warmup, profile,
                          tag)
    log(f"{tag}: {steps} timed steps in {train['seconds']:.1f}s, {train['bytes'] / train['seconds']:.0f} B/s")
    windows = corpus.test_windows
    log(f"{tag}: evaluating on {len(windows)} test windows")
    window_nll(model, windows[: suite.eval.batch_windows], suite.eval.batch_windows, device)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    window_nll(model, windows, suite.eval.batch_windows, device)
    synchronize(device)
    eval_seconds = time.perf_counter() - started
    log(f"{tag}: evaluated in {eval_seconds:.1f}s")

    eval_bytes_per_s = windows.numel() / eval_seconds
    step_seconds = sum(train["phases"].values()) / steps
    part = auxiliary_part(model, corpus.splits.train, ctx.window, settings.batch_windows, device)
    if part is not None:
        log(f"{tag}: auxiliary part ({part['part']}) {part['seconds'] * 1e3:.1f} ms on one batch")
    flops_per_s = train["flops"] / train["seconds"]
    figures = {
        "name": run.model.name, "adapter": run.model.adapter, "config": model.config.model_dump(mode="json"),
        "sized": sizing is not None, "parameters": model.parameter_counts(), "window": ctx.window,
        "preparation_seconds": prepare_seconds,
        "batch_windows": settings.batch_windows, "compile": settings.compile,
        "forward_flops_per_byte": forward["total"], "training_flops_per_byte": per_byte,
        "train_bytes_per_s": train["bytes"] / train["seconds"], "eval_bytes_per_s": eval_bytes_per_s,
        "train_flops_per_s": flops_per_s, "eval_flops_per_s": inference_per_byte * eval_bytes_per_s,
        "mfu": flops_per_s / measured["float32"].flops_per_s,
        "step_seconds": {phase: seconds / steps for phase, seconds in train["phases"].items()} | {"total": step_seconds},
        "auxiliary": None if part is None else part | {"share_of_step": part["seconds"] / step_seconds},
    }
    if "bfloat16" in measured:
        figures["mfu_bf16"] = flops_per_s / measured["bfloat16"].flops_per_s
    if train["profile"] is not None:
        figures["profile"] = train["profile"]
        figures["operator_shares"] = train["operator_shares"]
    return figures


def preparation_note(facts: dict) -> str:
    """What preparation reused or trained, as a clause of the progress line."""
    notes = []
    if "tokenizer_cache_hit" in facts:
        notes.append("tokenizer " + ("from the cache" if facts["tokenizer_cache_hit"] else "trained and cached"))
    if "entropy_model" in facts:  # no cache: trained again for every run and every bench
        notes.append(f"entropy model trained in {facts['entropy_model']['seconds']:.1f}s")
    return f" ({'; '.join(notes)})" if notes else ""


def time_training(model: Adapter, settings, train: bytes, window: int, per_byte: float, device: torch.device,
                  steps: int, warmup: int, profile: bool, tag: str) -> dict:
    """`warmup` then `steps` training steps as the trainer takes them, each phase timed between
    device synchronisations. FLOPs as records count them: what a step reports it ran (x3), else
    the analytic training FLOPs per byte."""
    stream = data.TrainStream(train, window, settings.batch_windows, seed=0)
    model.train()
    step_forward = training_forward(model, device, settings)
    opt = make_optimization(model, settings, warmup + steps)
    phases = dict.fromkeys(PHASES, 0.0)
    flops = bytes_seen = 0.0
    profiler = None
    log(f"{tag}: training, {warmup} warm-up steps then {steps} timed steps")
    for step in range(warmup + steps):
        if step == warmup and warmup:
            log(f"{tag}: warm-up done")
        if step == warmup and profile:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                              + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []))
            profiler.__enter__()
        marks = []

        def mark() -> None:
            synchronize(device)
            marks.append(time.perf_counter())

        mark()
        batch = to_device(stream.next_batch(), device)
        mark()
        out, _, _ = training_step(step_forward, batch, opt, settings.grad_clip, device, mark)
        if step < warmup:
            continue
        for phase, start, end in zip(PHASES, marks, marks[1:]):
            phases[phase] += end - start
        bytes_seen += batch.numel()
        flops += TRAIN_MULTIPLIER * float(out.forward_flops) if out.forward_flops is not None else per_byte * batch.numel()
    table = shares = None
    if profiler is not None:
        profiler.__exit__(None, None, None)
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        shares = operator_shares(profiler.key_averages())
    return {"phases": phases, "seconds": sum(phases.values()), "flops": flops, "bytes": bytes_seen, "profile": table,
            "operator_shares": shares}


MATMUL_OPERATORS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def operator_shares(averages, top: int = 5) -> dict:
    """Where the watched steps' self CPU time went: the matrix products (what MFU counts), attention
    (CPU flash attention, far below the matmul peak at small heads), and the largest other
    operators by name: what holds a small model below the peak."""
    total = sum(e.self_cpu_time_total for e in averages) or 1.0
    share = {e.key: e.self_cpu_time_total / total for e in averages}
    attention = {k for k in share if "scaled_dot_product" in k or "flash_attention" in k}
    others = sorted((k for k in share if k not in MATMUL_OPERATORS | attention), key=share.get, reverse=True)
    return {"matmul": sum(share.get(k, 0.0) for k in MATMUL_OPERATORS), "attention": sum(share[k] for k in attention),
            "top_other": [[k, share[k]] for k in others[:top]]}


def auxiliary_part(model: Adapter, train: bytes, window: int, batch_windows: int, device: torch.device) -> dict | None:
    """The median time of the adapter's auxiliary part (Adapter.auxiliary_part: ByteFlow's chunk
    scoring, the entropy patcher's entropy model) on one training batch, on its own; None for
    adapters without one."""
    part = model.auxiliary_part(data.windows(train, window, batch_windows).to(device))
    if part is None:
        return None
    name, call = part
    return {"part": name, "seconds": median_seconds(call, AUXILIARY_REPEATS, device)}
