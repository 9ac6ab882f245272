"""Factors in suites (README, "Factors"): expansion into rows named model+factor=level, one-line
errors for levels a model cannot take, unchanged config hashes and records for suites without
factors, the paired factor statistics on records made here (against scipy), and the report of a
tiny factor suite run end to end (factor table, parameter columns, how the rows differ)."""

import json
import math

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

from harness.analysis import factors
from harness.api import registry
from harness.cli import main
from harness.orchestrate.suite import load_suite
from harness.orchestrate.tuning import apply_tuning
from harness.run.records import RunRecord, parse_record, read_record, read_suite_records, write_record
from harness.run.spec import expand
from tests.checks import record_for
from tests.conftest import ROOT, SMALL_CONFIGS, tiny_suite

BYTES = {"name": "bytes", "adapter": "bytes", "config": {"d_model": 32, "n_layers": 1, "n_heads": 2}}
STATIC = {"name": "static-4", "adapter": "patcher",
          "config": {**SMALL_CONFIGS["patcher"], "patcher": "static", "patch_size": 4}}
BPE = {"name": "bpe", "adapter": "bpe", "config": {"vocab_size": 320, "d_model": 32, "n_layers": 1, "n_heads": 2}}
HASH = {"levels": {"off": {}, "on": {"hash_ngrams": [3, 4]}}}


def test_a_factor_crosses_the_models_whose_config_has_its_keys(write_suite):
    suite = load_suite(write_suite(tiny_suite(models=[BYTES, BPE, STATIC], seeds=[0, 1], factors={"hash": HASH})))
    rows = {row.name: row for row in suite.rows}
    assert list(rows) == ["bytes+hash=off", "bytes+hash=on", "bpe", "static-4+hash=off", "static-4+hash=on"]
    assert rows["bytes+hash=on"].config == BYTES["config"] | {"hash_ngrams": [3, 4]}
    assert rows["bytes+hash=off"].config == BYTES["config"] and rows["bytes+hash=on"].factors == {"hash": "on"}
    assert rows["bpe"].config == BPE["config"] and not hasattr(rows["bpe"], "factors")  # bpe has no hash_ngrams
    ids = [run.run_id for run in expand(suite)]
    assert len(ids) == 10 and "static-4+hash=on__C2.00e09__s1" in ids and "bpe__C2.00e09__s0" in ids
    assert len({run.config_hash(suite) for run in expand(suite)}) == 10


def test_factors_cross_each_other_and_the_base_level_can_be_declared(write_suite):
    width = {"models": ["bytes"], "base": "wide", "levels": {"narrow": {}, "wide": {"d_model": 48}}}
    suite = load_suite(write_suite(tiny_suite(models=[BYTES, STATIC], factors={"hash": HASH, "width": width})))
    names = [row.name for row in suite.rows]
    assert names == ["bytes+hash=off+width=narrow", "bytes+hash=off+width=wide", "bytes+hash=on+width=narrow",
                     "bytes+hash=on+width=wide", "static-4+hash=off", "static-4+hash=on"]
    row = suite.rows[3]
    assert row.factors == {"hash": "on", "width": "wide"} and row.config["d_model"] == 48 and row.config["hash_ngrams"] == [3, 4]
    assert suite.factors["width"].base_level == "wide" and suite.factors["hash"].base_level == "off"


def test_levels_may_be_called_off_and_on_unquoted(tmp_path):
    """YAML 1.1 reads off and on as booleans; the suite loader reads YAML 1.2's true and false only."""
    text = yaml.safe_dump(tiny_suite(models=[BYTES]), sort_keys=False)
    text += "factors:\n  hash: {levels: {off: {}, on: {hash_ngrams: [3]}}}\n"
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    assert [row.name for row in load_suite(path).rows] == ["bytes+hash=off", "bytes+hash=on"]


BAD = [
    ("a key a named model lacks", {"hash": {"models": ["bytes", "bpe"], **HASH}},
     "factors.hash.levels.on.hash_ngrams: model 'bpe' (adapter bpe) has no such config key"),
    ("a key no model has", {"hash": {"levels": {"off": {}, "on": {"hash_grams": [3]}}}},
     "factors.hash: no model's config has hash_grams"),
    ("a value the config refuses", {"hash": {"levels": {"off": {}, "on": {"hash_ngrams": [2]}}}},
     "factors.hash.levels.on.hash_ngrams[0]: Input should be greater than or equal to 3"),
    ("an unknown model", {"hash": {"models": ["bites"], **HASH}}, "factors.hash.models: bites not among the models"),
    ("a base that is no level", {"hash": {"base": "of", **HASH}}, "factors.hash: base: 'of' is not one of the levels"),
    ("one level", {"hash": {"levels": {"on": {"hash_ngrams": [3]}}}}, "factors.hash.levels"),
    ("a level name run ids cannot hold", {"hash": {"levels": {"off": {}, "o n": {"hash_ngrams": [3]}}}},
     "factors.hash.levels.o n.[key]"),
    ("two factors set one key", {"hash": HASH, "more": {"levels": {"a": {}, "b": {"hash_ngrams": [5]}}}},
     "factors.more: sets hash_ngrams of model 'bytes', as factors.hash does"),
]


@pytest.mark.parametrize("label,given,message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_factor_gives_one_line_naming_the_file_and_the_key(label, given, message, write_suite, tmp_path, capsys):
    path = write_suite(tiny_suite(models=[BYTES, BPE], factors=given))
    assert main(["run", str(path), "--results", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"harness: error: {path}: {message}"), err


@pytest.mark.parametrize("suite_name", ["study_v2", "fidelity"])  # (older studies' suites have changed since)
def test_a_suite_without_factors_keeps_its_config_hashes_and_records(suite_name, tmp_path):
    """The committed studies' records still count as done (each has the config hash of its run), and
    a record read and written again keeps its model as it was (no empty `factors`)."""
    suite = load_suite(ROOT / "suites" / f"{suite_name}.yaml")
    results = ROOT / "results" / suite_name
    runs = expand(suite)
    if suite.tune is not None:
        runs = apply_tuning(runs, json.loads((results / "tuning.json").read_text())["entries"])
    hashes = {run.run_id: run.config_hash(suite) for run in runs}
    paths = sorted((results / "runs").glob("*/record.json"))
    assert len(paths) == len(runs)
    for path in paths:
        assert read_record(path).config_hash == hashes[path.parent.name], path
    path = paths[0]
    write_record(tmp_path / "record.json", read_record(path))
    written, original = json.loads((tmp_path / "record.json").read_text())["model"], json.loads(path.read_text())["model"]
    assert "factors" not in written  # (the config differs only by the attention window's new name)
    assert {k: v for k, v in written.items() if k != "config"} == {k: v for k, v in original.items() if k != "config"}


def record(name: str, bpb: float, seed: int, levels: dict[str, str] | None = None, budget: float = 1e9) -> RunRecord:
    model = registry.get("bytes")(registry.get("bytes").Config(d_model=16, n_layers=1, n_heads=2))
    evaluation = {"bpb": bpb, "bytes": 64, "windows": 1, "window_nll_nats": [bpb * 64 * math.log(2)]}
    made = record_for(model, run_id=f"{name}__s{seed}", seed=seed, budget_flops=budget, test=evaluation, val=evaluation)
    row = name + "".join(f"+{f}={level}" for f, level in (levels or {}).items())
    return RunRecord(**made.model_dump() | {"model": {"name": row, "adapter": "bytes", "config": {},
                                                      "factors": levels or {}}})


def test_a_known_effect_is_recovered_paired_by_seed():
    """Seeds that differ by much more than the effect: pairing by seed sees through them."""
    base = [3.0, 3.4, 2.8, 3.2]
    change = [-0.50, -0.52, -0.49, -0.51]
    records = [record("m", b, s, {"hash": "off"}) for s, b in enumerate(base)]
    records += [record("m", b + c, s, {"hash": "on"}) for s, (b, c) in enumerate(zip(base, change))]
    (row,) = factors.factor_table(records, {"hash": "off"}).to_dict("records")
    low, high = scipy_stats.t.interval(0.95, 3, loc=np.mean(change), scale=scipy_stats.sem(change))  # the reference
    assert (row["model"], row["factor"], row["level"], row["base"], row["seeds"]) == ("m", "hash", "on", "off", 4)
    assert row["Δ bpb"] == pytest.approx(-0.505) and row["_low"] == pytest.approx(low) and row["_high"] == pytest.approx(high)
    assert low < -0.505 < high and high - low < 0.05  # the seeds spread over 0.6 bpb
    assert row["p"] == pytest.approx(scipy_stats.ttest_1samp(change, 0).pvalue) and row["p"] < 1e-4
    # unpaired, the spread of the seeds would hide much of it
    assert scipy_stats.ttest_ind([b + c for b, c in zip(base, change)], base).pvalue > row["p"] * 100


def test_no_effect_gives_an_interval_around_zero_and_a_large_p():
    base = [3.0, 3.4, 2.8, 3.2]
    change = [0.05, -0.04, 0.01, -0.03]
    records = [record("m", b, s, {"hash": "off"}) for s, b in enumerate(base)]
    records += [record("m", b + c, s, {"hash": "on"}) for s, (b, c) in enumerate(zip(base, change))]
    (row,) = factors.factor_table(records, {"hash": "off"}).to_dict("records")
    assert row["_low"] < 0 < row["_high"] and row["p"] > 0.5


def test_only_seeds_both_rows_have_are_paired_and_one_seed_gives_no_interval():
    records = [record("m", 3.0, 0, {"hash": "off"}), record("m", 2.5, 0, {"hash": "on"}), record("m", 2.4, 1, {"hash": "on"})]
    (row,) = factors.factor_table(records, {"hash": "off"}).to_dict("records")
    assert row["seeds"] == 1 and row["Δ bpb"] == pytest.approx(-0.5)
    assert math.isnan(row["p"]) and row["95% CI"] == ""


def test_the_summary_names_the_factor_level_that_makes_a_lead():
    records = [record(name, bpb + 0.01 * s, s, {"hash": level})
               for name, level, bpb in (("a", "off", 3.0), ("a", "on", 2.9), ("b", "off", 3.2), ("b", "on", 2.4))
               for s in range(3)]
    (line,) = factors.factor_sentences(records, {"hash": "off"})
    assert "**b+hash=on** leads through its factor level hash=on, not its model" in line
    assert "**a+hash=off** leads (3.0100 bpb)" in line and "changes it by -0.8000 bpb (3 paired seeds" in line
    # the same model leads with and without the level: the model, not the factor, makes the lead
    records = [r for r in records if not r.model.name.startswith("a+hash=off")]
    records = [record("a", 3.3, s, {"hash": "off"}) for s in range(3)] + records
    assert factors.factor_sentences(records, {"hash": "off"}) == []


def test_a_tiny_factor_suite_reports_its_factor_table_and_parameters(write_suite, tmp_path):
    """bytes with and without hashed n-grams, 2 seeds (a patcher row would cost more than the four runs:
    its crossing is checked above)."""
    path = write_suite(tiny_suite(models=[BYTES], seeds=[0, 1], budgets=[1e9], factors={"hash": HASH}))
    assert main(["run", str(path), "--results", str(tmp_path), "--quiet", "--device", "cpu"]) == 0
    out = tmp_path / "tiny"
    records = read_suite_records(out)
    assert sorted(r.run_id for r in records) == [f"bytes+hash={level}__C1.00e09__s{seed}" for level in ("off", "on")
                                                 for seed in (0, 1)]
    assert parse_record(json.loads((out / "runs" / "bytes+hash=on__C1.00e09__s0" / "record.json").read_text()),
                        "x").model.factors == {"hash": "on"}
    assert main(["report", str(out), "-o", str(out / "report.md")]) == 0
    report = (out / "report.md").read_text()
    table = report.split("### Factors: each level against the base level")[1].split("###")[0]
    (line,) = [line for line in table.splitlines() if line.startswith("| 1e+09")]
    cells = [cell.strip() for cell in line.split("|")[1:-1]]
    assert cells[1:6] == ["bytes", "hash", "on", "off", "2"] and cells[-2].startswith("[") and cells[-1]  # interval, p
    header = next(line for line in report.splitlines() if line.startswith("| budget   | model"))
    assert "| params" in header and "| embedding params" in header and "| non-embedding params" in header
    row = next(line for line in report.splitlines() if line.startswith("| 1e+09    | bytes+hash=on "))
    with_tables = next(r for r in records if r.model.name == "bytes+hash=on").parameters
    assert f"{with_tables['embedding']:,}" in row and f"{with_tables['non_embedding']:,}" in row
    assert "- `bytes+hash=off` / `bytes+hash=on` (bytes): hash_ngrams [] / [3, 4]" in report
    summary = report.split("## Summary")[1].split("\n## ")[0]
    assert " parameters: " in summary and " embedding, " in summary and " non-embedding" in summary
