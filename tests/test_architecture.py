"""The architecture's promises: an adapter is one file found through the entry point, it
learns the run's window from the run context, its declared hooks (segment, auxiliary
training losses) reach the report and the loss curve; the harness core never imports the
built-in adapters; committed records of older formats still load and reproduce their report."""

import ast
import shutil

import pytest

from harness.analysis.report import build_report
from harness.cli import main
from harness.run.records import read_record, read_suite_records
from harness.orchestrate.suite import load_suite
from harness.errors import HarnessError
from tests.conftest import ROOT, tiny_suite

ADAPTER_FILE = '''
"""A third-party adapter in one file: a byte Transformer from the shared blocks that
declares fixed 8-byte units (segment) and a small training-only loss."""
import torch
import torch.nn.functional as F
from torch import nn

from harness.api import BOS, BYTE_VOCAB, Adapter, AdapterConfig, Preparation, TrainingLoss
from harness.modeling import chunking, flops
from harness.modeling.nn import Transformer, init_weights


class Config(AdapterConfig):
    d_model: int = 16


class EightByteUnits(Adapter):
    name = "eight-byte-units"
    description = "byte Transformer with fixed 8-byte units (a test adapter from another package)"
    Config = Config

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(BYTE_VOCAB + 1, config.d_model)
        self.body = Transformer(config.d_model, 1, 2)
        self.head = nn.Linear(config.d_model, BYTE_VOCAB, bias=False)
        init_weights(self)
        self.window = 0

    def prepare(self, train, ctx):
        self.window = ctx.window  # the run's window, from the run context
        return Preparation(facts={"window_seen": ctx.window}, unit_length_counts=[0] * 7 + [len(train) // 8])

    def next_byte_logits(self, windows):
        return self.head(self.body(self.embed(F.pad(windows[:, :-1], (1, 0), value=BOS))))

    def training_loss(self, windows):
        nll = self(windows)
        return TrainingLoss(nll=nll, auxiliary={"embedding_norm": 1e-6 * self.embed.weight.pow(2).mean()})

    def segment(self, windows):
        return None, chunking.static_starts(*windows.shape, 8, windows.device)

    def flops_per_byte(self, window):
        body = flops.transformer(window, self.config.d_model, 1) / window
        head = flops.linear(1, self.config.d_model, BYTE_VOCAB)
        return {"transformer": body, "head": head, "total": body + head}
'''


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """Install the one-file adapter as a package would: a module and an entry point."""
    from harness.api import registry

    # the built-ins register once, as their packages are imported; before the site is on the
    # path, or a first discovery here would register the third-party adapter for good
    registry.available()
    (tmp_path / "site" / "eight_byte_units.py").parent.mkdir()
    (tmp_path / "site" / "eight_byte_units.py").write_text(ADAPTER_FILE)
    dist = tmp_path / "site" / "eight_byte_units-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: eight-byte-units\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[harness.adapters]\neight = eight_byte_units:EightByteUnits\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(registry, "_discovered", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return "eight-byte-units"


def test_a_one_file_adapter_from_an_entry_point_runs_a_suite_and_reports(third_party, write_suite, tmp_path, capsys):
    suite = tiny_suite(eval={"window": 48, "max_windows": 8, "batch_windows": 8},
                       models=[{"name": "eight", "adapter": third_party, "config": {"d_model": 16}}])
    results = tmp_path / "results"
    assert main(["run", str(write_suite(suite)), "--results", str(results), "--quiet", "--device", "cpu"]) == 0
    (record,) = read_suite_records(results / "tiny")
    assert record.model.adapter == third_party and 0 < record.test.bpb < 9
    assert record.preparation.facts["window_seen"] == 48  # the suite's eval.window, through the run context
    assert all(point.auxiliary and "embedding_norm" in point.auxiliary for point in record.loss_curve)
    assert record.segmentation.example_starts[:3] == [0, 8, 16]
    assert main(["report", str(results / "tiny")]) == 0
    report = (results / "tiny" / "report.md").read_text()
    picture = results / "tiny" / "plots" / "segment_eight_pydoc-topics.png"
    assert f"plots/{picture.name}" in report and picture.stat().st_size > 1000
    assert (results / "tiny" / "plots" / "patch_sizes_pydoc-topics.png").is_file()  # its declared unit lengths


def test_the_harness_core_does_not_import_the_adapters():
    for path in (ROOT / "harness").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in ("baselines", "byteflow"), f"{path}: imports {name}"


def test_a_key_given_twice_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("name: a\nbudgets: [1e9]\ntrainer: {lr: 1.0e-3}\ntrainer: {lr: 3.0e-3}\n")
    with pytest.raises(HarnessError, match=r"twice.yaml: line 4: duplicate key 'trainer' \(first at line 3\)"):
        load_suite(path)
    anchors = tmp_path / "anchors.yaml"  # a merge key is not a duplicate
    anchors.write_text((ROOT / "suites" / "matched_flops.yaml").read_text())
    assert load_suite(anchors).name == "matched_flops"


@pytest.mark.parametrize("study", ["matched_flops", "matched_inference"])
def test_committed_records_of_format_2_load(study):
    records = read_suite_records(ROOT / "results" / study)
    assert len(records) == {"matched_flops": 180, "matched_inference": 60}[study]
    entropy = next(r for r in records if r.model.name == "blt-entropy")
    assert entropy.preparation.auxiliary_flops == entropy.auxiliary_training_flops > 0
    assert sum(entropy.preparation.unit_length_counts) == entropy.preparation.facts["patches"]


def test_the_committed_report_is_what_the_records_give(tmp_path):
    study = tmp_path / "matched_inference"
    shutil.copytree(ROOT / "results" / "matched_inference", study, ignore=shutil.ignore_patterns("plots", "report.md"))
    assert build_report(study, study) == (ROOT / "results" / "matched_inference" / "report.md").read_text()


def test_a_record_of_an_unknown_format_is_one_line(tmp_path):
    record = ROOT / "results" / "matched_inference" / "runs"
    raw = next(record.glob("*/record.json")).read_text().replace('"format_version": 2', '"format_version": 9', 1)
    (tmp_path / "record.json").write_text(raw)
    with pytest.raises(HarnessError, match="record format 9, this harness reads 2 to 4"):
        read_record(tmp_path / "record.json")


def test_the_attention_window_key_was_renamed_and_old_records_still_load(tmp_path):
    """`window` in a model config was the attention window; it is `attn_window` now (eval.window is the
    evaluation window). An old key is one line naming the new one; format-3 records migrate."""
    from harness.api import build

    with pytest.raises(Exception, match="'window' is now 'attn_window'"):
        build("bytes", {"d_model": 32, "n_layers": 1, "n_heads": 2, "window": 16})
    records = [r for r in read_suite_records(ROOT / "results" / "study_v2") if r.model.adapter in ("hnet", "patcher")]
    hnet = next(r for r in records if r.model.adapter == "hnet")
    entropy = next(r for r in records if r.model.name == "blt-entropy")
    assert hnet.model.config["attn_window"] == 64 and "window" not in hnet.model.config
    assert entropy.model.config["entropy_model"]["attn_window"] == 64
    assert build(hnet.model.adapter, hnet.model.config).config.attn_window == 64
