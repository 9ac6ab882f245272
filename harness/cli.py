"""`harness`: run suites, report results, list adapters.

Errors a user can fix print one line (`harness: error: ...`) and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from pathlib import Path

from harness.errors import HarnessError
from harness.commands.export import add_parser as add_export_parser
from harness.commands.lm_eval import add_parser as add_lm_eval_parser
from harness.analysis.segment import add_parser as add_segment_parser

EPILOG = """examples:
  harness run suites/smoke.yaml            train + evaluate every run of a suite
  harness report results/smoke             results/smoke/report.md, plots in results/smoke/plots
  harness report results/smoke -o -        the markdown to stdout instead
  harness list                             adapters, their descriptions and config fields
  harness export results/smoke/runs/bpe__C2.50e11__s0 exported/bpe
                                           a bpe run as a transformers model + tokenizer
  harness segment results/smoke/runs/byteflow-l2__C2.50e11__s0 --split test
                                           chunk boundaries of a ByteFlow or patcher run, printed and as PNG
  harness lm-eval --model harness --model_args pretrained=results/smoke/runs/RUN_ID --tasks harness_bpb
                                           lm-evaluation-harness on a checkpoint (every option is lm-eval's)
"""


def cmd_run(args: argparse.Namespace) -> None:
    from harness.core.runner import run_suite

    out = run_suite(args.suite, Path(args.results), args.device, show_progress=not args.quiet,
                    save_every_s=args.save_every)
    print(f"records in {out}/runs; next: harness report {out}")


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


def _type_name(annotation) -> str:
    """int, float, one of a|b, ... for `harness list`."""
    args, origin = typing.get_args(annotation), typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (tuple, list):
        return "list of " + _type_name(args[0])
    if args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (" or null" if type(None) in args else "")
    return getattr(annotation, "__name__", str(annotation))


def cmd_list(args: argparse.Namespace) -> None:
    from harness.api import registry

    for name, cls in registry.available().items():
        print(f"{name}: {cls.description}")
        if cls.sizing is not None:
            print(f"    (sized to an inference cost by {cls.sizing.width} in steps of 2 x {cls.sizing.heads}, "
                  f"then {cls.sizing.depth})")
        for field, info in cls.Config.model_fields.items():
            default = f"{info.default:.4g}" if isinstance(info.default, float) else repr(info.default)
            help_text = f"  {info.description}" if info.description else ""
            print(f"    {field} ({_type_name(info.annotation)}, default {default}){help_text}")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="harness",
        description="Benchmark tokenizers and tokenizer-free byte models under matched FLOP budgets, in bits per byte.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train and evaluate every run of a suite (resumes where it stopped)",
                         description="Train and evaluate every (model, budget, seed) of a suite file. Runs whose "
                                     "record exists with the same config are skipped, so an interrupted suite "
                                     "finishes when started again.")
    run.add_argument("suite", help="suite YAML file, e.g. suites/smoke.yaml")
    run.add_argument("--results", default="results", help="root folder for results (default: results); "
                                                         "records go to RESULTS/SUITE_NAME/runs/RUN_ID/")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="auto takes CUDA when present (bf16 autocast), else CPU")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--save-every", type=float, default=60.0, metavar="SECONDS",
                     help="save a resumable training state this often (default 60); an interrupted run "
                          "continues from it")
    run.set_defaults(func=cmd_run)

    report = sub.add_parser("report", help="markdown tables and plots from a results directory",
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

    listing = sub.add_parser("list", help="list adapters with their config fields",
                             description="List the registered adapters (built-in and from the harness.adapters "
                                         "entry-point group) with a one-line description and their config fields.")
    listing.set_defaults(func=cmd_list)
    add_export_parser(sub)
    add_segment_parser(sub)
    add_lm_eval_parser(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
    except HarnessError as e:
        print(f"harness: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harness: interrupted; finished runs are kept, run the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `harness list | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
