"""`harness report RESULTS_DIR`: the markdown report and plots of a suite's records
(harness.analysis.report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.errors import HarnessError


def cmd_report(args: argparse.Namespace) -> None:
    from harness.analysis.report import build_report

    results = Path(args.results_dir)
    if not results.is_dir():
        raise HarnessError(f"{results}: no such results directory")
    output = results / "report.md" if args.output is None else Path(args.output)
    report_dir = results if args.output == "-" else output.parent
    markdown = build_report(results, report_dir)
    if args.output == "-":
        print(markdown)
    else:
        output.write_text(markdown)
        print(f"wrote {output} and plots in {report_dir / 'plots'}")


def add_parser(subparsers) -> argparse.ArgumentParser:
    report = subparsers.add_parser("report", help="markdown tables and plots from a results directory",
                            description="Build the markdown report of a suite's records, a section per corpus: a generated "
                                        "summary of who leads at each budget, mean test bpb per model and budget with "
                                        "95% intervals, a ranking with significance tests, every run, tokenizers, "
                                        "compressor reference rows, sizing and other evaluation rules; PNG plots "
                                        "(bpb against training FLOPs and against forward FLOPs per byte, learning "
                                        "curves, patch and chunk lengths) in a plots/ folder beside the markdown.")
    report.add_argument("results_dir", help="e.g. results/smoke")
    report.add_argument("-o", "--output", help="where the markdown goes (default RESULTS_DIR/report.md; - for "
                                               "stdout); the plots go in a plots/ folder beside it")
    report.set_defaults(func=cmd_report)

    return report
