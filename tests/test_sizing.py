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
from harness.run.spec import SizingSettings, expand
from tests.conftest import ROOT, SMALL_CONFIGS, SMALL_WINDOW, context, tiny_suite

TRAIN = embedded_corpus("pydoc-topics", 40_000)


def test_every_adapter_declares_sizing_fields_and_has_a_small_config():
    for name, cls in registry.available().items():
        assert name in SMALL_CONFIGS, f"add a small config for {name} to tests/conftest.py"
        assert cls.sizing is not None, f"adapter {name} declares no sizing fields"
        fields = cls.Config.model_fields
        assert {cls.sizing.width, cls.sizing.depth, cls.sizing.heads} <= set(fields)
        for width, heads in cls.sizing.other_widths.items():  # every width names a field, and its heads too
            assert width in fields and (heads is None or heads in fields), (name, width, heads)


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
@pytest.mark.parametrize("factor", [1.3, 3.0])
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
    # only the declared widths and depth change, and each width splits into heads of even width
    before, after = model.config.model_dump(), config.model_dump()
    assert {k for k in before if before[k] != after[k]} <= set(fields.widths()) | {fields.depth}
    assert after[fields.width] != before[fields.width] or after[fields.depth] != before[fields.depth]
    for width, heads in fields.widths().items():
        assert heads is None or after[width] % (2 * after[heads]) == 0, width
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


# ---- every width grows (issue 28) ------------------------------------------------------------

def _assert_ratios_kept(model, config):
    """Every other width is the configured one times the main width's factor, within half of its
    own step (2 x its heads), and at least one step."""
    fields, before, after = model.sizing, model.config.model_dump(), config.model_dump()
    factor = after[fields.width] / before[fields.width]
    for width, heads in fields.other_widths.items():
        step = 2 * before[heads] if heads else 1
        assert abs(after[width] - before[width] * factor) <= step / 2 or after[width] == step, (width, after[width])


@pytest.mark.parametrize("adapter", ["spacebyte", "patcher", "hnet", "megabyte", "byteflow"])
@pytest.mark.parametrize("factor", [0.7, 3.0, 12.0])
def test_proportional_sizing_keeps_the_ratios_and_meets_the_target(prepared, adapter, factor):
    model = prepared[adapter]
    target = factor * inference_flops_per_byte(model, SMALL_WINDOW)
    config, facts = size_to_target(model, target, SMALL_WINDOW)
    achieved = inference_flops_per_byte(resize(model, config), SMALL_WINDOW)
    assert abs(achieved / target - 1) <= TOLERANCE and facts["widths"] == "all"
    _assert_ratios_kept(model, config)
    # the record's facts list every width, configured and chosen
    assert set(model.sizing.widths()) <= set(facts["configured"]) & set(facts["chosen"])
    assert all(facts["chosen"][w] == getattr(config, w) for w in model.sizing.widths())
    if factor > 1:  # grown, not only the main width
        assert all(getattr(config, w) > getattr(model.config, w) for w in model.sizing.widths()), config


def test_the_main_rule_keeps_the_other_widths(prepared):
    model = prepared["spacebyte"]
    target = 3 * inference_flops_per_byte(model, SMALL_WINDOW)
    config, facts = size_to_target(model, target, SMALL_WINDOW, widths="main")
    assert config.d_local == model.config.d_local and config.d_global > model.config.d_global
    assert facts["widths"] == "main" and facts["rule"] == "width (d_global) at the configured depth"
    assert size_to_target(model, target, SMALL_WINDOW)[1]["rule"] == "width (d_global, d_local) at the configured depth"


@pytest.mark.parametrize("name", ["spacebyte", "blt-space"])
def test_spacebyte_and_the_patcher_at_the_studys_top_rung_grow_both_widths_in_the_configured_ratio(name):
    """study_v2's models with the papers' local width (kjslag: d_local = d_global / 2), sized to
    the study's top rung (8.1e12 under its scaling rule): both widths grow, the ratio holds."""
    suite = load_suite(ROOT / "suites" / "study_v2.yaml")
    entry = next(m for m in suite.models if m.name == name)
    config = {**entry.config, "d_local": 64, "d_global": 128, "calibration_bytes": 16384}
    model = registry.build(entry.adapter, config)
    model.prepare(embedded_corpus("stdlib-docstrings", 200_000), context(window=suite.eval.window))
    target = suite.inference_target(8.1e12)
    assert target == pytest.approx(3.24e6)
    sized, facts = size_to_target(model, target, suite.eval.window)
    assert abs(facts["relative_error"]) <= TOLERANCE
    assert sized.d_global >= 2 * 128 and sized.d_local >= 2 * 64  # both grew
    assert abs(sized.d_local - sized.d_global / 2) <= 4  # the ratio, within half a step (2 x 4 heads)


def test_the_main_rule_reproduces_the_committed_study_sizes():
    """Records of suites/study_v2.yaml (which declares `sizing: {widths: main}`): sizing their
    configured models again gives the chosen sizes and costs in the records, and the suite's runs
    hash as their records do (so they stay done)."""
    from harness.run.records import read_record
    from harness.run.spec import load_corpus

    suite = load_suite(ROOT / "suites" / "study_v2.yaml")
    assert suite.sizing.widths == "main"
    runs = {run.run_id: run for run in expand(suite)}
    corpus = load_corpus(suite)
    for run_id in ("megabyte-p4__C8.10e12__s0", "spacebyte__C2.70e12__s0"):
        record = read_record(ROOT / "results" / "study_v2" / "runs" / run_id / "record.json")
        run = runs[run_id]
        assert run.config_hash(suite) == record.config_hash
        torch.manual_seed(run.seed)
        model = registry.build(run.model.adapter, run.model.config)
        model.prepare(corpus.train, context(window=suite.eval.window, seed=run.seed))
        config, facts = size_to_target(model, suite.inference_target(run.budget), suite.eval.window,
                                       suite.count_auxiliary_flops, widths=suite.sizing.widths)
        assert {k: facts["chosen"][k] for k in record.sizing["chosen"]} == record.sizing["chosen"]
        assert facts["achieved_flops_per_byte"] == pytest.approx(record.sizing["achieved_flops_per_byte"], rel=1e-9)
        assert config.d_local == record.model.config["d_local"]  # the local width as configured
        grown = size_to_target(model, suite.inference_target(run.budget), suite.eval.window)[0]
        assert grown.d_local != config.d_local  # the new rule would have grown it


def test_the_widths_setting_enters_the_hash_only_where_it_is_not_the_old_rule():
    base = load_suite(ROOT / "suites" / "study_v2.yaml")
    run = expand(base)[0]
    main = base.model_copy(update={"sizing": SizingSettings(widths="main")})
    every = base.model_copy(update={"sizing": SizingSettings(widths="all")})
    assert run.config_hash(main) == run.config_hash(base) != run.config_hash(every)
    unsized = every.model_copy(update={"inference_scaling": None})  # no target: the setting changes nothing
    assert run.config_hash(unsized) == run.config_hash(unsized.model_copy(update={"sizing": SizingSettings(widths="main")}))
    assert SizingSettings().widths == "all"  # new suites grow every width


def test_hnet_is_sized_with_the_chunk_rate_it_is_given():
    """H-Net's learned rate drifts from 1/N: `sizing_bytes_per_chunk` (measured on earlier runs)
    is the rate its cost assumes before training; the rate measured after training replaces it.
    study_v2's H-Net at its top rung (window 256, target 3.24e6)."""
    suite = load_suite(ROOT / "suites" / "study_v2.yaml")
    config, window = next(m for m in suite.models if m.name == "hnet").config, suite.eval.window
    target = suite.inference_target(8.1e12)
    default = registry.build("hnet", config)
    given = registry.build("hnet", {**config, "sizing_bytes_per_chunk": 4.5})
    assert default.units_per_byte() == pytest.approx(1 / 6) and given.units_per_byte() == pytest.approx(1 / 4.5)
    sized_default, _ = size_to_target(default, target, window)
    sized_given, _ = size_to_target(given, target, window)
    assert sized_given.d_main < sized_default.d_main  # more chunks per byte: a narrower main network

    def cost_at(config, bytes_per_chunk: float) -> float:
        model = registry.build("hnet", config.model_dump())
        model.chunk_rate = 1 / bytes_per_chunk  # as if measured after training
        return inference_flops_per_byte(model, window)

    # should the model settle at 4.5 bytes per chunk, the one sized at that rate meets the target,
    # and the one sized at 1/N is over it
    assert abs(cost_at(sized_given, 4.5) / target - 1) <= TOLERANCE < cost_at(sized_default, 4.5) / target - 1
    trained = registry.build("hnet", sized_given.model_dump())
    trained.measure_rate(TRAIN, window)  # after training: the measured rate
    assert trained.units_per_byte() == trained.chunk_rate != pytest.approx(1 / 4.5)
