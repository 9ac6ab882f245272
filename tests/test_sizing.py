"""Matched inference cost (harness.sizing): every adapter is sized to a target within 5%
by its declared width (then depth), keeps its preparation, and an impossible target
fails with a one-line error naming the model and the closest reachable cost."""

import json

import pytest
import torch

from harness.api import registry
from harness.cli import main
from harness.run.data import embedded_corpus
from harness.errors import HarnessError
from harness.run.records import read_suite_records
from harness.run.checkpoint import load_checkpoint
from harness.run.sizing import TOLERANCE, inference_flops_per_byte, resize, size_to_target
from harness.orchestrate.suite import load_suite
from tests.conftest import ROOT, SMALL_CONFIGS, SMALL_WINDOW, context, tiny_suite

TRAIN = embedded_corpus("pydoc-topics", 40_000)


def test_every_adapter_declares_sizing_fields_and_has_a_small_config():
    for name, cls in registry.available().items():
        assert name in SMALL_CONFIGS, f"add a small config for {name} to tests/conftest.py"
        assert cls.sizing is not None, f"adapter {name} declares no sizing fields"
        fields = cls.Config.model_fields
        assert {cls.sizing.width, cls.sizing.depth, cls.sizing.heads} <= set(fields)


@pytest.fixture(scope="module")
def prepared():
    """One prepared small model per adapter (tokenizers, entropy model, patch rates)."""
    models = {}
    for name, config in SMALL_CONFIGS.items():
        torch.manual_seed(0)
        model = registry.build(name, config)
        model.prepare(TRAIN, context())
        models[name] = model
    return models


@pytest.mark.parametrize("adapter", sorted(SMALL_CONFIGS))
@pytest.mark.parametrize("factor", [1.3, 3.0])  # hierarchical models cannot shrink their local parts
def test_sizing_meets_the_target_and_keeps_the_preparation(prepared, adapter, factor):
    model = prepared[adapter]
    fields = model.sizing
    target = factor * inference_flops_per_byte(model, SMALL_WINDOW)
    config, facts = size_to_target(model, target, SMALL_WINDOW)
    resized = resize(model, config)

    achieved = inference_flops_per_byte(resized, SMALL_WINDOW)
    assert abs(achieved / target - 1) <= TOLERANCE
    assert achieved == pytest.approx(facts["achieved_flops_per_byte"], rel=1e-12)
    assert facts["target_flops_per_byte"] == target and abs(facts["relative_error"]) <= TOLERANCE
    # only the declared width and depth change, and the width splits into heads of even width
    before, after = model.config.model_dump(), config.model_dump()
    assert {k for k in before if before[k] != after[k]} <= {fields.width, fields.depth}
    assert after[fields.width] != before[fields.width] or after[fields.depth] != before[fields.depth]
    assert after[fields.width] % (2 * after[fields.heads]) == 0
    # the preparation came along: same units per byte, and the resized model scores bytes
    assert resized.units_per_byte() == model.units_per_byte()
    windows = torch.tensor(list(TRAIN[:2 * SMALL_WINDOW])).view(2, SMALL_WINDOW)
    with torch.no_grad():
        nll = resized.eval()(windows)
    assert nll.shape == windows.shape and torch.isfinite(nll).all()


@pytest.mark.parametrize("adapter", sorted(SMALL_CONFIGS))
def test_an_impossible_target_names_the_model_and_the_closest_cost(prepared, adapter):
    model = prepared[adapter]
    with pytest.raises(HarnessError, match=rf"model 'm' \({adapter}\): .* the closest is [0-9.e+]+ \(") as error:
        size_to_target(model, 1.0, SMALL_WINDOW, label="m")
    assert "\n" not in str(error.value)


def test_depth_changes_only_when_no_width_lands_within_tolerance():
    model = registry.build("bytes", {"d_model": 64, "n_layers": 2, "n_heads": 16})  # widths step by 32

    def cost(width: int) -> float:
        return inference_flops_per_byte(registry.build("bytes", {"d_model": width, "n_layers": 2, "n_heads": 16}), 64)

    target = (cost(64) * cost(96)) ** 0.5  # between two neighbouring widths, > 5% from both
    assert min(abs(cost(w) / target - 1) for w in (64, 96)) > TOLERANCE
    config, facts = size_to_target(model, target, 64)
    assert (config.d_model, config.n_layers) == (64, 3) and "depth" in facts["rule"]  # the nearest depth that fits
    assert abs(facts["relative_error"]) <= TOLERANCE
    assert size_to_target(model, cost(96), 64)[0].n_layers == 2  # a width that fits keeps the depth


def test_a_suite_with_an_inference_target_sizes_every_run_and_records_it(write_suite, tmp_path, capsys):
    models = [{"name": "bytes", "adapter": "bytes", "config": SMALL_CONFIGS["bytes"]},
              {"name": "bpe", "adapter": "bpe", "config": SMALL_CONFIGS["bpe"]}]
    target = 60_000.0
    path = write_suite(tiny_suite(models=models, inference_flops_per_byte=target, budgets=[4e9]))
    assert main(["run", str(path), "--results", str(tmp_path), "--quiet", "--device", "cpu"]) == 0
    records = read_suite_records(tmp_path / "tiny")
    assert len(records) == 2
    for record in records:
        sizing = record.sizing
        assert sizing["target_flops_per_byte"] == target
        assert abs(record.flops_per_byte.analytic["total"] / target - 1) <= TOLERANCE
        assert record.model.config["d_model"] == sizing["chosen"]["d_model"] != 32
        model = load_checkpoint(tmp_path / "tiny" / "runs" / record.run_id)  # rebuilt from the record alone
        assert model.config.d_model == sizing["chosen"]["d_model"]
    assert main(["report", str(tmp_path / "tiny"), "-o", str(tmp_path / "report.md")]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "sized to 6e+04 forward FLOPs per byte" in report and "### Sizing to the inference cost" in report

    # an impossible target stops the suite before any training, in one line
    capsys.readouterr()
    path = write_suite(tiny_suite(models=models, inference_flops_per_byte=10.0, name="tiny2"), "bad.yaml")
    assert main(["run", str(path), "--results", str(tmp_path), "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model 'bytes' (bytes)" in err and "closest is" in err
    assert not (tmp_path / "tiny2" / "runs").exists()
    json.loads((tmp_path / "tiny" / "suite.json").read_text())  # the first suite's results are untouched


def test_a_scaling_rule_sizes_each_budget_to_its_own_target_end_to_end(write_suite, tmp_path, capsys):
    models = [{"name": "bytes", "adapter": "bytes", "config": SMALL_CONFIGS["bytes"]},
              {"name": "bpe", "adapter": "bpe", "config": SMALL_CONFIGS["bpe"]}]
    rule = {"flops_per_byte": 6e4, "at_budget": 2e9, "exponent": 0.5}
    path = write_suite(tiny_suite(models=models, inference_scaling=rule, budgets=[2e9, 8e9], name="ladder"))
    command = ["run", str(path), "--results", str(tmp_path), "--quiet", "--device", "cpu"]
    assert main(command + ["--dry-run"]) == 0  # validated and listed, nothing trained
    assert capsys.readouterr().out.count("to run (dry run)") == 4 and not (tmp_path / "ladder" / "runs").exists()
    assert main(command) == 0
    records = read_suite_records(tmp_path / "ladder")
    assert len(records) == 4
    by = {(r.model.name, r.budget_flops): r for r in records}
    for (name, budget), record in by.items():
        target = 6e4 * (budget / 2e9) ** 0.5  # 6e4 at 2e9, 1.2e5 at 8e9
        assert record.sizing["target_flops_per_byte"] == pytest.approx(target, rel=1e-12)
        assert record.sizing["scaling"] == rule
        assert abs(record.flops_per_byte.analytic["total"] / target - 1) <= TOLERANCE
    for name in ("bytes", "bpe"):  # the models grow with the budget
        assert by[name, 8e9].model.config["d_model"] > by[name, 2e9].model.config["d_model"]
    for budget in (2e9, 8e9):  # a rung's models share its inference cost, so its training bytes too
        assert by["bpe", budget].bytes_seen == pytest.approx(by["bytes", budget].bytes_seen, rel=0.15)
    assert main(["report", str(tmp_path / "ladder"), "-o", str(tmp_path / "report.md")]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "sized to 6e+04 x (C / 2e+09)^0.5 forward FLOPs per byte" in report
    assert "6e+04 at 2e+09, 1.2e+05 at 8e+09" in report
    assert "| model   | budget   | rule" in report  # the sizing table has a row per model and budget
    assert "Scaling fits need at least 4 budgets per model; these records have 2, so no curve is fitted." in report


def test_the_study_ladder_suite_sizes_every_adapter_over_five_rungs_without_repeating_data():
    suite = load_suite(ROOT / "suites" / "study_v2.yaml")
    budgets = sorted(suite.budgets)
    assert len(budgets) >= 5 and 0.5e11 <= budgets[0] <= 2e11
    assert all(2.5 <= high / low <= 3.5 for low, high in zip(budgets, budgets[1:]))  # about 3x apart
    assert suite.inference_scaling is not None and suite.inference_flops_per_byte is None
    assert {m.adapter for m in suite.models} == set(registry.available())
    targets = [suite.inference_target(b) for b in budgets]
    assert targets == sorted(targets) and targets[0] < targets[-1]
    # training bytes at the top rung, C / (3 x target): at most 2 epochs over the training split
    assert budgets[-1] / (3 * targets[-1]) <= 2 * suite.split.train_bytes
