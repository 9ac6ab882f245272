"""The README's headline figures come from the committed study records: recompute them here, so a
headline that drifts from results/study_v2 (new records, an edited sentence) fails."""

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


def mean_test_bpb() -> dict[float, dict[str, float]]:
    runs = defaultdict(lambda: defaultdict(list))
    for path in (STUDY / "runs").glob("*/record.json"):
        record = json.loads(path.read_text())
        runs[record["budget_flops"]][record["model"]["name"]].append(record["test"]["bpb"])
    return {budget: {name: statistics.mean(v) for name, v in models.items()} for budget, models in runs.items()}


@pytest.mark.skipif(not STUDY.exists(), reason="the study's records are not in this checkout")
def test_headline_leaders_and_primed_gap_match_the_records():
    text = " ".join(headline().split())
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
    """Each row of the README's hashed n-gram ablation: both seeds and the mean, with and without."""
    text = " ".join(headline().split())
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
def test_the_fits_prediction_figures_are_the_committed_report_s():
    """The README's held-out errors and stated crossovers are those of results/study_v2/report.md,
    which the report tests rebuild from the records."""
    import re

    text = " ".join(headline().split())
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
    premium = lambda model, code: tokens[(model, f"lang:{code}")] / tokens[(model, "lang:en")]  # noqa: E731
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
