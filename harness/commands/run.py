"""`harness run SUITE`: train and evaluate every run of a suite (harness.core.runner)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_run(args: argparse.Namespace) -> None:
    from harness.core.runner import run_suite

    out = run_suite(args.suite, Path(args.results), args.device, show_progress=not args.quiet,
                    save_every_s=args.save_every, retry_failed=args.retry_failed, dry_run=args.dry_run,
                    tensorboard_dir=Path(args.tensorboard) if args.tensorboard else None)
    print(f"{'suite.json' if args.dry_run else 'records'} in {out}; next: harness report {out}")


def add_parser(subparsers) -> argparse.ArgumentParser:
    run = subparsers.add_parser("run", help="train and evaluate every run of a suite (resumes where it stopped)",
                         description="Train and evaluate every (model, budget, seed) of a suite file. Runs whose "
                                     "record exists with the same config are skipped, so an interrupted suite "
                                     "finishes when started again. A run that diverges or fails leaves a "
                                     "failure.json instead of a record and the suite goes on; the command then "
                                     "exits with status 2. Processes sharing a results folder split the runs "
                                     "between them (one lock per run).")
    run.add_argument("suite", help="suite YAML file, e.g. suites/smoke.yaml")
    run.add_argument("--results", default="results", help="root folder for results (default: results); "
                                                         "records go to RESULTS/SUITE_NAME/runs/RUN_ID/")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="auto takes CUDA when present (bf16 autocast), else CPU")
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
                          "which runs are done and which would run")
    run.add_argument("--retry-failed", "--retry-diverged", action="store_true", dest="retry_failed",
                     help="run again the runs that diverged or failed before (by default they are skipped)")
    run.set_defaults(func=cmd_run)

    return run
