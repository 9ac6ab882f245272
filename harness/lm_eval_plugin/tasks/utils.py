"""Data and scoring for the harness task plugin (the YAML files beside this one).

`harness_bpb` scores a suite's test split as lm-eval documents: the split is cut into the
harness evaluator's windows (consecutive, W bytes, at most eval.max_windows of them) and
each window is one document, so lm-eval's bits_per_byte equals the evaluator's test bpb.
Which suite? lm-eval passes the task its metadata, which includes the model_args:
  - `pretrained=RUN_DIR` (what the harness model takes anyway): the run's suite, read from
    RESULTS/SUITE/suite.json, checked against the run's corpus sha256;
  - `suite=PATH` (takes precedence): a suite YAML file, or a results directory holding
    suite.json; this lets any lm-eval model be scored on a harness split, e.g.
    --model hf --model_args pretrained=gpt2 --metadata '{"suite": "suites/smoke.yaml"}'.
The data are built in memory from local bytes: no `load_dataset`, no Hub, no network.

A window may end inside a UTF-8 character (and corpora may hold invalid UTF-8), so a
document's text is `bytes_to_text(window)`, which maps every byte string to valid Unicode
losslessly, and the byte count is taken from `text_to_bytes(text)`, not from the text's
UTF-8 length (the two agree whenever the window is valid UTF-8). The harness model reads
the stand-in characters back as the raw bytes; another lm-eval model sees them as text
(private-use characters), so for it only windows of valid UTF-8 are scored exactly as bytes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets

from harness.run import data
from harness.errors import HarnessError
from harness.lm_eval_plugin import TASKS_DIR, bytes_to_text, text_to_bytes
from harness.lm_eval_plugin.model import run_directory
from harness.run.records import read_record
from harness.run.spec import Suite, load_corpus
from harness.orchestrate.suite import load_suite

WORD_SPLIT = re.compile(r"\s+")  # lm-eval's word count for word_perplexity


def _suite_from_json(path: Path) -> Suite:
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise HarnessError(f"{path}: no such file (a results directory holds suite.json)") from None
    return Suite(**payload["suite"])


def resolve_suite(suite: str | None = None, pretrained: str | None = None,
                  corpus: str | None = None) -> tuple[Suite, str | None, str | None, str]:
    """(suite, corpus label, expected corpus sha256 or None, description) from the task metadata;
    a run's own corpus when the model is a harness run, else `corpus` (needed when the suite has several)."""
    if suite:
        path = Path(suite).expanduser()
        if path.is_dir():
            return _suite_from_json(path / "suite.json"), corpus, None, f"results {path}"
        if path.suffix == ".json":
            return _suite_from_json(path), corpus, None, str(path)
        return load_suite(path), corpus, None, str(path)
    if pretrained:
        try:
            run_dir = run_directory(pretrained)
        except HarnessError:
            raise HarnessError(f"pretrained={pretrained} is not a harness run directory: with another model, name the "
                               "suite to score, e.g. --metadata '{\"suite\": \"suites/smoke.yaml\"}'") from None
        record = read_record(run_dir / "record.json")
        found = _suite_from_json(run_dir.parent.parent / "suite.json")
        return found, record.corpus.label, record.corpus.sha256, f"run {run_dir}"
    raise HarnessError("task harness_bpb: which suite's test split? pass --model_args pretrained=RUN_DIR "
                       "(the harness model) or --metadata '{\"suite\": \"SUITE.yaml or RESULTS_DIR\"}'")


def test_windows(suite: str | None = None, pretrained: str | None = None, corpus: str | None = None) -> list[bytes]:
    """The harness evaluator's test windows of the suite (and corpus) named by the metadata."""
    found, label, sha256, source = resolve_suite(suite, pretrained, corpus)
    splits = load_corpus(found, label)
    if sha256 is not None and splits.sha256 != sha256:
        raise HarnessError(f"{source}: the corpus now has sha256 {splits.sha256[:12]}, the run used {sha256[:12]}")
    windows = data.windows(splits.test, found.eval.window, found.eval.max_windows)
    return [bytes(row.tolist()) for row in windows]


def test_split(suite: str | None = None, pretrained: str | None = None, corpus: str | None = None,
               **metadata) -> datasets.DatasetDict:
    """custom_dataset of harness_bpb: one document per evaluation window of the test split."""
    windows = test_windows(suite, pretrained, corpus)
    documents = {"text": [bytes_to_text(w) for w in windows], "window": list(range(len(windows)))}
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(documents)})


def process_results(doc: dict, results: list[float]) -> dict:
    """(log-likelihood, count) pairs for lm-eval's weighted_perplexity and bits_per_byte aggregations."""
    (loglikelihood,) = results
    text = doc["text"]
    n_bytes = len(text_to_bytes(text))
    return {
        "bits_per_byte": (loglikelihood, n_bytes),
        "byte_perplexity": (loglikelihood, n_bytes),
        "word_perplexity": (loglikelihood, len(WORD_SPLIT.split(text))),
    }


def arc_easy_local(**metadata) -> datasets.DatasetDict:
    """custom_dataset of harness_arc_easy_local: arc_easy's schema, questions from arc_easy_local.jsonl
    (written for this plugin; a few marked split=train serve as few-shot examples)."""
    rows = [json.loads(line) for line in (TASKS_DIR / "arc_easy_local.jsonl").read_text().splitlines() if line.strip()]
    splits = {}
    for name in ("train", "test"):
        chosen = [{k: v for k, v in row.items() if k != "split"} for row in rows if row["split"] == name]
        splits[name] = datasets.Dataset.from_list(chosen)
    return datasets.DatasetDict(splits)
