"""`harness run SUITE`: train and evaluate every run of a suite (harness.orchestrate.runner), in this
process, as jobs on this machine or a Slurm cluster (harness.orchestrate.dispatch), or one run at a
time across processes (harness.run.distributed)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

EXECUTOR_OPTIONS = ("workers", "gpus_per_run", "partition", "account", "qos", "time_min")


def cmd_run(args: argparse.Namespace) -> int:
    from harness.orchestrate.runner import run_suite

    if args.nproc < 1:
        raise_error(f"--nproc: {args.nproc}; give 1 or more processes")
    check_threads(args.threads)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # not yet inside the processes it asks for
        if args.executor not in (None, "none"):
            raise_error("--nproc: with --executor, a run's processes are its GPUs (--gpus-per-run)")
        from harness.orchestrate.launch import launch
        from harness.orchestrate.attempts import check_shares
        from harness.orchestrate.suite import load_suite

        check_shares(load_suite(args.suite), args.nproc)  # before any process starts
        import torch

        if args.device != "cpu" and torch.cuda.is_available() and args.nproc > torch.cuda.device_count():
            raise_error(f"--nproc {args.nproc}: one GPU per process, and {torch.cuda.device_count()} are visible")
        return launch(args.nproc, args.main, args.argv)
    executor = executor_settings(args)
    if executor is None and args.executor is None and not args.dry_run:
        executor = workers_when_busy(args.threads, args.device)
    threads = args.threads if executor is not None else pick_threads(args.threads)  # an executor shares the cores itself
    out = run_suite(args.suite, Path(args.results), args.device, show_progress=not args.quiet,
                    save_every_s=args.save_every, retry_failed=args.retry_failed, dry_run=args.dry_run,
                    tensorboard_dir=Path(args.tensorboard) if args.tensorboard else None,
                    executor=executor, threads=threads)
    if os.environ.get("RANK", "0") == "0":
        print(f"{'suite.json' if args.dry_run else 'records'} in {out}; next: harness report {out}")
    return 0


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise_error(f"--threads: {threads}; give 1 or more")


def workers_when_busy(threads: int | None, device: str):
    """Where other jobs' ready threads fill every core, a run's threads wait for each other at every
    operator (docs/speed.md, "Threads"): the runs go out as one-thread local workers, one per usable
    core, rather than one process on those cores; else None. Not when the user set the threads
    (--threads, OMP_NUM_THREADS), the runs use a GPU, or HARNESS_WORKERS_WHEN_BUSY=0."""
    from harness.run.device import other_threads, usable_cores
    from harness.run.distributed import log
    from harness.run.spec import ExecutorSettings

    cores, others = usable_cores(), other_threads()
    if (threads is not None or os.environ.get("OMP_NUM_THREADS") or os.environ.get("HARNESS_WORKERS_WHEN_BUSY") == "0"
            or cores < 2 or others < cores or "WORLD_SIZE" in os.environ):
        return None
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return None
    log(f"busy cores: {others} threads of other jobs are ready to run on {cores}, so the runs go out as {cores} "
        "one-thread local workers (--executor none or --threads keeps them in this process)")
    return ExecutorSettings(kind="local", workers=cores)


def pick_threads(requested: int | None) -> int:
    """--threads, else the free usable cores (harness.run.device.choose_threads), said in one line."""
    from harness.run.device import choose_threads
    from harness.run.distributed import log

    count, reason = choose_threads(requested)
    log(f"torch threads: {reason}")
    return count


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """--device and --threads, shared by `run` and `bench`."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto takes CUDA when present (bf16 autocast), else CPU")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (torch.set_num_threads; recorded). By default the usable cores that other "
                             "jobs' ready threads leave free (at least one), waiting passively where they fill every core "
                             "(docs/speed.md, \"Threads\")")


def raise_error(message: str):
    from harness.errors import HarnessError

    raise HarnessError(message)


def executor_settings(args: argparse.Namespace):
    """The executor the options and the suite's `executor:` section ask for (options win), or None
    for the runs one after another in this process."""
    from pydantic import ValidationError

    from harness.run.spec import ExecutorSettings

    from harness.orchestrate.suite import load_suite

    given = {key: getattr(args, key) for key in EXECUTOR_OPTIONS if getattr(args, key) is not None}
    if args.executor == "none":
        if given:
            raise_error(f"--{next(iter(given)).replace('_', '-')}: only with --executor local or slurm")
        return None
    section = load_suite(args.suite).executor
    if args.executor is None and not given and section is None:
        return None
    base = section.model_dump(exclude_unset=True) if section is not None else {}
    if args.executor is not None and args.executor != base.get("kind", "local"):
        base = {}  # the suite's settings are for the other executor
    try:
        return ExecutorSettings(**base | {"kind": args.executor or base.get("kind", "local")} | given)
    except ValidationError as e:
        first = e.errors()[0]
        key = first["loc"][0] if first["loc"] else next((k for k in given if first["msg"].startswith(f"Value error, {k} ")),
                                                        None)  # a check of the whole section names its key first
        option = f"--{key.replace('_', '-')}" if key in given else (f"{args.suite}: executor" if key is None
                                                                     else f"{args.suite}: executor.{key}")
        raise_error(f"{option}: {first['msg'].removeprefix('Value error, ')}")


def add_parser(subparsers) -> argparse.ArgumentParser:
    run = subparsers.add_parser("run", help="train and evaluate every run of a suite (resumes where it stopped)",
                         description="Train and evaluate every (model, budget, seed) of a suite file. Runs whose "
                                     "record exists with the same config are skipped, so an interrupted suite "
                                     "finishes when started again. A run that diverges or fails leaves a "
                                     "failure.json instead of a record and the suite goes on; the command then "
                                     "exits with status 2. Processes sharing a results folder split the runs "
                                     "between them (one lock per run). By default the runs train one after another "
                                     "in this process; --executor sends them out as jobs (on this machine or a "
                                     "Slurm cluster), --nproc trains each run across processes (DDP).")
    run.add_argument("suite", help="suite YAML file, e.g. suites/smoke.yaml")
    run.add_argument("--results", default="results", help="root folder for results (default: results); "
                                                         "records go to RESULTS/SUITE_NAME/runs/RUN_ID/")
    add_device_options(run)
    run.add_argument("--quiet", action="store_true",
                     help="no progress (by default a bar on a terminal, a plain line every 30 s in a log)")
    run.add_argument("--tensorboard", metavar="DIR",
                     help="also log each run's training curves (train bpb, learning rate, bytes/s) for TensorBoard "
                          "to DIR/SUITE_NAME/RUN_ID (needs the optional tensorboard package)")
    run.add_argument("--save-every", type=float, default=60.0, metavar="SECONDS",
                     help="save a resumable training state this often (default 60); an interrupted run "
                          "continues from it")
    run.add_argument("--dry-run", action="store_true",
                     help="train nothing: write RESULTS/SUITE_NAME/suite.json (corpora, reference rows) and list "
                          "which runs are done and which would run; a suite with an inference target also prepares "
                          "each model once to check that a size meets it")
    run.add_argument("--retry-failed", "--retry-diverged", action="store_true", dest="retry_failed",
                     help="run again the runs that diverged or failed before (by default they are skipped)")
    scale = run.add_argument_group(
        "scale-out", "Jobs go through submitit; the results folder must be on a filesystem every job sees. These "
                     "options override the suite's `executor:` section. Giving any of them (or having the section) "
                     "sends the runs out; --executor none keeps them in this process.")
    scale.add_argument("--executor", choices=("local", "slurm", "none"),
                       help="local: worker jobs on this machine that share out the runs; slurm: one Slurm job per "
                            "run (a job array); a preempted or timed-out job is requeued and resumes")
    scale.add_argument("--workers", type=int, metavar="N",
                       help="runs at a time (local default: the GPUs / --gpus-per-run, 1 on a CPU machine; "
                            "slurm default: no cap)")
    scale.add_argument("--gpus-per-run", type=int, metavar="N",
                       help="GPUs per run, one DDP process each (default 1 with GPUs or on slurm, 0 on a CPU machine)")
    scale.add_argument("--partition", help="Slurm partition")
    scale.add_argument("--account", help="Slurm account")
    scale.add_argument("--qos", help="Slurm quality of service")
    scale.add_argument("--time-min", type=int, metavar="MINUTES",
                       help="Slurm time limit per job (default 240); a run that outlasts it is requeued and resumes")
    scale.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="train each run across N processes on this machine (DDP: nccl on GPUs, one each; gloo "
                            "on the CPU), launched through torch's elastic launcher as torchrun would; the global "
                            "batch and the FLOPs do not change")
    run.set_defaults(func=cmd_run)

    return run
