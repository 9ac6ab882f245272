"""Noise as an evaluation rule (docs/noise.md): the generators (seeded, each rate exact within
sampling error, lossless bookkeeping), the suite's rules, the noised and conditional test sets of a
run, and the report's section."""

import json
import math

import numpy as np
import pytest
import torch

from harness.api import registry
from harness.cli import main
from harness.orchestrate.suite import load_suite
from harness.run import data, noise
from harness.run.pipeline import score_continuations
from harness.run.records import read_record, write_record
from harness.run.spec import expand
from tests.conftest import ROOT, SMALL_CONFIGS, context, tiny_suite

TEXT = data.embedded_corpus("pydoc-topics", 100_000)
CLEAN = np.frombuffer(TEXT, dtype=np.uint8)
RULES = [("typos", 0.05, None), ("typos", 0.2, {"delete": 3, "insert": 1}), ("case", 0.1, None),
         ("whitespace", 0.1, None), ("whitespace", 0.3, {"swap": 1})]


def eligible(kind: str) -> int:
    """The clean bytes a rule of this kind may touch."""
    return {"typos": len(CLEAN), "case": int(np.isin(CLEAN, noise.LETTERS).sum()),
            "whitespace": int(np.isin(CLEAN, noise.WHITESPACE).sum())}[kind]


@pytest.mark.parametrize("kind,rate,shares", RULES)
def test_each_edit_count_is_the_binomial_of_its_rate_and_share(kind, rate, shares):
    counts = noise.apply(TEXT, kind, rate, shares, seed=3).counts
    weights = {edit: 1.0 if shares is None else shares.get(edit, 0.0) for edit in noise.EDITS[kind]}
    n = eligible(kind)
    for edit, weight in weights.items():
        p = rate * weight / sum(weights.values())
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[edit] - n * p) <= 4 * sigma, (edit, counts[edit], n * p, sigma)
        if p == 0:
            assert counts[edit] == 0


@pytest.mark.parametrize("kind,rate,shares", RULES)
def test_the_bookkeeping_rebuilds_the_clean_text_and_adds_up(kind, rate, shares):
    noised = noise.apply(TEXT, kind, rate, shares, seed=1)
    assert noised.restore() == TEXT and noised.text != TEXT
    carried = noised.source[noised.source >= 0]
    assert sorted(carried.tolist() + list(noised.deleted)) == list(range(len(TEXT)))  # each clean byte once
    assert noised.kept + noised.substituted + len(noised.deleted) == len(TEXT)
    assert len(noised.text) == len(TEXT) - len(noised.deleted) + noised.inserted
    text = np.frombuffer(noised.text, dtype=np.uint8)
    same = text[noised.source >= 0] == CLEAN[carried]
    assert int((~same).sum()) == noised.substituted  # a changed byte really differs, a kept one really not
    inserted, deleted, changed = {"typos": ("insert", "delete", "substitute"), "case": (None, None, "flip"),
                                  "whitespace": ("duplicate", "delete", "swap")}[kind]
    counts = noised.counts
    assert noised.inserted == counts.get(inserted, 0) and len(noised.deleted) == counts.get(deleted, 0)
    assert noised.substituted == counts[changed]
    if kind == "typos":  # only transpositions put clean bytes out of order; new bytes are letters
        assert 0 < int((np.diff(carried) < 0).sum()) <= counts["transpose"] or shares is not None
        assert set(text[noised.source < 0].tobytes() + text[noised.source >= 0][~same].tobytes()) <= set(noise.LETTERS.tobytes())


def test_the_same_text_rule_and_seed_give_the_same_bytes_and_another_seed_others():
    first, again, other = (noise.apply(TEXT, "typos", 0.05, None, seed) for seed in (7, 7, 8))
    assert first.text == again.text and np.array_equal(first.source, again.source) and first.counts == again.counts
    assert other.text != first.text


@pytest.mark.parametrize("kind", sorted(noise.EDITS))
def test_rate_zero_is_the_identity(kind):
    noised = noise.apply(TEXT, kind, 0.0, None, seed=0)
    assert noised.text == TEXT and np.array_equal(noised.source, np.arange(len(TEXT)))
    assert set(noised.counts.values()) == {0} and not noised.changed and not noised.deleted


def test_a_noised_context_is_the_noised_text_just_before_its_clean_continuation():
    window, half = 64, 32
    for kind, rate in (("typos", 0.0), ("case", 0.3), ("typos", 0.3), ("whitespace", 0.5)):
        noised = noise.apply(TEXT, kind, rate, None, seed=2)
        contexts = noise.noised_contexts(noised, window, 100)
        assert contexts.shape == (99, half)
        sources, cut = noised.source.tolist(), 0
        for i, context in enumerate(contexts, start=1):
            continuation = i * window + half
            while sources[cut] < continuation:  # the first noised byte from the continuation on
                cut += 1
            assert context.tobytes() == noised.text[cut - half : cut]
            if kind == "case" or rate == 0:  # nothing moved: the noised copy of the window's first half
                assert context.tobytes() == noised.text[i * window : continuation]
        if rate == 0:
            assert contexts.tobytes() == b"".join(TEXT[i * window : i * window + half] for i in range(1, 100))


def test_every_adapter_scores_windows_shorter_than_the_suite_window():
    """The conditional form scores each context alone, half a window: every adapter takes it."""
    train = data.embedded_corpus("pydoc-topics", 40_000)
    windows = data.windows(TEXT[-4096:], 64, 4)
    for name, config in SMALL_CONFIGS.items():
        torch.manual_seed(0)
        model = registry.build(name, config)
        model.prepare(train, context(64))
        model.finish_training(train, context(64))
        with torch.no_grad():
            nll = model.eval()(windows[:, :32].contiguous())
        assert nll.shape == (4, 32) and torch.isfinite(nll).all(), name


def test_a_continuation_is_scored_as_the_window_minus_its_context():
    """For a byte model (causal, byte by byte) the difference is the NLL of the continuation's bytes
    inside the whole window: the reference."""
    torch.manual_seed(0)
    model = registry.build("bytes", SMALL_CONFIGS["bytes"]).eval()
    windows = data.windows(TEXT, 64, 6)
    scored = score_continuations(model, windows, 24, context(64), 4, "test")
    with torch.no_grad():
        reference = model(windows)[:, 24:].double().sum(dim=1)
    assert scored.bytes == 6 * 40 and scored.windows == 6 and scored.kind == "noise-conditional"
    assert np.allclose(scored.window_nll_nats, reference.numpy(), atol=1e-4)
    assert scored.bpb == pytest.approx(float(reference.sum()) / (math.log(2) * 240), rel=1e-5)


NOISE = {"seed": 0, "rules": {"typos": {"typos": 0.05}, "caps": {"case": 0.1}, "spaces": {"whitespace": 0.1}}}


def test_a_run_with_noise_rules_records_its_sets_and_the_report_shows_them(write_suite, tmp_path):
    suite = tiny_suite(seeds=[0, 1])
    suite["eval"] = suite["eval"] | {"noise": NOISE}
    out = tmp_path / "out"
    assert main(["run", str(write_suite(suite)), "--results", str(out), "--quiet"]) == 0
    records = [read_record(p) for p in sorted((out / "tiny" / "runs").glob("*/record.json"))]
    windows, window = suite["eval"]["max_windows"], suite["eval"]["window"]
    for record in records:
        sets = record.test_sets
        assert set(sets) == {"noise:clean-after-clean"} | {f"noise:{n}{s}" for n in NOISE["rules"]
                                                            for s in ("", ":clean-after-noised")}
        for name in NOISE["rules"]:
            assert sets[f"noise:{name}"].kind == "noise" and sets[f"noise:{name}"].bytes == windows * window
            conditional = sets[f"noise:{name}:clean-after-noised"]
            assert conditional.kind == "noise-conditional" and conditional.windows == windows - 1
            assert conditional.bytes == (windows - 1) * (window - window // 2)  # the scored continuations
        assert sets["noise:clean-after-clean"].bytes == (windows - 1) * (window - window // 2)
    a, b = records
    assert a.test_sets["noise:typos"].window_nll_nats != b.test_sets["noise:typos"].window_nll_nats  # two models
    assert main(["report", str(out / "tiny")]) == 0
    report = (out / "tiny" / "report.md").read_text()
    assert "### Noised test text" in report and "`typos`: typos at 0.05" in report
    row = next(line for line in report.splitlines() if line.startswith("| 2e+09") and "| typos " in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    clean, noised, delta = float(cells[4]), float(cells[5]), float(cells[6])
    assert clean == pytest.approx(np.mean([r.test.bpb for r in records]), abs=1e-4)
    assert delta == pytest.approx(noised - clean, abs=2e-4) and cells[7].startswith("[")


def test_a_suite_without_noise_keeps_its_config_hashes_and_its_records_their_keys(write_suite, tmp_path):
    study = load_suite(ROOT / "suites" / "study_v2.yaml")
    run = expand(study)[0]
    committed = ROOT / "results" / "study_v2" / "runs" / run.run_id / "record.json"
    assert read_record(committed).config_hash == run.config_hash(study)
    write_record(tmp_path / "record.json", read_record(committed))
    assert "noise" not in json.loads((tmp_path / "record.json").read_text())["eval"]
    plain = tiny_suite()
    noised = tiny_suite(eval=plain["eval"] | {"noise": NOISE})
    hashes = [expand(s)[0].config_hash(s) for s in (load_suite(write_suite(plain, "plain.yaml")),
                                                    load_suite(write_suite(noised, "noised.yaml")))]
    assert hashes[0] != hashes[1]  # noise changes what a run records


BAD = [({"rules": {"t": {"typos": 1.5}}}, "eval.noise.rules.t.typos: Input should be less than or equal to 1"),
       ({"rules": {"t": {"typos": 0.1, "case": 0.1}}}, "eval.noise.rules.t: give exactly one of typos, case, whitespace"),
       ({"rules": {"t": {"typos": 0.1, "shares": {"swap": 1}}}}, "eval.noise.rules.t: shares: swap: the typos edits"),
       ({"rules": {"t": {"case": 0.1, "shares": {"flip": 1}}}}, "eval.noise.rules.t: shares: a case rule has one edit"),
       ({"rules": {"t": {"whitespace": 0.1, "shares": {"swap": 0}}}}, "eval.noise.rules.t: shares: at least one edit"),
       ({"rules": {"clean-after-clean": {"case": 0.1}}}, "eval.noise: rules: 'clean-after-clean' names the clean"),
       ({"seed": -1, "rules": {"t": {"case": 0.1}}}, "eval.noise.seed: Input should be greater than or equal to 0"),
       ({"language": "en", "rules": {"t": {"case": 0.1}}}, "eval.noise.language: 'en' is not a language of every")]


@pytest.mark.parametrize("given,message", BAD, ids=[m.split(":")[1].strip() + str(i) for i, (_, m) in enumerate(BAD)])
def test_a_bad_noise_rule_is_one_line_naming_the_file_and_the_key(given, message, write_suite, tmp_path, capsys):
    plain = tiny_suite()
    path = write_suite(tiny_suite(eval=plain["eval"] | {"noise": given}))
    assert main(["run", str(path), "--results", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"harness: error: {path}: {message}"), err
