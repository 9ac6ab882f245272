"""`harness export RUN_DIR OUT_DIR`: a trained run in another library's format, through its
adapter's export hook (token models with a Llama body: a transformers model plus tokenizer,
loadable with AutoModelForCausalLM / AutoTokenizer from OUT_DIR). Beside the weights goes a
short model card, OUT_DIR/README.md: adapter, corpus and its hash, trained window, test bpb,
and the commands that made it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.run.records import RunRecord


def export_run(run_dir: str | Path, out_dir: str | Path) -> str:
    """Write the run's model and a model card (README.md) to out_dir; returns what was written, in words."""
    from harness.run.checkpoint import load_checkpoint  # torch: imported when a command runs, not for `harness --help`
    from harness.run.records import read_record

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    record = read_record(run_dir / "record.json")
    model = load_checkpoint(run_dir, "cpu")
    before = _file_stamps(out_dir)
    written = model.export(out_dir, record.model_dump(mode="json"))
    (out_dir / "README.md").write_text(model_card(record, run_dir, out_dir, written))
    _give_plain_modes(out_dir, before)
    return written


def _file_stamps(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}


def _give_plain_modes(folder: Path, before: dict[Path, int]) -> None:
    """The files the export wrote get the mode open() gives (0644 under umask 022), like every file the
    harness writes: a library may write a 0600 temporary and rename it (model.safetensors did)."""
    from harness.storage import file_mode

    mode = file_mode()
    for path, stamp in _file_stamps(folder).items():
        if before.get(path) != stamp:
            path.chmod(mode)


def model_card(record: RunRecord, run_dir: Path, out_dir: Path, written: str) -> str:
    """A short model card: what the model is, what it was trained and scored on, how it was made."""
    window = record.eval.window
    eos = json.loads((out_dir / "config.json").read_text()).get("eos_token_id") if (out_dir / "config.json").is_file() else None
    corpus = record.corpus
    return "\n".join([
        f"# {record.run_id}",
        "",
        f"{written[0].upper()}{written[1:]}, exported from a tokenizer-harness run (suite `{record.suite}`).",
        "",
        f"- Adapter: `{record.model.adapter}` (model `{record.model.name}`), {record.parameters['total']:,} parameters; "
        f"config `{json.dumps(record.model.config, sort_keys=True)}`.",
        f"- Corpus: `{corpus.label}` (`{corpus.id}`), sha256 `{corpus.sha256}` of the {corpus.train_bytes:,} / "
        f"{corpus.val_bytes:,} / {corpus.test_bytes:,} bytes used (train / val / test).",
        f"- Trained on windows of **{window} bytes**, each from an empty context (BOS plus at most {window} tokens). "
        "Longer inputs run but were never trained on.",
        f"- Training: {record.budget_flops:.3g} FLOPs budget, {record.total_flops:.3g} FLOPs spent, {record.steps} steps, "
        f"{record.bytes_seen:,} bytes seen, seed {record.seed}.",
        f"- Test: **{record.test.bpb:.4f} bits per byte** over {record.test.windows} windows of {window} bytes "
        f"(val {record.val.bpb:.4f}).",
        "- End of text: " + (f"EOS is token {eos}." if eos is not None else
                             "the tokenizer has no EOS token (BOS only): the model was trained on fixed windows and "
                             "has no stop token to end a generation."),
        "",
        "Made with:",
        "",
        "```",
        f"harness run {suite_file(run_dir, record.suite)}; run {record.run_id}, config hash {record.config_hash}",
        f"harness export {run_dir} {out_dir}",
        "```",
        "",
    ])


def suite_file(run_dir: Path, suite: str) -> str:
    """The suite file the run was made from, as recorded in RESULTS/SUITE/suite.json around
    RESULTS/SUITE/runs/RUN_ID; older suite.json files name only the suite, then where it was run."""
    summary = run_dir.parent.parent / "suite.json"
    if run_dir.parent.name != "runs" or not summary.is_file():
        return f"SUITE_FILE   # the file of suite `{suite}`"
    recorded = json.loads(summary.read_text()).get("suite_file")
    return recorded or f"SUITE_FILE   # the file of suite `{suite}` (as run: {summary})"


def cmd_export(args: argparse.Namespace) -> None:
    written = export_run(args.run_dir, args.out_dir)
    print(f"wrote {written} to {args.out_dir}; load with AutoModelForCausalLM.from_pretrained('{args.out_dir}')")


def add_parser(subparsers) -> argparse.ArgumentParser:
    export = subparsers.add_parser(
        "export", help="write a trained run (bpe) as a transformers model + tokenizer",
        description="Write a finished bpe run (RUN_DIR holding record.json and model.safetensors) to OUT_DIR as a "
                    "transformers LlamaForCausalLM (MistralForCausalLM with a sliding window) and a fast tokenizer "
                    "that prepends BOS (AutoTokenizer loads it as PreTrainedTokenizerFast with transformers 4, as "
                    "TokenizersBackend with transformers 5); load both with from_pretrained(OUT_DIR). Every file "
                    "gets the mode a plain open() gives (0644 under umask 022).")
    export.add_argument("run_dir", help="e.g. results/smoke/runs/bpe__C1.00e11__s0")
    export.add_argument("out_dir", help="folder to write (created if missing)")
    export.set_defaults(func=cmd_export)
    return export
