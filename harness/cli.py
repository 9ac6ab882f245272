"""`harness`: run suites, report results, list adapters.

Errors a user can fix print one line (`harness: error: ...`) and exit with status 2, and so
do the system's refusals (OSError: a read-only folder, a full disk).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# torch's OpenMP threads spin briefly for work, then sleep. Spinning for long (libgomp's default) holds
# a core that other jobs' working threads need, and a run beside them slows many times over; sleeping at
# once (OMP_WAIT_POLICY=PASSIVE) makes every one of the small models' many short operators wait for a
# wake-up, and a run on a quiet machine about twice as slow, but beside other jobs it is the faster of the
# two (docs/speed.md, "Threads"): so the policy follows the threads other jobs have ready to run, and so
# does the default thread count. libgomp reads the policy once, when torch loads, so it is set before any
# command imports torch; a user's own setting wins.
LOADAVG = "/proc/loadavg"


def other_runnable_threads(path: str = LOADAVG, looks: int = 3) -> int | None:
    """Threads of other processes ready to run now (Linux's running count, less this one), the
    least of a few looks 10 ms apart, so that a passing process is not taken for a busy machine.
    None where the system does not say."""
    counts = []
    for look in range(looks):
        try:
            with open(path) as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return None
        if look + 1 < looks:
            time.sleep(0.01)
    return max(0, min(counts))


def openmp_wait(others: int | None, cores: int) -> dict[str, str]:
    """The OpenMP wait settings for a machine where `others` threads of other jobs are ready to run
    on `cores`: sleep at once where they leave no core free, else spin briefly first."""
    if others is not None and others >= cores:
        return {"OMP_WAIT_POLICY": "PASSIVE",
                "HARNESS_OPENMP_WAIT": f"passive: {others} threads of other jobs ready to run on {cores} cores"}
    return {"GOMP_SPINCOUNT": "1000", "HARNESS_OPENMP_WAIT": "a short spin: a core was free"}


_others = other_runnable_threads()
if _others is not None:  # the default thread count takes the cores they leave free (harness.run.device.choose_threads)
    os.environ["HARNESS_OTHER_THREADS"] = str(_others)
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.update(openmp_wait(_others, _cores))

from harness.commands import bench, export, init, listing, lm_eval, report, run, segment
from harness.errors import HarnessError

EPILOG = """examples:
  harness init notes.txt -o notes.yaml
                                           a commented minimal suite (bytes and BPE) sized to your text file
  harness run suites/smoke.yaml            train + evaluate every run of a suite
  harness run suites/smoke.yaml --executor local --workers 2
                                           the same, as 2 worker jobs on this machine (submitit)
  harness run suites/matched_flops.yaml --executor slurm --partition gpu --time-min 240
                                           one Slurm job per run; preempted jobs requeue and resume
  harness run suites/smoke.yaml --nproc 2  each run across 2 processes (DDP; gloo on the CPU)
  harness run suites/smoke.yaml --threads 2
                                           torch on 2 CPU threads (default: the cores other jobs leave free; docs/speed.md)
  harness bench suites/smoke.yaml --steps 10 --out results/bench/cpu_smoke.json
                                           bytes/s, FLOP/s, MFU and step phases of each model on this machine
  harness report results/smoke             results/smoke/report.md, plots in results/smoke/plots
  harness report results/smoke -o -        the markdown to stdout instead
  harness list                             adapters, their descriptions and config fields
  harness export results/smoke/runs/bpe__C1.00e11__s0 exported/bpe
                                           a bpe run as a transformers model + tokenizer
  harness segment results/smoke/runs/byteflow-l2__C1.00e11__s0 --split test
                                           chunk boundaries of a ByteFlow or patcher run, printed and as PNG
  harness lm-eval --model harness --model_args pretrained=results/smoke/runs/RUN_ID --tasks harness_bpb
                                           lm-evaluation-harness on a checkpoint (every option is lm-eval's)
"""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="harness",
        description="Benchmark tokenizers and tokenizer-free byte models under matched FLOP budgets, in bits per byte.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for command in (init, run, report, listing, export, segment, lm_eval, bench):
        command.add_parser(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # for a command that starts copies of itself (harness/orchestrate/launch.py): its arguments and this entry
    args.argv, args.main = list(sys.argv[1:] if argv is None else argv), main
    try:
        status = args.func(args) or 0  # a command that launched processes returns theirs
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
    except HarnessError as e:
        if os.environ.get("RANK", "0") == "0":  # one line, not one per process of a run across processes
            print(f"harness: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harness: interrupted; finished runs are kept, run the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `harness list | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0
    except OSError as e:  # the system refused: a read-only folder, a full disk, ...
        print(f"harness: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    return status


def describe_os_error(error: OSError) -> str:
    """One line naming the file, e.g. `results/x/runs/RUN_ID/model.pt: No space left on device`."""
    reason = error.strerror or str(error) or type(error).__name__
    if error.filename is None:
        return reason
    return f"{error.filename}: {reason}" + (f" (and {error.filename2})" if error.filename2 else "")


if __name__ == "__main__":
    sys.exit(main())
