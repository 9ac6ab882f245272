"""The headline figures come from the committed study records: recompute them here, so a headline
that drifts from its records (new records, an edited sentence) fails. The README's is study v3's;
study v2's, with its correction, is in docs/study.md."""

import json
import statistics
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "results" / "study_v2"


def headline() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## What the study finds")
    return text[start:text.index("\n## ", start + 1)]


def v2_headline() -> str:
    text = (ROOT / "docs" / "study.md").read_text()
    start = text.index("### What it reported, and the correction")
    return text[start:text.index("\n### ", start + 1)]


def bpb_by_rung(study: Path) -> dict[float, dict[str, list[float]]]:
    """A study's test bpb per budget and row, one value per seed."""
    runs = defaultdict(lambda: defaultdict(list))
    for path in (study / "runs").glob("*/record.json"):
        record = json.loads(path.read_text())
        runs[record["budget_flops"]][record["model"]["name"]].append(record["test"]["bpb"])
    return runs


def mean_test_bpb() -> dict[float, dict[str, float]]:
    return {budget: {name: statistics.mean(v) for name, v in models.items()} for budget, models in bpb_by_rung(STUDY).items()}


@pytest.mark.skipif(not STUDY.exists(), reason="the study's records are not in this checkout")
def test_v2_headline_leaders_and_primed_gap_match_the_records():
    text = " ".join(v2_headline().split())
    means = mean_test_bpb()
    assert sorted(means) == [1e11, 3e11, 9e11, 2.7e12, 8.1e12]
    for budget, models in means.items():
        assert len(models) == 12
        leader = min(models, key=models.get)
        assert f"({models[leader]:.3f}" in text, (budget, leader)
    top = means[8.1e12]
    best = min(top, key=top.get)
    ppmd = json.loads((STUDY / "suite.json").read_text())["corpora"]["stdlib-docstrings"]["references"]["test"][
        "primed_bpb"]["PPMd order 16"]
    assert f"{top[best]:.3f} bpb" in text and f"({ppmd:.3f} bpb)" in text
    assert f"{top[best] - ppmd:.2f} bpb behind" in text


ABLATION = ROOT / "results" / "hash_ablation"


@pytest.mark.skipif(not ABLATION.exists(), reason="the ablation's records are not in this checkout")
def test_the_correction_table_is_what_the_ablation_records_give():
    """Each row of the hashed n-gram ablation: both seeds and the mean, with and without."""
    text = " ".join(v2_headline().split())
    runs = defaultdict(dict)
    for path in (ABLATION / "runs").glob("*/record.json"):
        record = json.loads(path.read_text())
        runs[record["model"]["name"]][record["seed"]] = record["test"]["bpb"]
    assert len(runs) == 8 and all(sorted(seeds) == [0, 1] for seeds in runs.values())
    for model in ("bytes", "static-4", "blt-entropy", "blt-space"):
        for level in ("off", "on"):
            seeds = runs[f"{model}+hash={level}"]
            mean = statistics.mean(seeds.values())
            assert f"{seeds[0]:.3f} / {seeds[1]:.3f}, " in text and f"{mean:.3f}" in text, (model, level)


@pytest.mark.skipif(not STUDY.exists(), reason="the study's records are not in this checkout")
def test_the_v2_fits_prediction_figures_are_the_committed_report_s():
    """Study v2's held-out errors and stated crossovers are those of results/study_v2/report.md,
    which the report tests rebuild from the records."""
    import re

    text = " ".join(v2_headline().split())
    sentence = next(line for line in (STUDY / "report.md").read_text().splitlines()
                    if line.startswith("- Fitted crossovers ("))
    best, count, inside, curved, power = re.search(
        r"mean absolute error ([\d.]+) bpb over (\d+) models, (\d+) of them inside the 95% interval; "
        r"against ([\d.]+) for log L = .*?; ([\d.]+) for L = E", sentence).groups()
    assert f"by {best} ({inside} of {count} inside)" in text
    assert f"misses by {curved} on average" in text and f"mean error +{power} bpb" in text
    for model, at in re.findall(r"(\S+) crosses bpe at ([\d.e+]+) training FLOPs", sentence):
        mantissa, exponent = f"{float(at):.1e}".split("e")
        assert f"{mantissa}e{int(exponent)}" in text, (model, at)


STUDY_V3 = ROOT / "results" / "study_v3"


def v3_rows() -> tuple[dict, dict, dict]:
    """The ladder's runs of study_v3 (the held-out rung apart): test bpb per budget, row and seed;
    whether every seed of a row was at its rung's matched cost; each row's parameters."""
    holdout = json.loads((STUDY_V3 / "suite.json").read_text())["suite"]["holdout"]["budget"]
    bpb, matched, params = defaultdict(lambda: defaultdict(dict)), defaultdict(lambda: defaultdict(lambda: True)), {}
    for path in (STUDY_V3 / "runs").glob("*/record.json"):
        r = json.loads(path.read_text())
        budget, name = r["budget_flops"], r["model"]["name"]
        if budget == holdout:
            continue
        bpb[budget][name][r["seed"]] = r["test"]["bpb"]
        matched[budget][name] &= r["cost_check"]["matched"]
        params[(budget, name)] = (r["parameters"]["total"], r["parameters"]["embedding"])
    return bpb, matched, params


def millions(count: int) -> str:
    return f"{count / 1e6:.2f} M"


def rung(budget: float) -> str:
    """A budget as the README writes it: 1e11, 2.7e12."""
    return f"{budget:.2g}".replace("e+", "e")


@pytest.mark.skipif(not STUDY_V3.exists(), reason="the study's records are not in this checkout")
def test_the_v3_headline_leaders_factor_effects_and_parameters_are_the_records():
    """Per rung: the leader among the rows at matched cost, its mean and p against the runner-up
    (Welch t over seeds), the leader without the tables, the tables' paired effect over the byte
    models, and the leaders' parameters; the primed PPMd gap at the top rung."""
    from scipy import stats

    text = " ".join(headline().split())
    bpb, matched, params = v3_rows()
    assert sorted(bpb) == [1e11, 3e11, 9e11, 2.7e12, 8.1e12]
    assert all(len(seeds) == 3 for rows in bpb.values() for seeds in rows.values())
    byte_leads = {}
    for budget, rows in bpb.items():
        means = {m: statistics.mean(s.values()) for m, s in rows.items() if matched[budget][m]}
        first, second = sorted(means, key=means.get)[:2]
        if first not in ("bpe", "sentencepiece"):
            byte_leads[budget] = first
        p = stats.ttest_ind(list(rows[first].values()), list(rows[second].values()), equal_var=False).pvalue
        total, embedding = params[(budget, first)]
        assert f"{first} at {rung(budget)} ({means[first]:.3f}" in text, (budget, first)
        assert f"p = {p:.2g} over {second}" in text, (budget, second)
        assert f"{millions(total)} parameters, {millions(embedding)} of them embeddings" in text, (budget, first)
        plain = min((m for m in means if not m.endswith("+hash=on")), key=means.get)
        assert f"{plain} {means[plain]:.3f}" in text, (budget, plain)
        effect = [statistics.mean(rows[m][s] - rows[m.replace("=on", "=off")][s] for s in rows[m])
                  for m in rows if m.endswith("+hash=on")]
        assert f"{min(effect):+.2f} to {max(effect):+.2f} at {rung(budget)}" in text, budget
    assert all(m.endswith("+hash=on") for m in byte_leads.values())
    assert f"({rung(min(byte_leads))} to {rung(max(byte_leads))}, all `+hash=on` rows)" in text
    tables = [statistics.mean(s.values()) for m, s in bpb[8.1e12].items() if m.endswith("+hash=on")]
    assert f"the six byte models span {min(tables):.3f} to {max(tables):.3f} bpb at the top rung" in text
    top = {m: statistics.mean(s.values()) for m, s in bpb[8.1e12].items() if matched[8.1e12][m]}
    best = min(top, key=top.get)
    ppmd = json.loads((STUDY_V3 / "suite.json").read_text())["corpora"]["stdlib-docstrings"]["references"]["test"][
        "primed_bpb"]["PPMd order 16"]
    assert f"{top[best] - ppmd:.2f} bpb behind PPMd order 16 primed with the training split ({ppmd:.3f})" in text


@pytest.mark.skipif(not STUDY_V3.exists(), reason="the study's records are not in this checkout")
def test_the_v3_rung_beyond_the_ladder_is_what_its_records_give():
    """The held-out rung's means, their change from the top ladder rung, and the two gaps to BPE
    with their p (Welch t over seeds)."""
    from scipy import stats

    text = " ".join(headline().split())
    runs = bpb_by_rung(STUDY_V3)
    beyond, top = runs[2.4e13], runs[8.1e12]
    assert sorted(beyond) == ["bpe", "bytes+hash=off", "bytes+hash=on", "hnet+hash=on"]
    mean = {m: statistics.mean(v) for m, v in beyond.items()}
    assert (f"bytes+hash=on {mean['bytes+hash=on']:.3f}, hnet+hash=on {mean['hnet+hash=on']:.3f}, BPE "
            f"{mean['bpe']:.3f} and bytes+hash=off {mean['bytes+hash=off']:.3f}") in text
    moved = [mean[m] - statistics.mean(top[m]) for m in ("bytes+hash=on", "hnet+hash=on")]
    assert f"({moved[0]:.3f} and {moved[1]:.3f} bpb) while BPE gained {statistics.mean(top['bpe']) - mean['bpe']:.3f}" in text
    lead = stats.ttest_ind(beyond["bytes+hash=on"], beyond["bpe"], equal_var=False).pvalue
    behind = stats.ttest_ind(beyond["bytes+hash=off"], beyond["bpe"], equal_var=False).pvalue
    before = statistics.mean(top["bpe"]) - statistics.mean(top["bytes+hash=on"])
    assert f"shrank from {before:.2f} to {mean['bpe'] - mean['bytes+hash=on']:.3f} bpb (p = {lead:.2g})" in text
    assert f"by {mean['bytes+hash=off'] - mean['bpe']:.3f} (p = {behind:.2g})" in text


@pytest.mark.skipif(not STUDY_V3.exists(), reason="the study's records are not in this checkout")
def test_the_v3_run_time_and_the_runs_its_trials_already_were_are_the_records():
    """The hours the README gives, and the runs whose config hash a tuning trial has (trained twice
    then; `harness run` now takes them from the trials)."""
    def records(folder: str) -> list[dict]:
        return [json.loads(p.read_text()) for p in (STUDY_V3 / folder).glob("*/record.json")]

    runs, trials = records("runs"), records("tuning/runs")
    trial_of = {t["config_hash"]: t for t in trials}
    run_hashes = {r["config_hash"] for r in runs}
    twice = [r for r in runs if r["config_hash"] in trial_of]
    hours = {name: sum(r["wall_seconds"] for r in rs) / 3600 for name, rs in (("runs", runs), ("trials", trials),
                                                                              ("twice", twice))}
    text = " ".join(headline().split())
    assert (f"The {len(runs)} runs took {hours['runs']:.2f} h of run time and the {len(trials)} tuning trials "
            f"{hours['trials']:.2f} h: {hours['runs'] + hours['trials']:.2f} h") in text
    assert (f"{len(twice)} of the runs were trainings of a trial's very config; `harness run` now takes those from "
            f"the trials, which would make it {hours['runs'] + hours['trials'] - hours['twice']:.2f} h") in text
    # docs/study.md: how close the second trainings came, and what the ladder's own searches add
    gaps = [abs(r["test"]["bpb"] - trial_of[r["config_hash"]]["test"]["bpb"]) for r in twice]
    holdout = json.loads((STUDY_V3 / "suite.json").read_text())["suite"]["holdout"]
    ladder = [r for r in runs if r["budget_flops"] != holdout["budget"]]  # the rung beyond apart
    searches = [t for t in trials if t["budget_flops"] != holdout["tune_budget"]]  # the ladder's own
    added = sum(t["wall_seconds"] for t in searches if t["config_hash"] not in run_hashes) / 3600
    doc = " ".join((ROOT / "docs" / "study.md").read_text().split())
    assert (f"trained a second time: {hours['twice']:.2f} h, with test bpb within {max(gaps):.1e} of their trials' "
            f"({sum(g == 0 for g in gaps)} identical)").replace("e-05", "e-5") in doc
    ladder_hours = sum(r["wall_seconds"] for r in ladder) / 3600
    assert f"the ladder's own searches add {added:.2f} h, {added / ladder_hours:.2f}x the ladder" in doc


@pytest.mark.skipif(not STUDY_V3.exists(), reason="the study's records are not in this checkout")
def test_the_v3_headline_fits_and_the_rung_beyond_are_the_committed_report_s():
    """The held-out errors, the rung beyond the ladder and the unmatched runs as
    results/study_v3/report.md states them (the report tests rebuild it from the records)."""
    import re

    text = " ".join(headline().split())
    lines = (STUDY_V3 / "report.md").read_text().splitlines()
    fitted = next(line for line in lines if line.startswith("- Fitted crossovers ("))
    error, count, inside = re.search(r"mean absolute error ([\d.]+) bpb over (\d+) models, (\d+) of them inside",
                                     fitted).groups()
    assert f"by {error} bpb on average ({inside} of {count} inside" in text
    beyond = next(line for line in lines if line.startswith("- Beyond the ladder, at "))
    for form, error, inside, count in re.findall(r"(\w[\w ]*?) by ([\d.]+) bpb on average \((\d+) of (\d+) inside",
                                                 beyond):
        assert f"{form} by {error} ({inside} of {count} inside)" in text, form
    off, total = re.search(r"(\d+) of (\d+) runs are more than 5% off", next(
        line for line in lines if line.startswith("- Not at matched inference cost"))).groups()
    assert f"{off} of the {total} runs" in text


MULTILINGUAL = ROOT / "results" / "multilingual"


def languages_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Languages and noise")
    return " ".join(text[start:text.index("\n## ", start)].split())


def _range(values: list[float]) -> str:
    return f"+{min(values):.2f} to +{max(values):.2f}"


@pytest.mark.skipif(not MULTILINGUAL.exists(), reason="the multilingual records are not in this checkout")
def test_the_languages_and_noise_lines_are_what_the_multilingual_records_give():
    text = languages_section()
    runs = [json.loads(p.read_text()) for p in (MULTILINGUAL / "runs").glob("*/record.json")]
    assert len(runs) == 60
    tokens = {(r["model"]["name"], code): s["tokenizer"]["tokens"] for r in runs if r["budget_flops"] == 1e11
              and r["seed"] == 0 for code, s in r["test_sets"].items() if s.get("tokenizer")}
    premium = lambda model, code: tokens[(model, f"lang:{code}")] / tokens[(model, "lang:en")]
    assert f"{premium('bpe', 'ru'):.2f}x on Russian, {premium('bpe', 'ml'):.2f}x on Malayalam" in text
    assert f"SentencePiece {premium('sentencepiece', 'ru'):.2f}x on Russian" in text
    assert f"{premium('sentencepiece', 'zh_Hans'):.2f}x on Chinese" in text
    top = [r for r in runs if r["budget_flops"] == 3e11]
    delta = defaultdict(list)  # (model, rule) -> per-seed noised minus clean English
    for r in top:
        for rule in ("typos", "case"):
            delta[(r["model"]["name"], rule)].append(r["test_sets"][f"noise:{rule}"]["bpb"]
                                                     - r["test_sets"]["lang:en"]["bpb"])
    mean = {key: statistics.mean(values) for key, values in delta.items()}
    byte_rows = {m for m, _ in mean if "+hash=" in m}
    for rule, phrase in (("typos", "without hashed tables {off}, BPE +{bpe:.2f}, SentencePiece +{sp:.2f}"),
                         ("case", "({off} without, {on} with)")):
        off = _range([mean[(m, rule)] for m in byte_rows if m.endswith("=off")])
        on = _range([mean[(m, rule)] for m in byte_rows if m.endswith("=on")])
        assert phrase.format(off=off, on=on, bpe=mean[("bpe", rule)], sp=mean[("sentencepiece", rule)]) in text, rule
    assert f"twice as much ({_range([mean[(m, 'typos')] for m in byte_rows if m.endswith('=on')])})" in text
    leader = defaultdict(list)
    for r in top:
        leader[r["model"]["name"]].append(r["test"]["bpb"])
    best = min(leader, key=lambda m: statistics.mean(leader[m]))
    assert best == "static-4+hash=on" and f"({statistics.mean(leader[best]):.3f} bpb on the mix" in text
