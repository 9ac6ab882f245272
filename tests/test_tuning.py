"""Tuning (harness.orchestrate.tuning): selection on validation only, a bracketed grid, provenance."""

import json
import math
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from harness.analysis.report import build_report
from harness.orchestrate import runner, tuning
from harness.run.checkpoint import WEIGHTS_FILE
from harness.run.records import read_record, read_suite_records
from harness.storage import file_damage
from harness.orchestrate.suite import load_suite
from harness.orchestrate.tuning import apply_tuning, bracketed_search, tune_suite
from harness.run.spec import expand
from harness.errors import HarnessError
from tests.conftest import tiny_suite


def bowl(optimum):
    """A tiny objective: squared distance in log10(lr) from `optimum`."""
    return lambda lr: (math.log10(lr) - math.log10(optimum)) ** 2


def test_the_grid_extends_past_an_edge_optimum_until_it_is_bracketed():
    up = bracketed_search(bowl(0.05), [1e-3, 3e-3, 1e-2], factor=3.0, max_extensions=3)
    assert up.added == pytest.approx([3e-2, 9e-2]) and up.best == pytest.approx(3e-2) and up.extensions == 2
    down = bracketed_search(bowl(2e-4), [1e-3, 3e-3, 1e-2], factor=3.0, max_extensions=3)
    assert down.added == pytest.approx([1e-3 / 3, 1e-3 / 9]) and down.best == pytest.approx(1e-3 / 3)
    inside = bracketed_search(bowl(3e-3), [1e-3, 3e-3, 1e-2], factor=3.0, max_extensions=0)
    assert inside.added == [] and inside.best == 3e-3
    # bounded: an optimum still at the edge stops with one line saying so
    with pytest.raises(HarnessError, match=r"best lr 0\.03 is still the largest .* after 1 extension"):
        bracketed_search(bowl(1.0), [1e-3, 3e-3, 1e-2], factor=3.0, max_extensions=1)
    # a diverged (NaN) trial never wins
    nan_top = bracketed_search(lambda lr: math.nan if lr > 5e-3 else bowl(2e-3)(lr), [1e-3, 3e-3, 1e-2])
    assert nan_top.best == 3e-3


def fake_execute(val_optimum, test_optimum, calls):
    """An `execute` that trains nothing: val and test bpb are bowls with different optima."""
    def execute(run, suite, corpus, device, peak, config_hash, run_dir, show_progress, save_every_s):
        calls.append(run.run_id)
        lr = run.trainer.lr
        val = 2.0 + bowl(val_optimum)(lr) + 0.01 * run.seed
        return SimpleNamespace(val=SimpleNamespace(bpb=val), test=SimpleNamespace(bpb=2.0 + bowl(test_optimum)(lr)))
    return execute


def test_selection_uses_validation_only(write_suite, tmp_path, monkeypatch):
    tune = {"budgets": [2e9], "seeds": [0, 1], "lr": [1e-3, 3e-3, 1e-2], "factor": 3.0, "max_extensions": 2}
    suite = load_suite(write_suite(tiny_suite(tune=tune)))
    calls = []
    monkeypatch.setattr(tuning, "execute", fake_execute(val_optimum=1e-3, test_optimum=1e-2, calls=calls))
    entries = tune_suite(suite, tmp_path, {"pydoc-topics": None}, torch.device("cpu"), 1.0)
    (entry,) = entries
    # test favours 1e-2; val favours 1e-3, an edge: the grid extends down once and brackets it
    assert entry["chosen"] == {"lr": 1e-3} and entry["extensions"] == 1
    assert [t["lr"] for t in entry["trials"]] == pytest.approx([1e-3 / 3, 1e-3, 3e-3, 1e-2])
    assert entry["val_bpb"] == pytest.approx(2.005)  # the mean over the tuning seeds
    assert len(calls) == 8 and "tune__bytes__lr1.00e-03__C2.00e09__s1" in calls
    written = (tmp_path / "tuning.json").read_text()
    assert json.loads(written)["selected_on"] == "val" and "test" not in written


def test_a_dry_run_says_when_tuning_json_is_for_other_tune_settings(write_suite, tmp_path, monkeypatch, capsys):
    tune = {"budgets": [2e9], "seeds": [0], "lr": [1e-3, 3e-3, 1e-2], "max_extensions": 2}
    monkeypatch.setattr(tuning, "execute", fake_execute(val_optimum=3e-3, test_optimum=3e-3, calls=[]))
    tune_suite(load_suite(write_suite(tiny_suite(tune=tune))), tmp_path, {"pydoc-topics": None},
               torch.device("cpu"), 1.0)
    capsys.readouterr()
    tune_suite(load_suite(write_suite(tiny_suite(tune=tune))), tmp_path, {}, None, 1.0, dry_run=True)
    assert "tunes again" not in capsys.readouterr().out
    more = load_suite(write_suite(tiny_suite(tune=tune | {"budgets": [2e9, 6e9]})))
    entries = tune_suite(more, tmp_path, {}, None, 1.0, dry_run=True)
    assert len(entries) == 1 and "a real run tunes again first" in capsys.readouterr().out


def test_runs_use_the_chosen_settings_and_record_which_trials_chose_them(write_suite, tmp_path, capsys):
    # a bad untuned lr (3e-4); at 1e9 FLOPs the tiny bytes model's val optimum is near 3e-2
    # (measured: val 6.67 / 5.11 / 4.95 / 4.96 bpb at lr 3e-3 / 1e-2 / 3e-2 / 9e-2)
    suite = tiny_suite(budgets=[1e9], trainer={"batch_windows": 8, "log_every": 2, "lr": 3e-4},
                       tune={"budgets": [1e9], "lr": [1e-2, 3e-2, 9e-2], "max_extensions": 1})
    path = write_suite(suite)
    out = runner.run_suite(path, tmp_path, "cpu", show_progress=False)
    tuning = json.loads((out / "tuning.json").read_text())
    (entry,) = tuning["entries"]
    assert entry["untuned"] == {"lr": 3e-4} and entry["chosen"]["lr"] == pytest.approx(3e-2)
    (record,) = read_suite_records(out)  # tuning trials are not the suite's runs
    assert record.trainer.lr == entry["chosen"]["lr"]
    assert record.tuning["selected_on"] == "val" and record.tuning["chosen"] == entry["chosen"]
    assert len(record.tuning["trials"]) == 3
    for run_id in record.tuning["trials"]:
        assert (out / "tuning" / "runs" / run_id / "record.json").exists()
    # the trial at the chosen lr on this budget and seed is this run: taken from it, not trained twice
    trial = f"tune__bytes__lr{entry['chosen']['lr']:.2e}__C1.00e09__s0".replace("+", "")
    trial_dir, run_dir = out / "tuning" / "runs" / trial, out / "runs" / record.run_id
    assert record.trained_as == trial and record.config_hash == read_record(trial_dir / "record.json").config_hash
    assert (record.val, record.test) == (read_record(trial_dir / "record.json").val,
                                         read_record(trial_dir / "record.json").test)
    assert (run_dir / WEIGHTS_FILE).read_bytes() == (trial_dir / WEIGHTS_FILE).read_bytes()
    assert file_damage(run_dir / WEIGHTS_FILE) is None
    assert "1 of the suite's runs are tuning trials" in build_report(out, tmp_path / "report")
    # resumable: a second pass trains nothing
    before = {p: p.stat().st_mtime for p in out.glob("**/record.json")}
    runner.run_suite(path, tmp_path, "cpu", show_progress=False)
    assert before == {p: p.stat().st_mtime for p in out.glob("**/record.json")}
    # a record whose provenance is stale (its lr chosen before at another budget) gets the
    # current provenance written in, and keeps its result
    record_path = out / "runs" / record.run_id / "record.json"
    stale = json.loads(record_path.read_text())
    stale["tuning"] |= {"budget": 3e8, "trials": ["an-older-trial"]}
    record_path.write_text(json.dumps(stale))
    runner.run_suite(path, tmp_path, "cpu", show_progress=False)
    (again,) = read_suite_records(out)
    assert again.tuning == record.tuning and again.test.bpb == record.test.bpb and again.trained_as == trial
    # a trial whose weights were changed since is not taken: the dry run says the run is to be
    # taken from it, the real run finds the damage and trains the run itself
    shutil.rmtree(run_dir)
    runner.run_suite(path, tmp_path, "cpu", show_progress=False, dry_run=True)
    assert f"to take from tuning trial {trial}" in capsys.readouterr().out
    with open(trial_dir / WEIGHTS_FILE, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    runner.run_suite(path, tmp_path, "cpu", show_progress=False)
    assert "trains instead of taking its tuning trial's result" in capsys.readouterr().out
    (trained,) = read_suite_records(out)
    assert trained.trained_as is None and "trained_as" not in json.loads((run_dir / "record.json").read_text())


def test_the_report_shows_the_tuning_table_plot_and_gap(tmp_path):
    from harness.analysis.tuning_report import tuning_section

    trials = lambda scores: [{"lr": lr, "run_ids": [f"tune__m__lr{lr:.2e}"], "val_bpb": v} for lr, v in scores.items()]
    entries = [
        {"corpus": "c", "model": "bytes", "budget": 1e9, "seeds": [0], "chosen": {"lr": 1e-2}, "val_bpb": 4.0,
         "extensions": 0, "untuned": {"lr": 3e-3}, "trials": trials({1e-3: 4.5, 3e-3: 4.2, 1e-2: 4.0, 3e-2: 4.1})},
        {"corpus": "c", "model": "bytes", "budget": 1e10, "seeds": [0], "chosen": {"lr": 3e-3}, "val_bpb": 3.0,
         "extensions": 1, "untuned": {"lr": 3e-3}, "trials": trials({1e-3: 3.2, 3e-3: 3.0, 1e-2: 3.1})},
    ]
    (tmp_path / "tuning.json").write_text(json.dumps({"selected_on": "val", "entries": entries}))
    (tmp_path / "plots").mkdir()
    text = "\n".join(tuning_section(tmp_path, tmp_path / "plots"))
    assert "## Tuning" in text and "| 0.2 " in text  # the untuned - tuned gap at 1e9
    assert "chosen lr 0.01 at 1.00e+09 -> 0.003 at 1.00e+10 FLOPs" in text  # the drift between budgets
    assert (tmp_path / "plots" / "tuning_c_1.00e09.png").stat().st_size > 1000
    assert tuning_section(tmp_path / "elsewhere", tmp_path) == []


def test_a_bad_tune_section_names_the_file_and_key(write_suite):
    path = write_suite(tiny_suite(tune={"budgets": [1e9], "lr": [1e-3]}))
    with pytest.raises(HarnessError, match=r"suite\.yaml: tune\.lr: List should have at least 2 items"):
        load_suite(path)
    path = write_suite(tiny_suite(tune={"budgets": [1e3]}))
    with pytest.raises(HarnessError, match=r"suite\.yaml: tune\.budgets: 1e\+03 FLOPs is less than one optimizer step"):
        load_suite(path)


def test_warmup_and_batch_grids_are_crossed_with_the_lr_search(write_suite, tmp_path, monkeypatch):
    tune = {"budgets": [2e9], "lr": [1e-3, 3e-3, 1e-2], "warmup_fraction": [0.0, 0.1], "batch_windows": [4, 8]}
    suite = load_suite(write_suite(tiny_suite(tune=tune)))
    calls = []

    def execute(run, *args):
        calls.append(run.run_id)
        t = run.trainer
        val = bowl(3e-3)(t.lr) + (0.0 if t.warmup_fraction == 0.1 else 0.5) + (0.0 if t.batch_windows == 4 else 0.2)
        return SimpleNamespace(val=SimpleNamespace(bpb=val))

    monkeypatch.setattr(tuning, "execute", execute)
    (entry,) = tune_suite(suite, tmp_path, {"pydoc-topics": None}, torch.device("cpu"), 1.0)
    assert entry["chosen"] == {"lr": 3e-3, "warmup_fraction": 0.1, "batch_windows": 4}
    assert len(entry["trials"]) == len(calls) == 12 and "tune__bytes__lr3.00e-03__wu0.1__b4__C2.00e09__s0" in calls
    assert entry["untuned"] == {"lr": 3e-3, "warmup_fraction": 0.05, "batch_windows": 8}
    (run,) = apply_tuning(expand(suite), [entry])
    assert (run.trainer.lr, run.trainer.warmup_fraction, run.trainer.batch_windows) == (3e-3, 0.1, 4)
    assert run.tuning["selected_on"] == "val" and len(run.tuning["trials"]) == 12


def test_confirm_seeds_overturn_a_choice_one_lucky_seed_made(write_suite, tmp_path, monkeypatch):
    tune = {"budgets": [2e9], "lr": [1e-3, 3e-3, 1e-2, 3e-2], "confirm_seeds": [1]}
    suite = load_suite(write_suite(tiny_suite(tune=tune)))
    calls = []

    def execute(run, *args):  # 1e-2 looks best on seed 0 by luck and is unstable on seed 1
        calls.append(run.run_id)
        luck = {0: -0.5, 1: 0.5}[run.seed] if run.trainer.lr == 1e-2 else 0.0
        return SimpleNamespace(val=SimpleNamespace(bpb=3.0 + bowl(3e-3)(run.trainer.lr) + luck))

    monkeypatch.setattr(tuning, "execute", execute)
    (entry,) = tune_suite(suite, tmp_path, {"pydoc-topics": None}, torch.device("cpu"), 1.0)
    assert entry["chosen"] == {"lr": 3e-3} and entry["val_bpb"] == pytest.approx(3.0)
    assert len(calls) == 6 and calls[-2:] == ["tune__bytes__lr1.00e-02__C2.00e09__s1", "tune__bytes__lr3.00e-03__C2.00e09__s1"]
    confirmed = {t["lr"]: t for t in entry["trials"] if t["confirmed"]}
    assert sorted(confirmed) == [3e-3, 1e-2] and len(confirmed[1e-2]["run_ids"]) == 2
    assert confirmed[1e-2]["val_bpb"] == pytest.approx(3.0 + bowl(3e-3)(1e-2))  # the mean over both seeds
    (run,) = apply_tuning(expand(suite), [entry])
    assert run.tuning["confirm_seeds"] == [1] and len(run.tuning["trials"]) == 6
    with pytest.raises(HarnessError, match=r"tune: .*confirm_seeds must be distinct and not among seeds"):
        load_suite(write_suite(tiny_suite(tune={**tune, "confirm_seeds": [0]})))


def test_a_centred_grid_starts_each_larger_budget_at_the_previous_choice(write_suite, tmp_path, monkeypatch):
    """grid: centred tries the previous budget's choice and its grid neighbours (3 trials, not 4);
    past the grid's ends a neighbour is computed as an extension would, so its trial is found again."""
    tune = {"budgets": [8e9, 2e9], "lr": [1e-3, 3e-3, 1e-2, 3e-2], "grid": "centred"}
    suite = load_suite(write_suite(tiny_suite(tune=tune)))
    calls = []

    def execute(run, *args):  # the optimum moves down with the budget: 1e-2 at 2e9, 8e-3 at 8e9
        calls.append(run.run_id)
        return SimpleNamespace(val=SimpleNamespace(bpb=3.0 + bowl(1e-2 if run.budget < 4e9 else 8e-3)(run.trainer.lr)))

    monkeypatch.setattr(tuning, "execute", execute)
    small, large = tune_suite(suite, tmp_path, {"pydoc-topics": None}, torch.device("cpu"), 1.0)
    assert small["budget"] == 2e9 and small["chosen"] == {"lr": 1e-2} and len(small["trials"]) == 4
    assert large["chosen"] == {"lr": 1e-2} and [t["lr"] for t in large["trials"]] == [3e-3, 1e-2, 3e-2]
    assert not any(t["extension"] for t in large["trials"]) and len(calls) == 7
    assert json.loads((tmp_path / "tuning.json").read_text())["settings"]["grid"] == "centred"
    lattice = SimpleNamespace(grid="centred", lr=[1e-3, 3e-3, 1e-2], factor=3.0)
    assert tuning.lr_grid(lattice, 1e-3) == [1e-3 / 3, 1e-3, 3e-3]  # the extension's own value, to the bit
    assert tuning.lr_grid(lattice, 1e-3 / 3) == [1e-3 / 3 / 3, 1e-3 / 3, 1e-3]
    assert tuning.lr_grid(lattice, None) == [1e-3, 3e-3, 1e-2]


def test_confirm_within_skips_the_second_seed_for_a_clear_winner(write_suite, tmp_path, monkeypatch):
    tune = {"budgets": [2e9], "lr": [1e-3, 3e-3, 1e-2], "confirm_seeds": [1], "confirm_within": 0.1}
    suite = load_suite(write_suite(tiny_suite(tune=tune)))
    calls = []

    def execute(run, *args):  # 3e-3 wins by 0.23 bpb: no confirmation
        calls.append(run.run_id)
        return SimpleNamespace(val=SimpleNamespace(bpb=3.0 + bowl(3e-3)(run.trainer.lr)))

    monkeypatch.setattr(tuning, "execute", execute)
    (entry,) = tune_suite(suite, tmp_path, {"pydoc-topics": None}, torch.device("cpu"), 1.0)
    assert entry["chosen"] == {"lr": 3e-3} and len(calls) == 3 and not any(t["confirmed"] for t in entry["trials"])
    # with the default (no confirm_within) the two best are trained again, and tuning.json keeps the old settings
    default = load_suite(write_suite(tiny_suite(tune={k: v for k, v in tune.items() if k != "confirm_within"})))
    assert "confirm_within" not in default.tune.recorded() and "grid" not in default.tune.recorded()


def test_a_held_out_rung_runs_its_rows_and_is_tuned_for_them_alone(write_suite, tmp_path, monkeypatch):
    """`holdout`: the named rows run one rung beyond the ladder on its own seeds; `tune_budget` tunes
    them for it, and that choice serves the held-out runs only."""
    second = {"name": "bytes-wide", "adapter": "bytes", "config": {"d_model": 48, "n_layers": 1, "n_heads": 2}}
    spec = tiny_suite(budgets=[1e9, 3e9], models=[*tiny_suite()["models"], second],
                      tune={"budgets": [1e9], "lr": [1e-3, 3e-3, 1e-2]},
                      holdout={"budget": 9e9, "rows": ["bytes"], "seeds": [0, 1], "tune_budget": 3e9})
    suite = load_suite(write_suite(spec))
    runs = expand(suite)
    held = [r for r in runs if r.held_out]
    assert [(r.model.name, r.budget, r.seed) for r in held] == [("bytes", 9e9, 0), ("bytes", 9e9, 1)]
    assert len(runs) == 2 * 2 + 2

    def execute(run, *args):  # the optimum falls with the budget: 1e-2 at 1e9, 3e-3 at 3e9
        return SimpleNamespace(val=SimpleNamespace(bpb=3.0 + bowl(1e-2 if run.budget < 2e9 else 3e-3)(run.trainer.lr)))

    monkeypatch.setattr(tuning, "execute", execute)
    entries = tune_suite(suite, tmp_path, {"pydoc-topics": None}, torch.device("cpu"), 1.0)
    assert [(e["model"], e["budget"], e.get("holdout", False)) for e in entries] == [
        ("bytes", 1e9, False), ("bytes", 3e9, True), ("bytes-wide", 1e9, False)]
    chosen = {(r.model.name, r.budget): r.trainer.lr for r in apply_tuning(runs, entries)}
    assert chosen[("bytes", 9e9)] == 3e-3  # from its own tuning budget, 3e9
    assert chosen[("bytes", 3e9)] == 1e-2  # the ladder keeps the ladder's tuning, though 3e9 is nearer
    for bad, message in (({"budget": 3e9}, "holdout.budget: 3e+09 is not beyond the ladder"),
                         ({"rows": ["bpe"]}, "holdout.rows: bpe not among the rows"),):
        with pytest.raises(HarnessError, match=re.escape(message)):
            load_suite(write_suite({**spec, "holdout": {**spec["holdout"], **bad}}))
    with pytest.raises(HarnessError, match="holdout.tune_budget: the suite has no tune: settings"):
        load_suite(write_suite({**spec, "tune": None}))
