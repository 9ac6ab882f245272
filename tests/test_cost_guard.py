"""Matched cost held where it is scored, and every pass charged (docs/protocols.md, "Fairness"):
a run more than its tolerance off its target on the scored test windows is flagged, and the
report compares its row with none (rankings, leaders' sentences, fits) and names it; the passes
after training (H-Net's rate, ByteFlow's threshold) are stated before training, reserved in the
plan, counted as they run (FlopCounterMode) and charged in the record's total; batched
evaluation's padding is recorded beside the useful FLOPs."""


import pytest
import torch

from harness.analysis import fits, report
from harness.analysis.report import build_report
from harness.api import registry
from harness.modeling.flops import counting, training_steps
from harness.run import data
from harness.run.budget import check_test_cost, cost_check_of, inference_flops_per_byte
from harness.run.pipeline import counted_flops_per_byte, finish_training
from harness.run.records import FlopsPerByte, read_suite_records, write_record
from tests.conftest import SMALL_CONFIGS, context, tiny_suite
from tests.test_fits import LADDER, ladder_suite, law
from tests.test_report import record

TEXT = data.embedded_corpus("pydoc-topics", 12000)
SIZING = {"target_flops_per_byte": 1e6, "achieved_flops_per_byte": 1.01e6, "relative_error": 0.01, "tolerance": 0.05,
          "rule": "width (d_model) at the configured depth", "configured": {"d_model": 16, "n_layers": 1,
                                                                           "flops_per_byte": 2e4},
          "chosen": {"d_model": 128, "n_layers": 1}}  # harness.run.sizing's facts


def sized(name: str, bpb: float, budget: float, seed: int, off: float = 0.0, **fields):
    """A record sized to 1e6 forward FLOPs per byte whose test windows cost (1 + off) x that.
    Written as an older record: no cost_check, so the report judges it from its figures."""
    made = record(name, bpb, budget=budget, seed=seed, tokenized=name == "bpe", **fields)
    flops = made.flops_per_byte.model_copy(update={"test": 1e6 * (1 + off)})
    return made.model_copy(update={"flops_per_byte": flops, "sizing": SIZING})


def test_a_run_further_off_its_target_than_its_tolerance_is_flagged():
    analytic = {"total": 1e6}
    within = check_test_cost(FlopsPerByte(analytic=analytic, test=1.049e6), SIZING)
    off = check_test_cost(FlopsPerByte(analytic=analytic, test=0.94e6), SIZING)
    assert within.matched and within.relative_error == pytest.approx(0.049)
    assert not off.matched and off.relative_error == pytest.approx(-0.06) and off.tolerance == 0.05
    assert check_test_cost(FlopsPerByte(analytic=analytic, test=2e6), None) is None  # not sized: nothing to hold
    assert check_test_cost(FlopsPerByte(analytic=analytic), SIZING) is None  # a record before the test count
    # an auxiliary model (BLT's entropy model) is left out of the test cost as the suite left it out of the target
    entropy = FlopsPerByte(analytic={"total": 1.3e6, "auxiliary": 0.3e6}, test=1.32e6)
    assert not check_test_cost(entropy, SIZING, count_auxiliary=True).matched
    assert check_test_cost(entropy, SIZING, count_auxiliary=False).test == pytest.approx(
        inference_flops_per_byte({"total": 1.32e6, "auxiliary": 0.3e6}, False))
    # an older record gets the judgement a new one writes
    old = sized("hnet", 3.0, 1e9, 0, off=0.08)
    assert old.cost_check is None and cost_check_of(old) == check_test_cost(old.flops_per_byte, SIZING)
    assert not cost_check_of(old).matched


def test_the_summary_table_shows_seed_means_and_marks_a_row_with_a_run_off_target():
    runs = [sized("hnet", 3.0, 1e9, 0, off=0.02, flops_per_byte={"analytic": {"total": 1.0e6}}),
            sized("hnet", 3.1, 1e9, 1, off=0.10, flops_per_byte={"analytic": {"total": 1.2e6}})]
    (row,) = report.summary_table(runs).to_dict("records")
    assert row["fwd FLOPs/byte"] == pytest.approx(1.1e6) and row["_test_flops"] == pytest.approx(1.06e6)
    assert row["test cost vs target"] == "+6.0%, not matched"
    assert report.summary_table(runs[:1]).loc[0, "test cost vs target"] == "+2.0%"


def test_the_report_compares_a_row_off_its_cost_with_none_and_names_it(tmp_path):
    """bytes leads bpe at every rung, but one seed of bytes at the third rung ran 8% over its
    cost: that rung's ranking and sentence have bpe alone, bytes' fit has one rung fewer, and
    the summary names the run."""
    corpus, tokenizer = ladder_suite(tmp_path, {"inference_flops_per_byte": 1e6})
    bpe, _ = law(1.7, 4.0, 0.15)
    byte, _ = law(1.5, 3.8, 0.2)  # below bpe at every rung
    off_rung = float(LADDER[2])
    records = []
    for name, curve in (("bpe", bpe), ("bytes", byte)):
        for c in LADDER:
            for seed in range(2):
                off = 0.08 if (name, float(c), seed) == ("bytes", off_rung, 1) else 0.01
                made = sized(name, float(curve(c)), float(c), seed, off=off, corpus=corpus)
                records.append(made.model_copy(update={"tokenizer": tokenizer}) if name == "bpe" else made)
                write_record(tmp_path / "runs" / made.run_id / "record.json", records[-1])

    assert list(report.unmatched_runs(records)) == [(off_rung, "bytes")]
    matched = report.at_matched_cost(records)
    assert len(matched) == len(records) - 2  # both seeds of the row leave, not just the run that missed
    fitted = fits.fit_records(matched, report.model_kinds(records), resamples=0)
    assert off_rung not in fitted["bytes"].points and len(fitted["bytes"].points) == len(LADDER) - 1

    text = build_report(tmp_path, tmp_path)
    summary = text.split("## Summary")[1].split("## Corpus")[0]
    leaders = [line for line in summary.splitlines() if line.startswith("- At ")]
    assert len(leaders) == len(LADDER)
    for budget, line in zip(LADDER, leaders):
        leader = "bpe" if float(budget) == off_rung else "bytes"
        assert line.startswith(f"- At {budget:.3g} training FLOPs, **{leader}**")
    assert "bytes" not in leaders[2]  # not compared at all at that rung
    assert (f"- Not at matched inference cost: on the scored test windows, 1 of {len(records)} runs are more than 5% "
            f"off") in summary and f"bytes at {off_rung:.3g} (seed 1 +8.0%)" in summary
    ranking = text.split("### Ranking per budget")[1].split("### Runs")[0]
    assert "are not ranked" in ranking
    at_rung = [line for line in ranking.splitlines() if line.startswith(f"| {off_rung:.3g} ")]
    assert len(at_rung) == 1 and "| bpe " in at_rung[0]
    assert "Rows not at matched inference cost are not fitted (Summary)." in text.split("### Scaling fits")[1]
    table = text.split("### Test bpb per model and budget")[1].split("### Ranking")[0]
    assert "+4.5%, not matched" in table  # the seed mean, marked: the row is shown, never silently compared


# ---- calibration after training ----------------------------------------------------------------

CALIBRATED = [("hnet", {}), ("byteflow", {}), ("byteflow", {"score": "logdet", "score_block": 16}), ("byteflow", {"score": "l2"})]


@pytest.mark.parametrize("adapter, config", CALIBRATED)
def test_calibration_cost_is_what_flop_counter_mode_counts_of_the_pass(adapter, config):
    torch.manual_seed(0)
    model = registry.build(adapter, SMALL_CONFIGS[adapter] | config | {"calibration_windows": 24})
    cost = model.calibration_cost(len(TEXT), 64)
    with counting() as counter:
        model.finish_training(TEXT, context(64))
    assert cost.flops > 0 and cost.flops - cost.uncounted == pytest.approx(counter.get_total_flops(), rel=1e-9)
    # what the counter cannot see (ByteFlow's logdet factorisations) on each calibrated byte
    assert cost.uncounted == pytest.approx(model.uncounted_flops_per_byte(64) * 64 * 24)
    assert (cost.uncounted > 0) == (adapter == "byteflow" and config.get("score") != "l2")
    # the pipeline's count of the same pass: what the adapter reserved, spent
    torch.manual_seed(0)
    again = registry.build(adapter, SMALL_CONFIGS[adapter] | config | {"calibration_windows": 24})
    _, charged = finish_training(again, TEXT, context(64))
    assert charged.reserved == cost.flops and charged.spent == pytest.approx(cost.flops, rel=1e-9)
    # fewer windows on a short split: the statement follows
    assert model.calibration_cost(64 * 10, 64).flops == pytest.approx(cost.flops * 10 / 24)


def test_an_adapter_without_calibration_reserves_and_spends_nothing():
    model = registry.build("bytes", SMALL_CONFIGS["bytes"])
    assert model.calibration_cost(len(TEXT), 64).flops == 0
    assert finish_training(model, TEXT, context(64))[1].spent == 0


def test_runs_reserve_record_and_charge_calibration_and_check_their_cost(write_suite, tmp_path):
    """ByteFlow (logdet: part of its cost is invisible to the counter) and bytes, sized to one
    inference cost: the plan's steps leave the calibration out of the budget, the record keeps
    what was reserved and spent, the total charges it and stays within the budget; every record
    checks its test cost. (H-Net's run: tests/test_hnet.py.)"""
    from harness.orchestrate.runner import run_suite

    budget = 2e9
    models = [{"name": "byteflow", "adapter": "byteflow",
               "config": SMALL_CONFIGS["byteflow"] | {"score": "logdet", "score_block": 16}},
              {"name": "bytes", "adapter": "bytes", "config": SMALL_CONFIGS["bytes"]}]
    suite = tiny_suite(models=models, budgets=[budget], inference_flops_per_byte=1.2e5)
    out = run_suite(write_suite(suite), tmp_path / "results", "cpu", show_progress=False)
    records = {r.model.name: r for r in read_suite_records(out)}
    for name, r in records.items():
        charged = r.calibration_flops
        assert r.total_flops == r.training_flops + r.auxiliary_training_flops + charged.spent <= budget
        assert r.steps == training_steps(budget - charged.reserved, r.training_flops_per_byte, r.batch_bytes)
        check = r.cost_check
        assert check == check_test_cost(r.flops_per_byte, r.sizing) and check.target == 1.2e5
        assert check.matched == (abs(r.flops_per_byte.test / 1.2e5 - 1) <= 0.05)
        assert check.matched != any("not at matched inference cost" in w for w in r.warnings)
        assert r.flops_per_byte.padding_share() >= -1e-9
    assert records["bytes"].flops_per_byte.padding_share() == pytest.approx(0, abs=1e-9)  # no units to pad
    assert records["bytes"].calibration_flops.reserved == records["bytes"].calibration_flops.spent == 0
    flow = records["byteflow"].calibration_flops
    assert flow.reserved > 0 and flow.spent == pytest.approx(flow.reserved, rel=1e-9)


def test_batched_evaluation_counts_the_padding_that_windows_alone_do_not():
    """An untrained H-Net cuts windows into different chunk counts: a batch pads each window to
    the batch's most, which FlopCounterMode sees and the per-window count does not."""
    torch.manual_seed(0)
    model = registry.build("hnet", SMALL_CONFIGS["hnet"]).eval()
    windows = data.windows(TEXT, 64, 32)
    chunks = model.segment(windows)[1].sum(1)
    assert len(set(chunks.tolist())) > 1
    ctx = context(64)
    useful = counted_flops_per_byte(model, windows, ctx)
    batched = counted_flops_per_byte(model, windows, ctx, batch_windows=16)
    padded = sum(len(b) * model.forward_flops(64, int(b.max()))["total"] for b in chunks.split(16)) / windows.numel()
    assert batched > useful and batched == pytest.approx(padded, rel=0.02)
    assert FlopsPerByte(analytic={"total": 1.0}, test=useful, test_batched=batched).padding_share() == pytest.approx(
        batched / useful - 1)
