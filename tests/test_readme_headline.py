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
