"""`harness bench SUITE`: training and evaluation speed of a suite's models on this machine
(harness.run.bench), printed as a table and written as JSON (and a markdown table beside it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.commands.run import add_device_options, check_threads, pick_threads, raise_error

COLUMNS = ("model", "params", "train B/s", "eval B/s", "GFLOP/s", "MFU", "step ms", "data", "fwd", "bwd", "opt",
           "auxiliary ms")


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from harness.run.bench import bench_runs, bench_suite
    from harness.run.device import pick_device
    from harness.storage import write_json_atomic
    from harness.orchestrate.suite import load_suite

    check_threads(args.threads)
    if args.steps < 1 or args.warmup < 0:
        raise_error(f"--steps {args.steps} --warmup {args.warmup}: give 1 or more steps and 0 or more warm-up steps")
    torch.set_num_threads(pick_threads(args.threads))
    suite = load_suite(args.suite)
    runs = bench_runs(suite, args.models)
    result = bench_suite(suite, runs, pick_device(args.device), args.steps, args.warmup,
                         compile=True if args.compile else None, profile=args.profile)
    print("\n".join(header(result)) + "\n\n" + table(result, "simple"))
    if args.profile:
        for model in result["models"]:
            print(f"\nprofile of {model['name']} ({args.steps} steps; profiler overhead included)\n{model['profile']}")
    if args.out:
        out = Path(args.out)
        write_json_atomic(out, result)
        out.with_suffix(".md").write_text(markdown(result))
        print(f"written {out} and {out.with_suffix('.md')}")
    return 0


def rows(result: dict) -> list[list]:
    out = []
    for m in result["models"]:
        step = m["step_seconds"]
        auxiliary = m["auxiliary"]
        out.append([
            m["name"], f"{m['parameters']['total'] / 1e3:.0f}k", f"{m['train_bytes_per_s']:.0f}",
            f"{m['eval_bytes_per_s']:.0f}", f"{m['train_flops_per_s'] / 1e9:.2f}", f"{m['mfu']:.1%}",
            *(f"{step[key] * 1e3:.1f}" for key in ("total", "data", "forward", "backward", "optimizer")),
            "" if auxiliary is None else f"{auxiliary['seconds'] * 1e3:.1f} ({auxiliary['share_of_step']:.0%})",
        ])
    return out


def header(result: dict) -> list[str]:
    machine, peak = result["machine"], result["matmul_peak"]
    load = machine["load_average"]
    lines = [f"suite {result['suite']} ({result['suite_file']}), {result['steps']} steps after "
             f"{result['warmup_steps']} warm-up, device {result['device']}",
             f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads"
             + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
             + ("" if load is None else f", load average {load[0]:.2f} before / {result['load_average_after'][0]:.2f} after")]
    for dtype, p in peak.items():
        lines.append(f"{dtype} matmul peak {p['flops_per_s'] / 1e9:.1f} GFLOP/s (median of 5; {p['min'] / 1e9:.1f} to "
                     f"{p['max'] / 1e9:.1f}); MFU is against {'float32' if dtype == 'float32' else dtype}")
    versions = result["versions"]
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return lines + result["warnings"]


def table(result: dict, style: str) -> str:
    from tabulate import tabulate

    return tabulate(rows(result), headers=COLUMNS, tablefmt=style, disable_numparse=True,
                    colalign=("left",) + ("right",) * (len(COLUMNS) - 1))


def markdown(result: dict) -> str:
    """The table as markdown, with what the figures depend on above it."""
    notes = "\n".join(f"- {line}" for line in header(result))
    return (f"# Speed: {result['suite']}\n\nWritten by `harness bench`. Training bytes/s and FLOP/s over the timed "
            f"steps (FLOPs as run records count them); step time by phase in ms, the device synchronised around "
            f"each; the auxiliary part timed on its own, with its share of a step.\n\n{notes}\n\n"
            f"{table(result, 'pipe')}\n")


def add_parser(subparsers) -> argparse.ArgumentParser:
    bench = subparsers.add_parser(
        "bench", help="training and evaluation speed of a suite's models on this machine (bytes/s, FLOP/s, MFU)",
        description="Size each model of SUITE as the suite does at its first budget (first seed and corpus), train it "
                    "for --steps steps after --warmup steps through the trainer's optimizer and loss, then evaluate "
                    "it on the suite's test windows. Prints training and evaluation bytes/s, achieved FLOP/s (as run "
                    "records count FLOPs), MFU against the matmul peak measured in this process (fp32; also bf16 on "
                    "CUDA), the step time by phase (data, forward, backward, optimizer) and the time of an auxiliary "
                    "part on its own (ByteFlow's chunk scoring, the BLT entropy model), with the machine and library "
                    "versions. Nothing is written to the results folder.",
        epilog="example: harness bench suites/study_v2.yaml --models bytes bpe hnet --steps 10 "
               "--out results/bench/cpu_study.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("suite", help="suite YAML file, e.g. suites/smoke.yaml")
    bench.add_argument("--models", nargs="+", metavar="NAME", help="only these models of the suite (default: all)")
    bench.add_argument("--steps", type=int, default=20, metavar="N", help="timed training steps per model (default 20)")
    bench.add_argument("--warmup", type=int, default=2, metavar="N",
                       help="untimed training steps first (default 2; compiling happens in them)")
    bench.add_argument("--out", metavar="FILE.json",
                       help="also write the figures as JSON, and the table as markdown to FILE.md")
    add_device_options(bench)
    bench.add_argument("--compile", action="store_true",
                       help="compile every model's training forward (torch.compile), whatever the suite says")
    bench.add_argument("--profile", action="store_true",
                       help="also run torch.profiler over the timed steps and print each model's top operators "
                            "(the profiler slows the steps it watches)")
    bench.set_defaults(func=cmd_bench)
    return bench
