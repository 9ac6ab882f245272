"""`harness export RUN_DIR OUT_DIR`: a trained run in another library's format, through its
adapter's export hook (token models with a Llama body: a transformers model plus tokenizer,
loadable with AutoModelForCausalLM / AutoTokenizer from OUT_DIR)."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.api import load_checkpoint
from harness.core.records import read_record


def export_run(run_dir: str | Path, out_dir: str | Path) -> str:
    """Write the run's model to out_dir; returns what was written, in words."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    record = read_record(run_dir / "record.json")
    model = load_checkpoint(run_dir, "cpu")
    return model.export(out_dir, record.model_dump(mode="json"))


def cmd_export(args: argparse.Namespace) -> None:
    written = export_run(args.run_dir, args.out_dir)
    print(f"wrote {written} to {args.out_dir}; load with AutoModelForCausalLM.from_pretrained('{args.out_dir}')")


def add_parser(subparsers) -> argparse.ArgumentParser:
    export = subparsers.add_parser(
        "export", help="write a trained run (bpe) as a transformers model + tokenizer",
        description="Write a finished bpe run (RUN_DIR holding record.json and model.pt) to OUT_DIR as a "
                    "transformers LlamaForCausalLM (MistralForCausalLM with a sliding window) and a "
                    "PreTrainedTokenizerFast that prepends BOS; load both with from_pretrained(OUT_DIR).")
    export.add_argument("run_dir", help="e.g. results/smoke/runs/bpe__C2.50e11__s0")
    export.add_argument("out_dir", help="folder to write (created if missing)")
    export.set_defaults(func=cmd_export)
    return export
